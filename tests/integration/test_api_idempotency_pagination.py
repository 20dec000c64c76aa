"""Idempotency-Key on POST, and cursor pagination under concurrent inserts."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta

import pytest

from app import create_app
from app import db as dbm
from app.api import idempotency
from app.api.idempotency import IDEMPOTENCY
from app.domain import tokens
from tests.helpers.api import API, make_admin, make_project, make_token


@pytest.fixture
def client(migrated_db, settings):
    tokens.clear_cache()
    return create_app(settings).test_client()


def test_repeat_with_same_key_returns_first_answer_and_does_nothing_again(
        client, migrated_db) -> None:
    admin = make_admin(migrated_db)
    headers = {**admin.headers, "Idempotency-Key": "create-payments-1"}
    first = client.post(f"{API}/projects", json={"name": "payments"}, headers=headers)
    audit_after_first = migrated_db[dbm.AUDIT].count_documents({})
    # Same JSON, other spacing and key order: the same request.
    second = client.post(f"{API}/projects", data='{ "name" :  "payments" }',
                         content_type="application/json", headers=headers)
    assert first.status_code == second.status_code == 201
    assert second.json == first.json
    assert second.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers
    assert migrated_db[dbm.PROJECTS].count_documents({"name": "payments"}) == 1
    assert migrated_db[dbm.AUDIT].count_documents({}) == audit_after_first

    other = client.post(f"{API}/projects", json={"name": "billing"}, headers=headers)
    assert other.status_code == 409 and other.json["code"] == "idempotency_key_reused"
    assert "Idempotency-Key" in other.json["errors"]["headers"]
    assert migrated_db[dbm.PROJECTS].count_documents({"name": "billing"}) == 0

    # Keys belong to a token: another token's same key is a new request.
    admin_2 = make_admin(migrated_db)
    third = client.post(f"{API}/projects", json={"name": "billing"},
                        headers={**admin_2.headers, "Idempotency-Key": "create-payments-1"})
    assert third.status_code == 201


def test_an_error_answer_is_replayed_too(client, migrated_db) -> None:
    admin = make_admin(migrated_db)
    make_project(migrated_db, "taken")
    headers = {**admin.headers, "Idempotency-Key": "k-409"}
    first = client.post(f"{API}/projects", json={"name": "taken"}, headers=headers)
    second = client.post(f"{API}/projects", json={"name": "taken"}, headers=headers)
    assert first.status_code == second.status_code == 409
    assert second.headers["Idempotent-Replayed"] == "true"


def test_same_key_while_the_first_is_running_is_409_and_a_stale_one_is_retaken(
        client, migrated_db, monkeypatch) -> None:
    monkeypatch.setattr(idempotency, "WAIT_SECONDS", 0.5)
    admin = make_admin(migrated_db)
    headers = {**admin.headers, "Idempotency-Key": "slow"}
    first = client.post(f"{API}/projects", json={"name": "one"}, headers=headers)
    assert first.status_code == 201
    record = migrated_db[IDEMPOTENCY].find_one({})
    # Put the record back in the state of a first request still running.
    migrated_db[IDEMPOTENCY].update_one({"_id": record["_id"]}, {"$set": {
        "state": "running", "lease_until": datetime.now(UTC) + timedelta(minutes=2)}})
    busy = client.post(f"{API}/projects", json={"name": "one"}, headers=headers)
    assert busy.status_code == 409 and busy.headers["Retry-After"] == "1"
    # The first request's process died: after its lease the key can be used again.
    migrated_db[IDEMPOTENCY].update_one({"_id": record["_id"]}, {"$set": {
        "lease_until": datetime.now(UTC) - timedelta(seconds=1)}})
    retaken = client.post(f"{API}/projects", json={"name": "one"}, headers=headers)
    # It runs again; the project exists, made under this key (the dead request committed
    # before storing its answer): the answer is that project, not a name conflict.
    assert retaken.status_code == 201 and retaken.json == first.json
    assert "Idempotent-Replayed" not in retaken.headers
    assert migrated_db[dbm.PROJECTS].count_documents({"name": "one"}) == 1
    assert migrated_db[IDEMPOTENCY].find_one({})["state"] == "done"
    # Another key naming the same project is still a conflict.
    other = client.post(f"{API}/projects", json={"name": "one"},
                        headers={**admin.headers, "Idempotency-Key": "other"})
    assert other.status_code == 409 and other.json["code"] == "conflict"


def test_a_retry_waits_for_the_running_first_request_and_replays_its_answer(
        client, migrated_db) -> None:
    admin = make_admin(migrated_db)
    headers = {**admin.headers, "Idempotency-Key": "waits"}
    first = client.post(f"{API}/projects", json={"name": "two"}, headers=headers)
    record = migrated_db[IDEMPOTENCY].find_one({})
    answer = {k: record[k] for k in ("status", "body", "headers")}
    migrated_db[IDEMPOTENCY].update_one({"_id": record["_id"]}, {"$set": {
        "state": "running", "owner": "elsewhere",
        "lease_until": datetime.now(UTC) + timedelta(minutes=2)}})

    def first_request_finishes() -> None:  # on another replica, a second later
        time.sleep(1.0)
        migrated_db[IDEMPOTENCY].update_one({"_id": record["_id"]},
                                            {"$set": {"state": "done", **answer}})

    finisher = threading.Thread(target=first_request_finishes)
    finisher.start()
    started = time.monotonic()
    retry = client.post(f"{API}/projects", json={"name": "two"}, headers=headers)
    finisher.join()
    assert time.monotonic() - started >= 0.9
    assert retry.status_code == 201 and retry.json == first.json
    assert retry.headers["Idempotent-Replayed"] == "true"
    assert migrated_db[dbm.PROJECTS].count_documents({"name": "two"}) == 1


def test_a_retry_after_the_first_requests_process_died_takes_over_once_its_lease_lapses(
        client, migrated_db) -> None:
    """kill -9 of the api mid-request; the load balancer re-sends the POST to another
    replica at once: it waits for the dead owner's lease, then runs the request."""
    admin = make_admin(migrated_db)
    headers = {**admin.headers, "Idempotency-Key": "owner-died"}
    assert client.post(f"{API}/projects", json={"name": "three"},
                       headers=headers).status_code == 201
    record = migrated_db[IDEMPOTENCY].find_one({})
    # The state the dead process left: reserved, not committed, lease about to lapse.
    migrated_db[dbm.PROJECTS].delete_one({"name": "three"})
    migrated_db[IDEMPOTENCY].update_one({"_id": record["_id"]}, {"$set": {
        "state": "running", "owner": "vm:1:dead",
        "lease_until": dbm.server_now(migrated_db) + timedelta(seconds=1)}})
    started = time.monotonic()
    retry = client.post(f"{API}/projects", json={"name": "three"}, headers=headers)
    assert time.monotonic() - started >= 0.5
    assert retry.status_code == 201 and "Idempotent-Replayed" not in retry.headers
    assert migrated_db[dbm.PROJECTS].count_documents({"name": "three"}) == 1
    assert migrated_db[IDEMPOTENCY].find_one({})["state"] == "done"


def test_a_running_request_keeps_its_key_while_it_runs(migrated_db, monkeypatch) -> None:
    """The owner's lease is renewed while the request runs, so a retry waits rather
    than running the same request a second time beside it."""
    monkeypatch.setattr(idempotency, "RENEW_SECONDS", 0.2)
    keeper = idempotency._Keeper()
    soon = dbm.server_now(migrated_db) + timedelta(seconds=1)
    migrated_db[IDEMPOTENCY].insert_one({"_id": "held", "state": "running",
                                         "owner": keeper.owner, "lease_until": soon})
    migrated_db[IDEMPOTENCY].insert_one({"_id": "foreign", "state": "running",
                                         "owner": "someone-else", "lease_until": soon})
    keeper.hold(migrated_db, "held")
    keeper.hold(migrated_db, "foreign")  # never another owner's
    time.sleep(1.5)
    keeper.drop("held")
    keeper.drop("foreign")  # or its thread warns for the rest of the session
    leases = {d["_id"]: d["lease_until"] for d in migrated_db[IDEMPOTENCY].find()}
    assert leases["held"] > soon + timedelta(seconds=idempotency.LEASE_SECONDS - 5)
    assert leases["foreign"] == soon.replace(microsecond=soon.microsecond // 1000 * 1000)


def test_a_replayed_token_creation_never_stores_or_returns_the_token(client,
                                                                     migrated_db) -> None:
    pid = make_project(migrated_db, "alpha")
    writer = make_token(migrated_db, pid, ["read", "write"])
    headers = {**writer.headers, "Idempotency-Key": "tok-1"}
    first = client.post(f"{API}/tokens", json={"scopes": ["read"]}, headers=headers)
    second = client.post(f"{API}/tokens", json={"scopes": ["read"]}, headers=headers)
    assert first.status_code == second.status_code == 201
    assert second.json["id"] == first.json["id"]
    assert first.json["token"].startswith("cap_")
    assert first.json["token"] != second.json["token"]
    assert first.json["token"] not in repr(list(migrated_db[IDEMPOTENCY].find()))
    assert migrated_db[dbm.API_TOKENS].count_documents({"project_id": pid}) == 2


def test_pagination_is_stable_under_concurrent_inserts(client, migrated_db) -> None:
    admin = make_admin(migrated_db)
    existing = {make_project(migrated_db, f"p{i:02d}") for i in range(23)}
    stop = threading.Event()
    inserted: list[str] = []

    def insert_more() -> None:
        n = 0
        while not stop.is_set() and n < 40:
            inserted.append(make_project(migrated_db, f"late{n:02d}"))
            n += 1

    writer = threading.Thread(target=insert_more)
    writer.start()
    seen: list[str] = []
    cursor = None
    pages = 0
    try:
        while True:
            url = f"{API}/projects?limit=5" + (f"&cursor={cursor}" if cursor else "")
            page = client.get(url, headers=admin.headers)
            assert page.status_code == 200, page.json
            seen.extend(p["id"] for p in page.json["items"])
            pages += 1
            cursor = page.json["next_cursor"]
            if cursor is None:
                break
            assert pages < 100
    finally:
        stop.set()
        writer.join()
    assert len(seen) == len(set(seen)), "an item was returned twice"
    assert existing <= set(seen), "an item that existed before paging was skipped"
    assert set(seen) <= existing | set(inserted)
    # Every page but the last is full; a cursor that is no position (the schema's
    # pattern) is refused with the error naming it.
    assert len(seen) >= 23
    bad = client.get(f"{API}/tokens?cursor=eyJrIjoiX2lkIn0", headers=admin.headers)
    assert bad.status_code == 422
    assert "cursor" in bad.json["errors"]["query"]


def test_descending_pages_keep_every_item_that_ties_on_the_cursors_date(migrated_db) -> None:
    """Newest-first pages over (state, created_at, _id) with many items per second: every
    item once. A `$lte` bound on the date lost the ties on the embedded server."""
    from app.api.common import paginate

    things = migrated_db["things"]
    things.create_index([("state", 1), ("created_at", 1), ("_id", 1)])
    start = datetime(2026, 1, 1, tzinfo=UTC)
    things.insert_many([{"_id": f"t{i:03d}", "state": "queued",
                         "created_at": start + timedelta(seconds=i // 5)} for i in range(40)])
    seen: list[str] = []
    cursor = None
    while True:
        page = paginate(things, {"state": "queued"}, limit=7, cursor=cursor,
                        descending=True)
        seen += [doc["_id"] for doc in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == sorted((f"t{i:03d}" for i in range(40)), reverse=True)


# ------------------------------------------- a retry after the first request's process died
# kill -9 of an api after a create committed, before its answer was stored: the key's
# lease lapses and a retry takes it over and runs the view again. Each create below
# answers with what the dead request made instead of making it twice.
def _as_if_its_process_died(db, tok, key: str) -> None:
    """The state a dead first request leaves: committed, answer not stored, lease lapsed."""
    import hashlib

    record_id = f"{tok.id}:{hashlib.sha256(key.encode()).hexdigest()}"
    changed = db[IDEMPOTENCY].update_one({"_id": record_id}, {
        "$set": {"state": "running", "owner": "vm:1:dead",
                 "lease_until": dbm.server_now(db) - timedelta(seconds=1)},
        "$unset": {"status": "", "body": "", "headers": ""}})
    assert changed.modified_count == 1


def test_a_token_retried_after_its_first_requests_process_died_replaces_the_lost_one(
        client, migrated_db) -> None:
    """The first token's plaintext died with its process (never stored): the retry gets
    a new token and the first one is revoked, not left valid with nobody holding it."""
    project = make_project(migrated_db, "alpha")
    owner = make_token(migrated_db, project, ["read", "write"])
    headers = {**owner.headers, "Idempotency-Key": "token-owner-died"}
    body = {"project_id": project, "scopes": ["read"], "name": "ci"}
    first = client.post(f"{API}/tokens", json=body, headers=headers)
    assert first.status_code == 201, first.json
    _as_if_its_process_died(migrated_db, owner, "token-owner-died")
    retry = client.post(f"{API}/tokens", json=body, headers=headers)
    assert retry.status_code == 201 and "Idempotent-Replayed" not in retry.headers
    assert retry.json["id"] != first.json["id"]
    lost = migrated_db[dbm.API_TOKENS].find_one({"_id": first.json["id"]})
    assert lost["revoked_at"] is not None
    assert migrated_db[dbm.API_TOKENS].count_documents(
        {"project_id": project, "name": "ci", "revoked_at": None}) == 1
    assert migrated_db[dbm.AUDIT].count_documents(
        {"action": "token.revoke", "target": f"token:{first.json['id']}"}) == 1
    tokens.clear_cache()
    fresh = {"Authorization": f"Bearer {retry.json['token']}"}
    assert client.get(f"{API}/projects/{project}", headers=fresh).status_code == 200
    stale = {"Authorization": f"Bearer {first.json['token']}"}
    assert client.get(f"{API}/projects/{project}", headers=stale).status_code == 401
    # The stored answer is the second one, its plaintext redacted; the reservation is
    # in no answer.
    replay = client.post(f"{API}/tokens", json=body, headers=headers)
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert replay.json["id"] == retry.json["id"] and replay.json["token"].startswith("(")
    listed = client.get(f"{API}/tokens?project_id={project}", headers=owner.headers)
    assert all("request_key" not in item for item in listed.json["items"])
    assert "request_key" not in retry.json


def test_an_alert_channel_and_an_account_retried_after_the_process_died_are_the_first(
        client, migrated_db) -> None:
    project = make_project(migrated_db, "alpha")
    owner = make_token(migrated_db, project, ["read", "write"])
    made = {}
    for path, body in (
            ("alert-channels", {"project_id": project, "name": "ops",
                                "url": "https://hooks.example.com/cap"}),
            ("acme-accounts", {"project_id": project, "register": False,
                               "directory_url": "https://127.0.0.1:1/dir",
                               "terms_agreed": True})):
        headers = {**owner.headers, "Idempotency-Key": f"{path}-owner-died"}
        first = client.post(f"{API}/{path}", json=body, headers=headers)
        assert first.status_code == 201, first.json
        _as_if_its_process_died(migrated_db, owner, f"{path}-owner-died")
        retry = client.post(f"{API}/{path}", json=body, headers=headers)
        assert retry.status_code == 201, retry.json
        assert "Idempotent-Replayed" not in retry.headers
        assert retry.json == first.json and "request_key" not in retry.json
        # Another key naming the same object is still a conflict.
        other = client.post(f"{API}/{path}", json=body,
                            headers={**owner.headers, "Idempotency-Key": f"{path}-other"})
        assert other.status_code == 409 and other.json["code"] == "conflict", other.json
        made[path] = first.json["id"]
    assert migrated_db[dbm.ALERT_CHANNELS].count_documents({"project_id": project}) == 1
    assert migrated_db[dbm.ACME_ACCOUNTS].count_documents({"project_id": project}) == 1
    assert migrated_db[dbm.AUDIT].count_documents(
        {"action": {"$in": ["alert_channel.create", "acme_account.create"]}}) == 2


def test_a_renew_now_and_a_batch_retried_after_the_process_died_do_not_order_again(
        client, migrated_db) -> None:
    """Their first jobs may have finished by the time the key's lease lapses, so the
    active-job dedupe would not stop a second order: the retry answers with the first
    request's job (renew now) and batch."""
    from app.audit import system_actor
    from app.domain import accounts, certificates

    actor = system_actor("cli")
    project = make_project(migrated_db, "alpha")
    accounts.create_account(migrated_db, project, {
        "directory_url": "https://127.0.0.1:1/dir", "terms_agreed": True}, actor,
        register=False)
    owner = make_token(migrated_db, project, ["read", "write"])
    cert = certificates.create_certificate(migrated_db, project,
                                           {"names": ["died.example.com"]}, actor)
    migrated_db[dbm.CERTIFICATES].update_one({"_id": cert["_id"]}, {"$set": {
        "status": "issued", "serial": "a1", "issuer": "CN=R11,O=Let's Encrypt",
        "certificate_pem": "-----BEGIN CERTIFICATE-----",
        "not_after": datetime.now(UTC) + timedelta(days=10)}})

    def finish_every_job() -> None:
        migrated_db[dbm.JOBS].update_many({"state": {"$in": ["queued", "running"]}},
                                          {"$set": {"state": "succeeded"}})

    headers = {**owner.headers, "Idempotency-Key": "renew-owner-died"}
    first = client.post(f"{API}/certificates/{cert['_id']}/renew", headers=headers)
    assert first.status_code == 202, first.json
    finish_every_job()
    _as_if_its_process_died(migrated_db, owner, "renew-owner-died")
    retry = client.post(f"{API}/certificates/{cert['_id']}/renew", headers=headers)
    assert retry.status_code == 202 and "Idempotent-Replayed" not in retry.headers
    assert retry.json["job"]["id"] == first.json["job"]["id"]
    assert migrated_db[dbm.JOBS].count_documents({"kind": "certificates.issue"}) == 1
    # The reservation is the job's bookkeeping, in no answer.
    assert "request_key" not in retry.json["job"]["payload"]
    shown = client.get(f"{API}/jobs/{first.json['job']['id']}", headers=owner.headers)
    assert shown.status_code == 200 and "request_key" not in shown.json["payload"]
    assert shown.json["payload"]["certificate_id"] == cert["_id"]
    # Without a takeover the key is not looked up: another key renews again.
    again = client.post(f"{API}/certificates/{cert['_id']}/renew",
                        headers={**owner.headers, "Idempotency-Key": "renew-other"})
    assert again.status_code == 202 and again.json["job"]["id"] != first.json["job"]["id"]
    finish_every_job()

    headers = {**owner.headers, "Idempotency-Key": "batch-owner-died"}
    batch = client.post(f"{API}/renewals", json={"issuer": "R11"}, headers=headers)
    assert batch.status_code == 201, batch.json
    finish_every_job()
    _as_if_its_process_died(migrated_db, owner, "batch-owner-died")
    retry = client.post(f"{API}/renewals", json={"issuer": "R11"}, headers=headers)
    assert retry.status_code == 201 and "Idempotent-Replayed" not in retry.headers
    assert retry.json["id"] == batch.json["id"] and retry.json["counts"]["done"] == 1
    assert migrated_db["renewal_batches"].count_documents({}) == 1
    assert migrated_db[dbm.JOBS].count_documents({"kind": "certificates.issue"}) == 3
    assert "request_key" not in retry.json
