"""MongoLeaseScheduler ticking in-process against the embedded server: one leader, fenced
enqueues, static entries, slot idempotency, an unreachable store, and the status CLI."""

from __future__ import annotations

import json
import logging
import time
from datetime import timedelta

import pymongo
import pytest
from celery import Celery
from click.testing import CliRunner

from app import db as dbm
from app.db.names import FIRES, SCHEDULER_LEASE_ID
from devstack import embedded
from scheduler.entries import slot_key
from scheduler.schedulers import MongoLeaseScheduler
from scheduler.timed import TIMED_WORK

FAST = {"name": "test.fast", "every_seconds": 0.2, "kind": "test.fast"}
TIMED = {w.name for w in TIMED_WORK}


@pytest.fixture
def make_scheduler(migrated_db, settings):
    made: list[MongoLeaseScheduler] = []

    def make(extra=(FAST,), lease=3.0, renew=1.0, retry=0.5, beat_schedule=None):
        app = Celery("scheduler-test", set_as_current=False)
        if beat_schedule:
            app.conf.beat_schedule = beat_schedule
        custom = settings.with_overrides(
            scheduler_lease_seconds=lease, scheduler_renew_seconds=renew,
            scheduler_retry_seconds=retry,
            scheduler_extra_entries=tuple(dict(e, payload=e.get("payload", {}))
                                          for e in extra))
        scheduler = MongoLeaseScheduler(app, settings=custom)
        # Two schedulers in one process: give each its own holder name.
        scheduler.identity = f"{scheduler.identity}-{len(made)}"
        made.append(scheduler)
        return scheduler

    yield make
    for scheduler in made:
        scheduler._closed = False
        scheduler.close()


def lease_doc(db):
    return dbm.primary(db)[dbm.LEASES].find_one({"_id": SCHEDULER_LEASE_ID})


def fires(db, entry="test.fast"):
    return list(dbm.primary(db)[FIRES].find({"entry": entry}).sort("slot", 1))


def expire_lease(db) -> None:
    past = dbm.server_now(db) - timedelta(seconds=1)
    db[dbm.LEASES].update_one({"_id": SCHEDULER_LEASE_ID}, {"$set": {"expires_at": past}})


def settle(scheduler) -> None:
    """Tick until nothing is due. A tick stops firing to renew its lease when the renewal
    falls due (a slow machine can get there before every due entry has fired)."""
    deadline = time.monotonic() + 30
    while scheduler.tick() == 0.0 and time.monotonic() < deadline:
        pass


def tick_for(scheduler, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        delay = scheduler.tick()
        time.sleep(min(delay, max(0.0, deadline - time.monotonic())))


def test_first_tick_acquires_writes_the_schedule_and_enqueues_the_reaper(
        migrated_db, make_scheduler) -> None:
    db = migrated_db
    leader = make_scheduler()
    settle(leader)
    doc = lease_doc(db)
    assert doc["holder"] == leader.identity and doc["term"] == 1
    entries = {d["_id"]: d for d in db[dbm.SCHEDULE].find()}
    assert set(entries) == TIMED | {"test.fast"}
    reap = entries["jobs.reap"]
    assert reap["definition"] == {"kind": "jobs.reap", "payload": {}, "every_seconds": 15.0}
    assert reap["total_run_count"] == 1 and reap["last_term"] == 1
    # The reaper's job, with the slot's dedupe key, and its fire record.
    slot = reap["last_run_at"]
    job = db[dbm.JOBS].find_one({"kind": "jobs.reap"})
    assert job["dedupe_key"] == slot_key("jobs.reap", slot)
    # It expires (TTL) a day after its slot, whatever becomes of it.
    assert job["slot_expire_at"] == slot + timedelta(days=1)
    fire = db[FIRES].find_one({"entry": "jobs.reap"})
    assert (fire["term"], fire["holder"], fire["job_id"]) == (1, leader.identity, job["_id"])
    assert reap["next_run_at"] == slot + timedelta(seconds=15)


def test_exactly_one_leads_and_the_standby_does_nothing_else(
        migrated_db, make_scheduler) -> None:
    db = migrated_db
    a, b = make_scheduler(), make_scheduler()
    a.tick()
    for _ in range(10):
        time.sleep(0.2)
        b.tick()
        a.tick()
    holders = {f["holder"] for f in fires(db)}
    assert holders == {a.identity}
    assert len(fires(db)) >= 5
    assert lease_doc(db)["holder"] == a.identity
    assert b.lease.term is None


def test_renew_on_tick_extends_the_lease_under_the_same_term(migrated_db, make_scheduler) -> None:
    db = migrated_db
    leader = make_scheduler(extra=(), lease=3.0, renew=0.3)
    leader.tick()
    first = lease_doc(db)
    time.sleep(0.4)
    leader.tick()
    second = lease_doc(db)
    assert second["term"] == first["term"] == 1
    assert second["expires_at"] > first["expires_at"]
    assert second["renewed_at"] > first["renewed_at"]


def test_a_leader_with_slow_fires_renews_between_them_when_renewal_is_due(
        migrated_db, make_scheduler) -> None:
    """Many due entries on a slow database: the leader stops firing to renew when its
    renewal is due (not once the lease has run out), then fires the rest."""
    db = migrated_db
    leader = make_scheduler(extra=(), lease=3.0, renew=0.5)
    leader.tick()
    real_fire = leader._fire

    def slow_fire(doc, now):
        time.sleep(0.3)
        real_fire(doc, now)

    leader._fire = slow_fire
    db[dbm.SCHEDULE].update_many({}, {"$set": {
        "next_run_at": dbm.server_now(db) - timedelta(milliseconds=1)}})
    entries = set(db[dbm.SCHEDULE].distinct("_id"))
    due, mark = len(entries), dbm.server_now(db)
    time.sleep(0.5)  # the renewal is due before the first fire
    renewed = lease_doc(db)["renewed_at"]
    fired_before = db[FIRES].count_documents({})
    assert leader.tick() == 0.0  # renewed, fired until the next renewal fell due
    after_one = db[FIRES].count_documents({}) - fired_before
    assert 1 <= after_one <= 2 < due
    assert lease_doc(db)["renewed_at"] > renewed
    tick_for(leader, 0.3 * due + 2)
    assert {f["entry"] for f in db[FIRES].find({"fired_at": {"$gt": mark}})} == entries
    assert lease_doc(db)["term"] == 1  # never lost


def test_release_on_close_lets_the_standby_take_over_at_once(migrated_db, make_scheduler) -> None:
    db = migrated_db
    a, b = make_scheduler(), make_scheduler()
    a.tick()
    b.tick()
    assert b.lease.term is None
    a.close()
    doc = lease_doc(db)
    assert doc["holder"] is None and doc["released_by"] == a.identity
    started = time.monotonic()
    b.tick()
    assert time.monotonic() - started < 2
    assert lease_doc(db)["holder"] == b.identity and b.lease.term == 2
    # A closed scheduler stays quiet even if ticked again.
    a.tick()
    assert lease_doc(db)["holder"] == b.identity


def test_a_deposed_leader_is_refused_before_it_can_enqueue(
        migrated_db, make_scheduler, caplog) -> None:
    db = migrated_db
    # A renewal interval longer than b's first tick (which fires every due timed entry,
    # slow on a loaded machine): a must try to fire, not first notice the loss by renewing.
    a, b = make_scheduler(lease=20.0, renew=10.0), make_scheduler(lease=20.0, renew=10.0)
    a.tick()
    expire_lease(db)
    b.tick()  # takes over with term 2 (and fires what is due)
    assert lease_doc(db)["term"] == 2
    # a still believes in its lease (as a paused process would on waking) and the entry
    # is due again: a tries to fire, and the server refuses it inside the transaction.
    assert a.lease.held()
    a._next_renew = time.monotonic() + 60  # not due to renew: it goes straight to firing
    time.sleep(0.25)
    before = {f["slot"] for f in fires(db)}
    with caplog.at_level(logging.WARNING, logger="certautopilot.scheduler"):
        a.tick()
    assert "refused to enqueue" in caplog.text
    assert a.lease.term is None
    assert all(f["term"] == 2 for f in fires(db) if f["slot"] not in before)
    assert not [f for f in fires(db) if f["holder"] == a.identity and f["term"] != 1]
    # The slot a could not fire is still due, and the new leader fires it.
    due_before = db[dbm.SCHEDULE].find_one({"_id": "test.fast"})["next_run_at"]
    b.tick()
    assert db[dbm.SCHEDULE].find_one({"_id": "test.fast"})["last_run_at"] >= due_before


def test_store_unreachable_the_leader_stops_enqueuing_and_says_so(
        migrated_db, make_scheduler, caplog) -> None:
    db = migrated_db
    # Lease long enough to outlast the first tick, which fires every due timed entry
    # (slow on a loaded machine), and the unreachable spell after it.
    leader = make_scheduler(lease=10.0, renew=0.2)
    leader.tick()
    assert leader.lease.held()
    dead = pymongo.MongoClient(f"mongodb://127.0.0.1:{embedded.free_port()}/?replicaSet=x",
                               serverSelectionTimeoutMS=200, connectTimeoutMS=200,
                               tz_aware=True)
    try:
        real_db = leader._db
        leader._db = dead.get_database(db.name)
        leader.lease.db = leader._db
        count = len(fires(db))
        time.sleep(0.3)
        with caplog.at_level(logging.ERROR, logger="certautopilot.scheduler"):
            delay = leader.tick()
            leader.tick()
        assert "cannot renew the scheduler lease" in caplog.text
        assert caplog.text.count("cannot renew the scheduler lease") == 1  # said once
        assert delay == pytest.approx(0.5)
        assert leader._suspended
        assert len(fires(db)) == count
        # The database is back before the lease ran out: renewed, same term, resumed.
        leader._db = real_db
        leader.lease.db = real_db
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="certautopilot.scheduler"):
            tick_for(leader, 0.6)
        assert "resuming enqueues" in caplog.text
        assert lease_doc(db)["term"] == 1
        assert len(fires(db)) > count
    finally:
        dead.close()


def test_a_standby_that_cannot_reach_the_store_keeps_waiting(make_scheduler, caplog) -> None:
    standby = make_scheduler()
    dead = pymongo.MongoClient(f"mongodb://127.0.0.1:{embedded.free_port()}/?replicaSet=x",
                               serverSelectionTimeoutMS=200, connectTimeoutMS=200,
                               tz_aware=True)
    try:
        standby._db = dead.get_database("x")
        with caplog.at_level(logging.WARNING, logger="certautopilot.scheduler"):
            assert standby.tick() == pytest.approx(0.5)
            assert standby.tick() == pytest.approx(0.5)
        assert caplog.text.count("standby cannot reach the database") == 1  # said once
        assert standby.lease.term is None
    finally:
        dead.close()


def test_static_entries_keep_run_metadata_and_removed_ones_are_deleted(
        migrated_db, make_scheduler) -> None:
    db = migrated_db
    a = make_scheduler(extra=(FAST, {"name": "old", "every_seconds": 60, "kind": "k"}))
    settle(a)
    fast = db[dbm.SCHEDULE].find_one({"_id": "test.fast"})
    db[dbm.SCHEDULE].insert_one({"_id": "dynamic", "definition": {
        "kind": "k", "payload": {}, "every_seconds": 3600.0}, "source": "api",
        "next_run_at": dbm.server_now(db) + timedelta(hours=1), "total_run_count": 0})
    a.close()
    # The next release of the software: test.fast every 0.4 s, "old" gone, "new" added.
    b = make_scheduler(extra=(dict(FAST, every_seconds=0.4),
                              {"name": "new", "every_seconds": 60, "kind": "k"}))
    b.tick()
    entries = {d["_id"]: d for d in db[dbm.SCHEDULE].find()}
    assert set(entries) == TIMED | {"test.fast", "new", "dynamic"}
    assert entries["test.fast"]["definition"]["every_seconds"] == 0.4
    assert entries["test.fast"]["total_run_count"] >= fast["total_run_count"]
    assert entries["test.fast"]["last_run_at"] >= fast["last_run_at"]


def test_a_slot_is_enqueued_once_even_if_fired_twice(migrated_db, make_scheduler) -> None:
    db = migrated_db
    leader = make_scheduler(extra=({"name": "hourly", "every_seconds": 3600, "kind": "k"},))
    settle(leader)
    doc = db[dbm.SCHEDULE].find_one({"_id": "hourly"})
    key = slot_key("hourly", doc["last_run_at"])
    assert db[dbm.JOBS].count_documents({"dedupe_key": key}) == 1
    # Fire the same slot again from a stale read of the entry: refused (compare-and-set).
    stale = dict(doc, next_run_at=doc["last_run_at"])
    leader._fire(stale, dbm.server_now(db))
    # Even if the entry is deleted and re-created as due, its slot is not enqueued again.
    db[dbm.SCHEDULE].update_one({"_id": "hourly"},
                                {"$set": {"next_run_at": doc["last_run_at"]}})
    db[dbm.JOBS].update_many({"dedupe_key": key}, {"$set": {"state": "succeeded"}})
    leader._fire(db[dbm.SCHEDULE].find_one({"_id": "hourly"}), dbm.server_now(db))
    assert db[dbm.JOBS].count_documents({"dedupe_key": key}) == 1
    assert db[FIRES].count_documents({"entry": "hourly"}) == 1
    # ...and the entry moved past it instead of retrying forever.
    assert db[dbm.SCHEDULE].find_one({"_id": "hourly"})["next_run_at"] > doc["last_run_at"]


def test_a_slot_joins_the_entrys_job_while_it_still_waits_for_a_worker(
        migrated_db, make_scheduler, cap_env) -> None:
    from app.cli import cli

    db = migrated_db
    leader = make_scheduler(extra=({"name": "sweep", "every_seconds": 0.3, "kind": "k"},))

    def next_fire() -> dict:
        count = len(fires(db, "sweep"))
        deadline = time.monotonic() + 10
        while len(fires(db, "sweep")) == count and time.monotonic() < deadline:
            time.sleep(min(leader.tick(), 0.1))
        return fires(db, "sweep")[-1]

    first = next_fire()
    job_a = first["job_id"]
    assert "coalesced" not in first
    # No worker has claimed it: the next slots join it, no second job is queued.
    for _ in range(2):
        joined = next_fire()
        assert joined["coalesced"] is True and joined["job_id"] == job_a
        assert joined["dedupe_key"] == slot_key("sweep", joined["slot"])
    assert db[dbm.JOBS].count_documents({"kind": "k"}) == 1
    entry = db[dbm.SCHEDULE].find_one({"_id": "sweep"})
    assert entry["last_job_id"] == job_a and entry["total_run_count"] == 3
    # Once a worker runs it, a slot needs a job of its own (the running one may have
    # read what was due before the slot).
    db[dbm.JOBS].update_one({"_id": job_a}, {"$set": {"state": "running"}})
    job_b = next_fire()
    assert "coalesced" not in job_b and job_b["job_id"] != job_a
    # A job put off to later (a retry's backoff) does not take the next slots either.
    db[dbm.JOBS].update_one({"_id": job_b["job_id"]}, {"$set": {
        "run_after": dbm.server_now(db) + timedelta(minutes=5)}})
    job_c = next_fire()
    assert "coalesced" not in job_c and job_c["job_id"] not in (job_a, job_b["job_id"])
    # Nor does a waiting job of the entry's former definition (another payload).
    db[dbm.JOBS].update_one({"_id": job_c["job_id"]}, {"$set": {"payload": {"old": 1}}})
    job_d = next_fire()
    assert "coalesced" not in job_d and job_d["job_id"] != job_c["job_id"]
    assert next_fire()["job_id"] == job_d["job_id"]  # the current definition's job: joined
    assert db[dbm.JOBS].count_documents({"kind": "k"}) == 4
    # Operators see it: the status CLI names the joined job.
    result = CliRunner().invoke(cli, ["scheduler", "status", "--fires", "50"])
    assert result.exit_code == 0, result.output
    assert f"joined queued job {job_a}" in result.output


def test_beat_schedule_items_run_as_jobs(migrated_db, make_scheduler) -> None:
    db = migrated_db
    leader = make_scheduler(extra=(), beat_schedule={
        "from-celery": {"task": "test.celery", "schedule": 30.0, "kwargs": {"x": 1}}})
    settle(leader)
    job = db[dbm.JOBS].find_one({"kind": "test.celery"})
    assert job is not None and job["payload"] == {"x": 1}


def test_banner_shows_holder_term_and_timeouts(migrated_db, make_scheduler) -> None:
    leader = make_scheduler(lease=15, renew=5, retry=2)
    leader.tick()
    info = leader.info
    assert f"holder -> {leader.identity}" in info
    assert "term 1" in info
    assert "lease 15s, renew every 5s, standby retry 2s" in info
    assert "jobs.reap every 15s" in info


def test_status_cli_shows_holder_term_expiry_and_entries(
        migrated_db, make_scheduler, cap_env) -> None:
    from app.cli import cli

    leader = make_scheduler()
    leader.tick()
    runner = CliRunner()
    result = runner.invoke(cli, ["scheduler", "status"])
    assert result.exit_code == 0, result.output
    assert leader.identity in result.output
    assert "term:         1" in result.output
    assert "lease:        held" in result.output
    assert "jobs.reap" in result.output and "test.fast" in result.output
    result = runner.invoke(cli, ["scheduler", "status", "--json", "--fires", "3"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["lease"]["holder"] == leader.identity and data["lease"]["term"] == 1
    assert data["lease"]["expires_in_s"] > 0
    assert {e["name"] for e in data["entries"]} == TIMED | {"test.fast"}
    assert all(e["next_run_at"] for e in data["entries"])
    assert data["recent_fires"]


def test_recent_fires_are_the_newest_whatever_window_holds_them(migrated_db) -> None:
    """``recent_fires`` reads windows below now: the newest fires come first whether the
    first window holds the whole page, part of it, or none (a paused schedule)."""
    from app.db.schedule import recent_fires

    db = migrated_db
    now = dbm.server_now(db)
    ages = [timedelta(seconds=30), timedelta(minutes=5), timedelta(hours=2),
            timedelta(hours=3), timedelta(hours=20), timedelta(hours=21)]
    db[FIRES].insert_many([{"entry": "e", "slot": now - age, "term": 1,
                            "fired_at": now - age} for age in ages])
    for limit in (1, 2, 3, 5, 6, 10):
        got = [now - f["fired_at"] for f in recent_fires(db, limit)]
        assert got == ages[:limit], limit
    db[FIRES].delete_many({"fired_at": {"$gte": now - timedelta(hours=6)}})
    assert [now - f["fired_at"] for f in recent_fires(db, 1)] == [timedelta(hours=20)]
