"""The dashboard's fleet figures (``app.dashboard.snapshot``): what one keeper writes
equals what a fresh count finds, also after it only read the changes; pages read them;
one api process keeps them; lists read bounded index ranges."""

from __future__ import annotations

import re
import time
from datetime import timedelta
from typing import Any

import pytest

from app import create_app
from app import db as dbm
from app.dashboard import snapshot
from app.domain import tokens
from tests.helpers.api import make_admin, make_project, make_token


@pytest.fixture(autouse=True)
def _stop_keepers():
    yield
    snapshot.stop_all()


def cert_doc(i: int, project: str, now, *, status: str = "issued", days: float | None = 30,
             failed_minutes_ago: int | None = None) -> dict[str, Any]:
    host = f"host{i:04d}.snap.example"
    doc: dict[str, Any] = {
        "_id": f"crt_snap{i:04d}", "project_id": project, "name": host,
        "names": [host, f"www.{host}"], "status": status, "deleted_at": None,
        "created_at": now - timedelta(minutes=500 - i), "updated_at": now - timedelta(hours=1),
        "not_after": None if days is None else now + timedelta(days=days),
        "next_renewal_at": now + timedelta(days=1), "failure": None}
    if failed_minutes_ago is not None:
        doc["failure"] = {"count": 2, "last_failed_at": now - timedelta(minutes=failed_minutes_ago),
                          "last_error": {"type": "urn:ietf:params:acme:error:dns",
                                         "detail": f"NXDOMAIN {host}"}}
    return doc


def job_doc(i: int, now, *, state: str, kind: str = "k.one", due: bool = True,
            finished_minutes_ago: float | None = None, slot_expire_at=None) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "_id": f"job{i:05d}", "kind": kind, "state": state, "payload": {},
        "created_at": now - timedelta(hours=2), "updated_at": now - timedelta(hours=1),
        "run_after": now - timedelta(minutes=10 + i) if due else now + timedelta(hours=1),
        "finished_at": None, "lease": {"owner": f"celery@host{i % 2}:1{i}"}}
    if finished_minutes_ago is not None:
        doc["finished_at"] = now - timedelta(minutes=finished_minutes_ago)
    if slot_expire_at is not None:
        doc["slot_expire_at"] = slot_expire_at
    return doc


def seed(db) -> dict[str, Any]:
    now = dbm.server_now(db)
    a, b = make_project(db, "alpha"), make_project(db, "beta")
    certs = [cert_doc(0, a, now, days=3), cert_doc(1, a, now, days=10),
             cert_doc(2, a, now, days=20), cert_doc(3, b, now, days=45),
             cert_doc(4, b, now, days=80), cert_doc(5, b, now, days=-2),
             cert_doc(6, a, now, status="failed", days=None, failed_minutes_ago=5),
             cert_doc(7, b, now, status="pending", days=None, failed_minutes_ago=50),
             cert_doc(8, a, now, status="revoked", days=40),
             {**cert_doc(9, a, now, status="deleted"), "deleted_at": now}]
    db[dbm.CERTIFICATES].insert_many(certs)
    jobs = [job_doc(0, now, state="queued"), job_doc(1, now, state="queued", kind="k.two"),
            job_doc(2, now, state="queued", due=False), job_doc(3, now, state="running"),
            job_doc(4, now, state="succeeded", finished_minutes_ago=3),
            job_doc(5, now, state="dead", finished_minutes_ago=30),
            job_doc(6, now, state="succeeded", finished_minutes_ago=500)]  # off the chart
    db[dbm.JOBS].insert_many(jobs)
    return {"a": a, "b": b, "now": now}


def written(db) -> dict[str, dict[str, Any]]:
    return {d["_id"]: {k: v for k, v in d.items() if k not in ("_id", "at")}
            for d in db[snapshot.COLLECTION].find()}


def test_the_figures_are_the_fleets(migrated_db) -> None:
    db = migrated_db
    world = seed(db)
    assert snapshot.refresh(db) == 3  # all, and one per project
    every, _ = snapshot.read(db, None)
    assert every is not None
    certs = every["certs"]
    assert certs["by_state"] == {"issued": 6, "failed": 1, "pending": 1, "revoked": 1}
    assert certs["total"] == 9 and certs["expired"] == 1
    assert [(b["label"], b["count"]) for b in certs["days_left"]] == [
        ("0–7", 1), ("8–14", 1), ("15–30", 1), ("31–60", 1), ("> 60", 1)]
    assert [f["_id"] for f in every["failing"]] == ["crt_snap0006", "crt_snap0007"]
    assert every["failing"][0]["failure"]["last_error"]["detail"].startswith("NXDOMAIN")
    queue = snapshot.queue_view(every, world["now"])
    assert queue["by_kind"] == {"k.one": 2, "k.two": 1}
    assert queue["due_by_kind"] == {"k.one": 1, "k.two": 1}
    assert queue["queued"] == 3 and queue["due"] == 2 and queue["running"] == 1
    assert queue["oldest_queued_age_seconds"] >= 10 * 60
    chart = snapshot.chart_view(every)
    assert len(chart["t"]) == snapshot.CHART_MINUTES
    assert chart["totals"] == {"succeeded": 1, "failed": 1}
    assert snapshot.host_counts(every) == {"celery@host0": {"processed": 1, "failed": 0},
                                           "celery@host1": {"processed": 1, "failed": 1}}
    # A project token's figures are its project's.
    _, alpha = snapshot.read(db, world["a"])
    assert alpha is not None and alpha["certs"]["by_state"] == {
        "issued": 3, "failed": 1, "revoked": 1}
    assert [f["_id"] for f in alpha["failing"]] == ["crt_snap0006"]


def test_changes_read_incrementally_give_the_same_figures_as_a_fresh_count(
        migrated_db) -> None:
    db = migrated_db
    world = seed(db)
    keeper = snapshot.Keeper(db)
    keeper.refresh()
    now = dbm.server_now(db)
    db[dbm.CERTIFICATES].insert_one({**cert_doc(20, world["b"], now, days=5),
                                     "updated_at": now})
    db[dbm.CERTIFICATES].update_one({"_id": "crt_snap0001"}, {"$set": {
        "status": "failed", "updated_at": now, "failure": cert_doc(
            1, world["a"], now, failed_minutes_ago=1)["failure"]}})
    db[dbm.CERTIFICATES].update_one({"_id": "crt_snap0004"}, {"$set": {
        "status": "deleted", "deleted_at": now, "updated_at": now}})
    db[dbm.CERTIFICATES].update_one({"_id": "crt_snap0006"}, {"$set": {
        "status": "issued", "failure": None, "not_after": now + timedelta(days=90),
        "updated_at": now}})
    db[dbm.JOBS].update_one({"_id": "job00000"}, {"$set": {"state": "running",
                                                           "updated_at": now}})
    db[dbm.JOBS].update_one({"_id": "job00003"}, {"$set": {
        "state": "succeeded", "finished_at": now, "updated_at": now}})
    db[dbm.JOBS].insert_one({**job_doc(30, now, state="queued", kind="k.three"),
                             "updated_at": now})
    # A slot job whose TTL passed: the server deletes it, a write we never see.
    db[dbm.JOBS].insert_one({**job_doc(31, now, state="queued", kind="k.slot",
                                       slot_expire_at=now + timedelta(seconds=1)),
                             "updated_at": now})
    assert keeper.loaded_at
    keeper.refresh()
    assert "k.slot" in [row[0] for row in written(db)[snapshot.ALL_ID]["queue"]["by_kind"]]
    db[dbm.JOBS].delete_one({"_id": "job00031"})
    time.sleep(1.2)
    keeper.refresh()  # catches up: no full load
    incremental = written(db)
    db[snapshot.COLLECTION].delete_many({})
    snapshot.refresh(db)  # from scratch
    fresh = written(db)
    charts = [doc[snapshot.ALL_ID].pop("chart") for doc in (incremental, fresh)]
    assert incremental == fresh
    assert [(sum(c["succeeded"]), sum(c["failed"]), c["hosts"]) for c in charts] == [
        (2, 1, [["celery@host0", 1, 0], ["celery@host1", 2, 1]])] * 2
    every = fresh[snapshot.ALL_ID]
    assert every["certs"]["by_state"] == {"issued": 6, "failed": 1, "pending": 1,
                                          "revoked": 1}
    assert [f["_id"] for f in every["failing"]] == ["crt_snap0001", "crt_snap0007"]
    assert [row[:3] for row in every["queue"]["by_kind"]] == [
        ["k.one", 1, 0], ["k.three", 1, 1], ["k.two", 1, 1]]
    assert every["queue"]["running"] == 1


def test_pages_read_the_figures_one_process_keeps(migrated_db, settings) -> None:
    db = migrated_db
    world = seed(db)
    tokens.clear_cache()
    app = create_app(settings)
    admin, alpha = app.test_client(), app.test_client()
    for client, tok in ((admin, make_admin(db)), (alpha, make_token(db, world["a"],
                                                                     ["read"]))):
        assert client.post("/dashboard/signin", data={"token": tok.token}).status_code == 302
    deadline = time.monotonic() + 60
    while 'id="figures-pending"' in (page := admin.get("/dashboard/").get_data(as_text=True)):
        assert time.monotonic() < deadline, "the keeper wrote no figures"
        time.sleep(0.5)
    assert re.search(r'data-state="issued">6<', page)
    assert re.search(r'data-state="issued">3<', alpha.get("/dashboard/").get_data(
        as_text=True))
    # A project without certificates has no figures document: zeros, not "computing".
    empty = make_project(db, "empty")
    tokens.clear_cache()
    nobody = app.test_client()
    assert nobody.post("/dashboard/signin", data={
        "token": make_token(db, empty, ["read"]).token}).status_code == 302
    page = nobody.get("/dashboard/").get_data(as_text=True)
    assert 'id="figures-pending"' not in page and re.search(r'data-state="issued">0<', page)
    lease = db[dbm.LEASES].find_one({"_id": snapshot.LEASE_ID})
    assert lease is not None and lease["holder"]
    assert admin.get("/dashboard/throughput.json").get_json()["totals"] == {
        "succeeded": 1, "failed": 1}
    jobs = admin.get("/dashboard/jobs").get_data(as_text=True)
    assert re.search(r'id="queued-count">3<', jobs)
    # Another process cannot take the lease while this one keeps the figures.
    from app.db.lease import Lease

    rival = Lease(db[dbm.LEASES], {"_id": snapshot.LEASE_ID}, "other", 30, upsert=True)
    assert rival.acquire() is None


def test_name_prefix_and_expiry_lists_are_index_ranges(migrated_db, settings) -> None:
    db = migrated_db
    now = dbm.server_now(db)
    a = make_project(db, "alpha")
    db[dbm.CERTIFICATES].insert_many(
        [cert_doc(i, a, now, days=i % 30 - 5) for i in range(120)]
        + [cert_doc(200, a, now, status="pending", days=None)])
    tokens.clear_cache()
    client = create_app(settings).test_client()
    assert client.post("/dashboard/signin",
                       data={"token": make_admin(db).token}).status_code == 302
    page = client.get("/dashboard/certificates?name=host001*").get_data(as_text=True)
    assert sorted(set(re.findall(r">(host\d+)\.snap\.example<", page))) == [
        f"host{i:04d}" for i in range(10, 20)]
    # Expiring before a date: every issued one below it, latest expiry first, paged.
    before = (now + timedelta(days=10)).date()
    wanted = sorted((d for d in (cert_doc(i, a, now, days=i % 30 - 5) for i in range(120))
                     if d["not_after"].date() < before),
                    key=lambda d: (d["not_after"], d["_id"]), reverse=True)
    seen: list[str] = []
    url = f"/dashboard/certificates?state=issued&expiring_before={before.isoformat()}"
    while url:
        page = client.get(url).get_data(as_text=True)
        seen.extend(re.findall(r'href="/dashboard/certificates/(crt_snap\d+)"', page))
        found = re.search(r'href="(/dashboard/certificates\?[^"]*cursor=[^"]+)"', page)
        url = found.group(1).replace("&amp;", "&") if found else ""
    assert len(wanted) > 50 and seen == [d["_id"] for d in wanted]  # two pages
