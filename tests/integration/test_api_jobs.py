"""Issue/renew now with Idempotency-Key (one enqueue), and the jobs resource: list, read,
retry a dead job, cancel a queued one."""

from __future__ import annotations

import pytest

from app import create_app
from app import db as dbm
from app.domain import tokens
from tests.helpers.api import API, make_admin, make_project, make_token


@pytest.fixture
def ctx(migrated_db, settings):
    tokens.clear_cache()
    client = create_app(settings).test_client()
    pid = make_project(migrated_db, "alpha")
    rw = make_token(migrated_db, pid, ["read", "write"])
    account = client.post(f"{API}/acme-accounts", headers=rw.headers, json={
        "directory_url": "https://127.0.0.1:1/dir", "terms_agreed": True, "register": False})
    assert account.status_code == 201, account.json
    cert = client.post(f"{API}/certificates", headers=rw.headers,
                       json={"names": ["jobs.example.com"], "issue": False})
    assert cert.status_code == 201, cert.json
    return {"client": client, "rw": rw, "project": pid, "cert": cert.json["id"]}


def issue_jobs(db, cert_id: str) -> list[dict]:
    return list(db[dbm.JOBS].find({"payload.certificate_id": cert_id}))


def test_renew_with_the_same_idempotency_key_enqueues_once(ctx, migrated_db) -> None:
    client, rw, cert = ctx["client"], ctx["rw"], ctx["cert"]
    headers = {**rw.headers, "Idempotency-Key": "renew-2026-11-27"}
    first = client.post(f"{API}/certificates/{cert}/renew", headers=headers)
    assert first.status_code == 202, first.json
    audit_after_first = migrated_db[dbm.AUDIT].count_documents({})
    second = client.post(f"{API}/certificates/{cert}/renew", headers=headers)
    assert second.status_code == 202
    assert second.json == first.json
    assert second.headers["Idempotent-Replayed"] == "true"
    assert len(issue_jobs(migrated_db, cert)) == 1
    assert migrated_db[dbm.AUDIT].count_documents({}) == audit_after_first
    job = first.json["job"]
    assert job["state"] == "queued" and job["kind"] == "certificates.issue"
    assert job["payload"]["reason"] == "renew_now"
    # The same key on another certificate's renew is another request: 409.
    other = client.post(f"{API}/certificates", headers=rw.headers,
                        json={"names": ["other.example.com"], "issue": False}).json["id"]
    reused = client.post(f"{API}/certificates/{other}/renew", headers=headers)
    assert reused.status_code == 409
    assert reused.json["code"] == "idempotency_key_reused"
    assert issue_jobs(migrated_db, other) == []


def test_issue_now_while_one_is_active_returns_the_active_job(ctx, migrated_db) -> None:
    client, rw, cert = ctx["client"], ctx["rw"], ctx["cert"]
    one = client.post(f"{API}/certificates/{cert}/issue", headers=rw.headers)
    two = client.post(f"{API}/certificates/{cert}/issue", headers=rw.headers)
    assert one.status_code == two.status_code == 202
    assert one.json["job"]["id"] == two.json["job"]["id"]
    assert len(issue_jobs(migrated_db, cert)) == 1


def test_list_read_cancel_and_retry(ctx, migrated_db) -> None:
    client, rw, cert = ctx["client"], ctx["rw"], ctx["cert"]
    job_id = client.post(f"{API}/certificates/{cert}/issue",
                         headers=rw.headers).json["job"]["id"]
    listed = client.get(f"{API}/jobs?state=queued", headers=rw.headers)
    assert listed.status_code == 200
    assert [j["id"] for j in listed.json["items"]] == [job_id]
    got = client.get(f"{API}/jobs/{job_id}", headers=rw.headers)
    assert got.status_code == 200 and got.json["project_id"] == ctx["project"]
    assert "token" not in (got.json.get("lease") or {})

    # Retrying a job that is not dead is a conflict and changes nothing.
    assert client.post(f"{API}/jobs/{job_id}/retry", headers=rw.headers).status_code == 409
    cancelled = client.post(f"{API}/jobs/{job_id}/cancel", json={"reason": "not now"},
                            headers=rw.headers)
    assert cancelled.status_code == 200 and cancelled.json["state"] == "cancelled"
    again = client.post(f"{API}/jobs/{job_id}/cancel", json={}, headers=rw.headers)
    assert again.status_code == 409 and again.json["code"] == "job_state_conflict"

    # A dead job (its attempts ran out) can be retried.
    dead = client.post(f"{API}/certificates/{cert}/issue", headers=rw.headers).json["job"]
    migrated_db[dbm.JOBS].update_one({"_id": dead["id"]},
                                     {"$set": {"state": "dead", "attempts": 5}})
    retried = client.post(f"{API}/jobs/{dead['id']}/retry", headers=rw.headers)
    assert retried.status_code == 200, retried.json
    assert retried.json["state"] == "queued" and retried.json["attempts"] == 0
    actions = [e["action"] for e in migrated_db[dbm.AUDIT].find().sort("seq", 1)]
    assert actions.count("job.cancel") == 1 and actions.count("job.retry") == 1


def test_jobs_of_no_project_are_for_admins_only(ctx, migrated_db) -> None:
    from app.jobs import enqueue

    internal = enqueue(migrated_db, "jobs.reap", {}, publish=False)
    client = ctx["client"]
    assert client.get(f"{API}/jobs/{internal['_id']}",
                      headers=ctx["rw"].headers).status_code == 404
    admin = make_admin(migrated_db)
    assert client.get(f"{API}/jobs/{internal['_id']}", headers=admin.headers).status_code \
        == 200
    ids = {j["id"] for j in client.get(f"{API}/jobs", headers=ctx["rw"].headers)
           .json["items"]}
    assert str(internal["_id"]) not in ids


def test_every_page_of_the_jobs_list_newest_first(ctx, migrated_db) -> None:
    """The list is read through created_at windows (app.api.windows): walking every page,
    unfiltered and by state and by project, gives exactly the matching jobs, newest
    first, with jobs that tie on created_at across page boundaries and jobs days old."""
    import random
    from datetime import timedelta

    from bson import ObjectId

    rng = random.Random(3)
    now = dbm.server_now(migrated_db)
    other = make_project(migrated_db, "beta")
    rows = [{"_id": ObjectId(), "kind": "test.page", "state": rng.choice(
        ("queued", "succeeded", "succeeded", "dead")), "project_id": rng.choice(
        (ctx["project"], other, None)), "created_at": now - timedelta(
        seconds=rng.choice((0, 5, 5, 3600, 86400 * 3)) + i // 4), "payload": {},
        "attempts": 0, "max_attempts": 3, "history": []} for i in range(240)]
    migrated_db[dbm.JOBS].insert_many(rows)
    client, admin = ctx["client"], make_admin(migrated_db)

    def walk(query: str, limit: int) -> list[str]:
        got, cursor = [], None
        for _ in range(500):
            url = f"{API}/jobs?limit={limit}{query}" + (f"&cursor={cursor}" if cursor else "")
            page = client.get(url, headers=admin.headers)
            assert page.status_code == 200, page.json
            got += [j["id"] for j in page.json["items"]]
            cursor = page.json["next_cursor"]
            if cursor is None:
                return got
        raise AssertionError("the pages never ended")

    every = list(migrated_db[dbm.JOBS].find({}, {"created_at": 1, "state": 1,
                                                 "project_id": 1}))

    def expected(keep) -> list[str]:
        chosen = sorted((d for d in every if keep(d)),
                        key=lambda d: (d["created_at"], d["_id"]), reverse=True)
        return [str(d["_id"]) for d in chosen]

    for limit in (25, 7):
        assert walk("", limit) == expected(lambda d: True)
    assert walk("&state=succeeded", 9) == expected(lambda d: d["state"] == "succeeded")
    assert walk(f"&project_id={other}", 8) == expected(lambda d: d.get("project_id") == other)
    for cursor in ("i12", "d3~n"):  # another shape: answered as any list answers it
        assert client.get(f"{API}/jobs?cursor={cursor}", headers=admin.headers
                          ).status_code == 200
