"""Durable jobs against the embedded server, in process: enqueue, claim, heartbeat,
fencing, failures and backoff, the reaper, operator actions, queue depth."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from datetime import timedelta

import pytest
from click.testing import CliRunner
from prometheus_client import CollectorRegistry, generate_latest

import tests.helpers.job_kinds as kinds
from app import db as dbm
from app import jobs
from app.audit import system_actor
from app.config import load_settings
from app.db.clock import server_now
from app.db.lease import new_token
from app.jobs import broker, lifecycle, runner
from app.jobs.context import JobContext, LeaseKeeper
from app.jobs.metrics import QueueDepthCollector
from app.jobs.reaper import release_orphans
from tests.helpers import wait_for
from tests.helpers.jobs import broker_messages


@pytest.fixture
def jsettings(jenv):
    return load_settings()


@pytest.fixture
def jdb(jsettings, migrated_db):
    return migrated_db


def _job(db, job_id):
    return db[dbm.JOBS].find_one({"_id": job_id})


def _expire_lease(db, job_id):
    """Make the job's lease lapse now (as if its worker stopped heartbeating)."""
    past = server_now(db) - timedelta(seconds=1)
    db[dbm.JOBS].update_one({"_id": job_id}, {"$set": {"lease.expires_at": past}})


# ----------------------------------------------------------------------------- enqueue


def test_enqueue_stores_the_job_and_publishes_a_wakeup_holding_only_its_id(jdb, jsettings):
    job = jobs.enqueue(jdb, "test.noop", {"x": 1}, project_id="p1")
    stored = _job(jdb, job["_id"])
    assert stored["state"] == "queued" and stored["kind"] == "test.noop"
    assert stored["payload"] == {"x": 1} and stored["attempts"] == 0
    assert stored["project_id"] == "p1" and stored["lease"] is None
    messages = broker_messages(jdb.client, jsettings.broker_db)
    assert messages == [{"task": broker.RUN_JOB_TASK, "args": [job["_id"]], "kwargs": {},
                         "eta": None}]


def test_dedupe_key_returns_the_active_job_and_frees_once_it_finished(jdb, jsettings):
    first = jobs.enqueue(jdb, "test.noop", {}, dedupe_key="renew:crt1")
    again = jobs.enqueue(jdb, "test.noop", {"other": True}, dedupe_key="renew:crt1")
    assert again["_id"] == first["_id"]
    assert jdb[dbm.JOBS].count_documents({}) == 1
    assert len(broker_messages(jdb.client, jsettings.broker_db)) == 1
    claimed = jobs.claim(jdb, first["_id"], "w")
    assert jobs.enqueue(jdb, "test.noop", {}, dedupe_key="renew:crt1")["_id"] == first["_id"]
    assert jobs.complete(jdb, first["_id"], claimed["lease"]["token"])
    later = jobs.enqueue(jdb, "test.noop", {}, dedupe_key="renew:crt1")
    assert later["_id"] != first["_id"]


def test_enqueue_in_a_transaction_commits_with_it_and_publishes_nothing(jdb, jsettings):
    def create(session):
        return jobs.enqueue(jdb, "test.noop", {}, dedupe_key="k", session=session)

    job = dbm.transaction(jdb, create)
    assert _job(jdb, job["_id"])["state"] == "queued"
    assert broker_messages(jdb.client, jsettings.broker_db) == []
    # The same key inside another transaction returns the active job.
    assert dbm.transaction(jdb, create)["_id"] == job["_id"]

    def aborted(session):
        jobs.enqueue(jdb, "test.noop", {}, dedupe_key="other", session=session)
        raise RuntimeError("caller failed")

    with pytest.raises(RuntimeError):
        dbm.transaction(jdb, aborted)
    assert jdb[dbm.JOBS].count_documents({"dedupe_key": "other"}) == 0
    assert jobs.publish_wakeup(job["_id"]) is True
    assert broker_messages(jdb.client, jsettings.broker_db)[0]["args"] == [job["_id"]]


@pytest.mark.parametrize("kind,payload,kwargs,message", [
    ("Bad Kind", {}, {}, "job kind"),
    ("", {}, {}, "job kind"),
    ("test.noop", ["not", "a", "dict"], {}, "payload must be a dict"),
    ("test.noop", {"x": object()}, {}, "cannot be stored"),
    ("test.noop", {}, {"dedupe_key": ""}, "dedupe_key"),
    ("test.noop", {}, {"run_after": "tomorrow"}, "run_after"),
])
def test_bad_enqueue_arguments_are_refused_and_store_nothing(jdb, kind, payload, kwargs,
                                                             message):
    with pytest.raises(jobs.InvalidJob) as info:
        jobs.enqueue(jdb, kind, payload, **kwargs)
    assert message in str(info.value)
    assert jdb[dbm.JOBS].count_documents({}) == 0


def test_a_delayed_job_is_not_claimed_before_it_is_due(jdb, jsettings):
    job = jobs.enqueue(jdb, "test.noop", {}, run_after=server_now(jdb) + timedelta(seconds=30))
    [message] = broker_messages(jdb.client, jsettings.broker_db)
    assert message["eta"] is not None  # published with a countdown
    jdb.client[jsettings.broker_db][dbm.MESSAGES_COLLECTION].delete_many({})
    assert jobs.claim(jdb, job["_id"], "w") is None
    # The early wake-up was answered by one for when the job is due.
    [again] = broker_messages(jdb.client, jsettings.broker_db)
    assert again["eta"] is not None and _job(jdb, job["_id"])["state"] == "queued"


def test_a_job_due_beyond_the_countdown_limit_is_published_by_the_reaper_when_due(jdb,
                                                                                 jsettings):
    far = server_now(jdb) + timedelta(seconds=broker.MAX_COUNTDOWN_SECONDS + 60)
    job = jobs.enqueue(jdb, "test.noop", {}, run_after=far)
    assert broker_messages(jdb.client, jsettings.broker_db) == []
    assert jobs.reap(jdb)["republished"] == 0
    jdb[dbm.JOBS].update_one({"_id": job["_id"]}, {"$set": {
        "run_after": server_now(jdb), "wake_at": server_now(jdb) - timedelta(seconds=3)}})
    assert jobs.reap(jdb)["republished"] == 1
    assert broker_messages(jdb.client, jsettings.broker_db)[0]["args"] == [job["_id"]]


# ------------------------------------------------------------------------------- claim


def test_claim_takes_a_fresh_lease_on_the_servers_clock(jdb, jsettings):
    job = jobs.enqueue(jdb, "test.noop", {})
    before = dbm.server_now(jdb)
    claimed = jobs.claim(jdb, job["_id"], "host:1")
    after = dbm.server_now(jdb)
    stored = _job(jdb, job["_id"])
    assert stored["state"] == "running" and stored["attempts"] == 1
    assert stored["lease"]["owner"] == "host:1"
    assert stored["lease"]["token"] == claimed["lease"]["token"]
    lease = timedelta(seconds=jsettings.job_lease_seconds)
    tolerance = timedelta(milliseconds=500)
    assert before + lease - tolerance <= stored["lease"]["expires_at"] <= after + lease + tolerance
    assert [h["event"] for h in stored["history"]] == ["enqueued", "claimed"]


def test_a_second_claim_under_a_live_lease_or_after_the_end_is_a_noop(jdb):
    job = jobs.enqueue(jdb, "test.noop", {})
    first = jobs.claim(jdb, job["_id"], "a")
    assert jobs.claim(jdb, job["_id"], "b") is None
    assert _job(jdb, job["_id"])["lease"]["token"] == first["lease"]["token"]
    assert jobs.complete(jdb, job["_id"], first["lease"]["token"], {"done": 1})
    assert jobs.claim(jdb, job["_id"], "b") is None
    assert _job(jdb, job["_id"])["state"] == "succeeded"
    assert jobs.claim(jdb, "0" * 24, "b") is None
    assert jobs.claim(jdb, "not-an-id", "b") is None


def test_lease_expiry_is_decided_on_the_servers_clock(jdb):
    """Fails if the lapsed-lease comparison is wrong (e.g. $$NOW on the embedded server)."""
    job = jobs.enqueue(jdb, "test.noop", {})
    jobs.claim(jdb, job["_id"], "a")
    now = server_now(jdb)
    jdb[dbm.JOBS].update_one({"_id": job["_id"]},
                             {"$set": {"lease.expires_at": now + timedelta(seconds=5)}})
    assert jobs.claim(jdb, job["_id"], "b") is None
    jdb[dbm.JOBS].update_one({"_id": job["_id"]},
                             {"$set": {"lease.expires_at": now - timedelta(seconds=1)}})
    assert jobs.claim(jdb, job["_id"], "b")["lease"]["owner"] == "b"


def test_fencing_a_lapsed_holder_cannot_complete_fail_or_heartbeat(jdb):
    job = jobs.enqueue(jdb, "test.noop", {})
    old = jobs.claim(jdb, job["_id"], "a")["lease"]["token"]
    _expire_lease(jdb, job["_id"])
    # Even before anyone re-claimed it, a lapsed lease completes nothing.
    assert jobs.complete(jdb, job["_id"], old) is False
    assert jobs.heartbeat(jdb, job["_id"], old) is None
    new = jobs.claim(jdb, job["_id"], "b")["lease"]["token"]
    assert new != old
    assert jobs.complete(jdb, job["_id"], old) is False
    assert jobs.fail(jdb, job["_id"], old, "x", attempts=2) is None
    assert jobs.heartbeat(jdb, job["_id"], new) is not None
    assert jobs.complete(jdb, job["_id"], new, {"by": "b"})
    stored = _job(jdb, job["_id"])
    assert stored["state"] == "succeeded" and stored["result"] == {"by": "b"}
    assert stored["attempts"] == 2
    assert "complete_refused" in [h["event"] for h in stored["history"]]
    # Completing twice with the winning token is idempotent (a retried write).
    assert jobs.complete(jdb, job["_id"], new, {"by": "b"}) is True


def test_a_lapsed_job_with_no_attempts_left_goes_dead_on_claim(jdb):
    job = jobs.enqueue(jdb, "test.noop", {})
    jobs.claim(jdb, job["_id"], "a")
    jdb[dbm.JOBS].update_one({"_id": job["_id"]}, {"$set": {"attempts": 5}})
    _expire_lease(jdb, job["_id"])
    assert jobs.claim(jdb, job["_id"], "b") is None
    stored = _job(jdb, job["_id"])
    assert stored["state"] == "dead" and "lapsed" in stored["last_error"]


# ------------------------------------------------------------------- fenced transaction


def test_fenced_transaction_commits_effect_and_completion_together(jdb):
    job = jobs.enqueue(jdb, "test.ledger", {"n": 7})
    claimed = jobs.claim(jdb, job["_id"], "a")
    token = claimed["lease"]["token"]

    def write(session):
        jdb.ledger.insert_one({"job_id": job["_id"]}, session=session)
        return {"rows": 1}

    assert jobs.fenced_transaction(jdb, job["_id"], token, write, complete=True) == {"rows": 1}
    stored = _job(jdb, job["_id"])
    assert stored["state"] == "succeeded" and stored["result"] == {"rows": 1}
    assert jdb.ledger.count_documents({}) == 1
    # The same token again: refused, nothing written.
    with pytest.raises(jobs.LeaseLost):
        jobs.fenced_transaction(jdb, job["_id"], token, write, complete=True)
    assert jdb.ledger.count_documents({}) == 1


def test_fenced_transaction_writes_nothing_once_the_lease_is_gone(jdb):
    job = jobs.enqueue(jdb, "test.ledger", {"n": 1})
    old = jobs.claim(jdb, job["_id"], "a")["lease"]["token"]
    _expire_lease(jdb, job["_id"])
    jobs.claim(jdb, job["_id"], "b")

    def write(session):
        jdb.ledger.insert_one({"job_id": job["_id"], "by": "a"}, session=session)

    with pytest.raises(jobs.LeaseLost):
        jobs.fenced_transaction(jdb, job["_id"], old, write)
    assert jdb.ledger.count_documents({}) == 0
    assert _job(jdb, job["_id"])["state"] == "running"


# --------------------------------------------------------------- runner (in process)


def _run(jdb, jsettings, job_id, worker="w:1"):
    return runner.run_job(job_id, db=jdb, settings=jsettings, worker=worker)


def test_run_job_completes_with_the_handlers_result(jdb, jsettings):
    job = jobs.enqueue(jdb, "test.validated", {"name": "x"})
    assert _run(jdb, jsettings, job["_id"]) == "succeeded"
    stored = _job(jdb, job["_id"])
    assert stored["state"] == "succeeded" and stored["result"] == {"hello": "x"}
    assert [h["event"] for h in stored["history"]] == ["enqueued", "claimed", "succeeded"]


def test_a_raising_handler_is_retried_with_backoff_then_dead(jdb, jsettings):
    job = jobs.enqueue(jdb, "test.raise", {})
    delays = []
    for attempt in (1, 2):
        assert _run(jdb, jsettings, job["_id"]) == "retry"
        stored = _job(jdb, job["_id"])
        assert stored["state"] == "queued" and stored["attempts"] == attempt
        assert stored["last_error"] == f"RuntimeError: boom on attempt {attempt}"
        delay = (stored["run_after"] - server_now(jdb)).total_seconds()
        delays.append(stored["history"][-1]["retry_in"])
        assert 0 < delay <= 1.0
        assert _run(jdb, jsettings, job["_id"]) == "skipped"  # not due yet
        jdb[dbm.JOBS].update_one({"_id": job["_id"]}, {"$set": {"run_after": server_now(jdb)}})
    # base 0.2 s doubling, jittered into [0.5, 1) of the nominal value.
    # Stored rounded to 3 decimals: a delay just under the bound can read as the bound.
    assert 0.1 <= delays[0] <= 0.2 and 0.2 <= delays[1] <= 0.4
    assert _run(jdb, jsettings, job["_id"]) == "dead"
    stored = _job(jdb, job["_id"])
    assert stored["state"] == "dead" and stored["attempts"] == 3
    assert stored["last_error"] == "RuntimeError: boom on attempt 3"


def test_retry_later_does_not_spend_attempts(jdb, jsettings):
    job = jobs.enqueue(jdb, "test.retry_later", {"times": 3})  # max_attempts=1
    for _ in range(3):
        assert _run(jdb, jsettings, job["_id"]) == "retry_later"
        assert _job(jdb, job["_id"])["attempts"] == 0
        jdb[dbm.JOBS].update_one({"_id": job["_id"]}, {"$set": {"run_after": server_now(jdb)}})
    assert _run(jdb, jsettings, job["_id"]) == "succeeded"
    assert _job(jdb, job["_id"])["result"] == {"runs": 4}


def test_permanent_failure_is_dead_at_once(jdb, jsettings):
    job = jobs.enqueue(jdb, "test.permanent", {})
    assert _run(jdb, jsettings, job["_id"]) == "dead"
    stored = _job(jdb, job["_id"])
    assert stored["attempts"] == 1
    assert stored["last_error"] == "permanent failure: the certificate was deleted"


@pytest.mark.parametrize("doc,outcome,state,message", [
    ({"kind": 42, "payload": {}}, "dead", "dead", "kind 42 is not a job kind"),
    ({"payload": {}}, "dead", "dead", "kind None is not a job kind"),
    ({"kind": "test.noop", "payload": "text"}, "dead", "dead",
     "malformed payload for test.noop: expected an object, got str"),
    ({"kind": "test.validated", "payload": {"name": 3}}, "dead", "dead",
     "invalid payload for test.validated: payload.name must be a string"),
    ({"kind": "no.such_kind", "payload": {}}, "retry", "queued",
     "unknown job kind 'no.such_kind': no handler is registered"),
])
def test_malformed_or_unknown_jobs_fail_with_a_clear_error(jdb, jsettings, doc, outcome,
                                                           state, message):
    now = server_now(jdb)
    job_id = new_token()[:24]
    jdb[dbm.JOBS].insert_one({"_id": job_id, "state": "queued", "attempts": 0,
                              "run_after": now, "wake_at": now, **doc})
    assert _run(jdb, jsettings, job_id) == outcome
    stored = _job(jdb, job_id)
    assert stored["state"] == state and message in stored["last_error"]


def test_malformed_wakeups_are_dropped(jdb, jsettings):
    for bad in (None, 42, "", "x" * 24, {"id": 1}, ["a"]):
        assert runner.run_job(bad, db=jdb, settings=jsettings) == "invalid"
    assert _run(jdb, jsettings, "f" * 24) == "skipped"


def test_a_handler_that_loses_its_lease_does_not_complete(jdb, jsettings):
    job = jobs.enqueue(jdb, "test.sleep", {"seconds": 1.5})

    def steal():
        time.sleep(0.5)
        _expire_lease(jdb, job["_id"])
        jobs.claim(jdb, job["_id"], "thief")

    thief = threading.Thread(target=steal)
    thief.start()
    assert _run(jdb, jsettings, job["_id"]) == "lease_lost"
    thief.join()
    stored = _job(jdb, job["_id"])
    assert stored["state"] == "running" and stored["lease"]["owner"] == "thief"
    assert jdb[kinds.LEDGER].count_documents({}) == 0


def test_the_lease_keeper_renews_and_reports_a_stolen_lease(jdb, jsettings):
    job = jobs.enqueue(jdb, "test.noop", {})
    claimed = jobs.claim(jdb, job["_id"], "a", lease_seconds=0.9)
    ctx = JobContext(jdb, claimed, worker="a", lease_seconds=0.9, settings=jsettings)
    keeper = LeaseKeeper(ctx).start()
    try:
        first = _job(jdb, job["_id"])["lease"]["expires_at"]
        time.sleep(1.5)  # past the original lease: renewed meanwhile
        assert _job(jdb, job["_id"])["lease"]["expires_at"] > first
        ctx.check_lease()
        jdb[dbm.JOBS].update_one({"_id": job["_id"]}, {"$set": {"lease.token": "stolen"}})
        assert ctx.cancelled.wait(3)
        with pytest.raises(jobs.LeaseLost):
            ctx.check_lease()
    finally:
        keeper.stop()


def test_a_paused_process_sees_its_lease_lost_before_any_heartbeat(jdb, jsettings):
    job = jobs.enqueue(jdb, "test.noop", {})
    claimed = jobs.claim(jdb, job["_id"], "a", lease_seconds=0.3)
    ctx = JobContext(jdb, claimed, worker="a", lease_seconds=0.3, settings=jsettings)
    ctx.check_lease()
    time.sleep(0.4)  # no keeper: as if the process was stopped
    with pytest.raises(jobs.LeaseLost):
        ctx.check_lease()


def test_draining_releases_the_lease_of_an_abandoned_job(jdb, jsettings):
    job = jobs.enqueue(jdb, "test.sleep", {"seconds": 5})
    outcome = []
    thread = threading.Thread(target=lambda: outcome.append(_run(jdb, jsettings,
                                                                 job["_id"])))
    thread.start()
    wait = time.monotonic() + 5
    while not runner.running_jobs() and time.monotonic() < wait:
        time.sleep(0.02)
    runner.begin_drain(0.2, exit_after=False)
    thread.join(10)
    assert outcome == ["lease_lost"]
    # The handler may unwind before the release commits (it is told first): wait for it.
    # Nothing else here requeues a running job (no reaper runs in this test).
    wait_for(lambda: _job(jdb, job["_id"])["state"] == "queued", timeout=10,
             message="the abandoned job's lease released")
    stored = _job(jdb, job["_id"])
    assert stored["state"] == "queued" and stored["attempts"] == 0
    assert stored["history"][-1]["event"] == "released"
    # A draining worker takes no new job: it hands the wake-up back.
    other = jobs.enqueue(jdb, "test.noop", {})
    assert _run(jdb, jsettings, other["_id"]) == "deferred"
    assert _job(jdb, other["_id"])["state"] == "queued"


STUCK_HANDLER = """
import sys, threading, time
from app.jobs import runner
from app.jobs.registry import load_modules
load_modules(("tests.helpers.job_kinds",))
runner.STUCK_HANDLER_EXIT_SECONDS = 1.0
threading.Thread(target=runner.run_job, args=(sys.argv[1],), daemon=True).start()
while not runner.running_jobs():
    time.sleep(0.02)
runner.begin_drain(0.2, exit_after=False)  # as in a prefork pool process
time.sleep(60)
sys.exit(3)
"""


def test_a_pool_process_whose_handler_ignores_the_lost_lease_exits_anyway(jdb, jenv):
    job = jobs.enqueue(jdb, "test.sleep", {"seconds": 120, "unchecked": True})
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", STUCK_HANDLER, job["_id"]], env=jenv,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert time.monotonic() - started < 30
    assert "a handler ignored the loss of its lease" in done.stderr
    stored = _job(jdb, job["_id"])
    assert stored["state"] == "queued" and stored["history"][-1]["event"] == "released"


# ------------------------------------------------------------------------------ reaper


def test_reaper_requeues_lapsed_jobs_and_kills_exhausted_ones(jdb, jsettings):
    alive = jobs.enqueue(jdb, "test.noop", {})
    lapsed = jobs.enqueue(jdb, "test.noop", {})
    spent = jobs.enqueue(jdb, "test.noop", {})
    for job in (alive, lapsed, spent):
        jobs.claim(jdb, job["_id"], "w")
    jdb[dbm.JOBS].update_one({"_id": spent["_id"]}, {"$set": {"attempts": 5}})
    _expire_lease(jdb, lapsed["_id"])
    _expire_lease(jdb, spent["_id"])
    jdb.client[jsettings.broker_db][dbm.MESSAGES_COLLECTION].delete_many({})
    counts = jobs.reap(jdb)
    assert counts["requeued"] == 1 and counts["dead"] == 1
    assert _job(jdb, alive["_id"])["state"] == "running"
    assert _job(jdb, lapsed["_id"])["state"] == "queued"
    assert _job(jdb, lapsed["_id"])["lease"] is None
    assert _job(jdb, spent["_id"])["state"] == "dead"
    assert [m["args"] for m in broker_messages(jdb.client, jsettings.broker_db)] == \
        [[lapsed["_id"]]]


def _worker_doc(db, name, owners, seen_ago, state="running"):
    seen = server_now(db) - timedelta(seconds=seen_ago)
    db[dbm.WORKERS].insert_one({"_id": name, "state": state, "owners": owners,
                                "last_seen": seen, "running_jobs": []})


def test_the_jobs_of_a_worker_whose_heartbeat_stopped_are_taken_back_before_their_lease(
        jdb, jsettings):
    """kill -9 of a worker: a peer sees three beats missed and requeues what it held,
    without waiting for the 60 s job lease; owners a live worker also lists (a restarted
    container reusing host and pids) and live workers' jobs are left alone."""
    held = {owner: jobs.enqueue(jdb, "test.noop", {}) for owner in
            ("h:10", "h:11", "h:20", "h:30")}
    spent = jobs.enqueue(jdb, "test.noop", {})
    for owner, job in held.items():
        jobs.claim(jdb, job["_id"], owner, lease_seconds=60)
    jobs.claim(jdb, spent["_id"], "h:11", lease_seconds=60)
    jdb[dbm.JOBS].update_one({"_id": spent["_id"]}, {"$set": {"attempts": 5}})
    _worker_doc(jdb, "dead", ["h:10", "h:11"], seen_ago=40)
    _worker_doc(jdb, "live", ["h:20", "h:30"], seen_ago=1)
    _worker_doc(jdb, "old-incarnation", ["h:30"], seen_ago=40)
    _worker_doc(jdb, "stopped", ["h:40"], seen_ago=40, state="stopped")
    jdb.client[jsettings.broker_db][dbm.MESSAGES_COLLECTION].delete_many({})

    counts = release_orphans(jdb, dead_after=15)
    assert counts == {"lost": 2, "requeued": 2, "dead": 1}
    for owner in ("h:10", "h:11"):
        job = _job(jdb, held[owner]["_id"])
        assert job["state"] == "queued" and job["lease"] is None
        assert job["history"][-1]["event"] == "requeued"
        assert job["history"][-1]["reason"] == "worker lost"
        assert job["history"][-1]["previous_owner"] == owner
        assert "heartbeat stopped" in job["last_error"]
    assert _job(jdb, spent["_id"])["state"] == "dead"
    for owner in ("h:20", "h:30"):
        assert _job(jdb, held[owner]["_id"])["state"] == "running"
    states = {w["_id"]: w["state"] for w in jdb[dbm.WORKERS].find()}
    assert states == {"dead": "lost", "live": "running", "old-incarnation": "lost",
                      "stopped": "stopped"}
    assert sorted(m["args"][0] for m in broker_messages(jdb.client, jsettings.broker_db)) \
        == sorted([held["h:10"]["_id"], held["h:11"]["_id"]])
    # Once marked lost, a worker is not looked at again.
    assert release_orphans(jdb, dead_after=15) == \
        {"lost": 0, "requeued": 0, "dead": 0}


def test_a_heartbeat_takes_back_lost_workers_jobs_only_while_its_own_beats_are_on_time(
        jdb, jsettings):
    """After a database outage every heartbeat is old, and on a saturated database every
    beat is late: a worker calls a peer lost only when its own beats have reached the
    database for ``dead_after`` without failing, never ``dead_after / 2`` apart."""
    from app.jobs.workers import WorkerHeartbeat

    job = jobs.enqueue(jdb, "test.noop", {})
    jobs.claim(jdb, job["_id"], "h:10", lease_seconds=60)
    _worker_doc(jdb, "peer", ["h:10"], seen_ago=40)
    beat = WorkerHeartbeat(lambda: jdb, jsettings, node="me", pool="solo", concurrency=1,
                           running=list, interval=5)
    assert beat.dead_after == 20  # three beats (15 s), but never under 20 s
    beat.beat()
    now = time.monotonic()
    # Back for 10 s only: too soon.
    beat._beats.extend([now - 10, now - 5, now])
    assert not beat.own_beats_on_time(now)
    beat._release_orphans()
    assert _job(jdb, job["_id"])["state"] == "running"
    # Beating for 25 s, but 12 s between two beats (a saturated database): not on time.
    beat._beats.clear()
    beat._beats.extend([now - 25, now - 20, now - 15, now - 3, now])
    assert not beat.own_beats_on_time(now)
    beat._release_orphans()
    assert _job(jdb, job["_id"])["state"] == "running"
    # Every 5 s for 25 s: the peer's 40 s of silence means it is gone.
    beat._beats.clear()
    beat._beats.extend([now - 25, now - 20, now - 15, now - 10, now - 5, now])
    assert beat.own_beats_on_time(now)
    beat._release_orphans()
    assert _job(jdb, job["_id"])["state"] == "queued"
    assert jdb[dbm.WORKERS].find_one({"_id": "me"})["owners"] == [runner.worker_identity()]
    # Short job leases (3 s in these tests): the lease decides first, as before.
    assert WorkerHeartbeat(lambda: jdb, jsettings, node="x", pool="solo", concurrency=1,
                           running=list).dead_after == 20


def test_reaper_republishes_lost_wakeups_but_not_those_still_in_the_broker(jdb, jsettings):
    ids = [jobs.enqueue(jdb, "test.noop", {"i": i})["_id"] for i in range(5)]
    old = server_now(jdb) - timedelta(seconds=10)
    jdb[dbm.JOBS].update_many({}, {"$set": {"wake_at": old}})
    # Every wake-up still waits in the broker: a slow queue, nothing lost.
    assert jobs.reap(jdb) == {"requeued": 0, "dead": 0, "republished": 0, "stale": 5}
    # Two wake-ups lost (e.g. prefetched by a worker that was killed).
    messages = jdb.client[jsettings.broker_db][dbm.MESSAGES_COLLECTION]
    for doc in list(messages.find().limit(2)):
        messages.delete_one({"_id": doc["_id"]})
    assert jobs.reap(jdb)["republished"] == 2
    assert messages.count_documents({}) == 5
    # Republished jobs are not republished again before the threshold.
    assert jobs.reap(jdb)["republished"] == 0
    for job_id in ids:
        assert _job(jdb, job_id)["state"] == "queued"


# ------------------------------------------------------------- operators and metrics


def test_operator_retry_of_a_dead_job_and_cancel_of_a_queued_one_are_audited(jdb, jsettings):
    dead = jobs.enqueue(jdb, "test.permanent", {})
    _run(jdb, jsettings, dead["_id"])
    queued = jobs.enqueue(jdb, "test.noop", {})
    actor = system_actor("cli")
    with pytest.raises(jobs.JobStateConflict):
        jobs.retry_dead(jdb, queued["_id"], actor=actor)
    with pytest.raises(jobs.JobStateConflict):
        jobs.cancel(jdb, dead["_id"], actor=actor)
    with pytest.raises(jobs.JobNotFound):
        jobs.cancel(jdb, "0" * 24, actor=actor)
    assert jdb[dbm.AUDIT].count_documents({}) == 0
    retried = jobs.retry_dead(jdb, dead["_id"], actor=actor)
    assert retried["state"] == "queued" and retried["attempts"] == 0
    cancelled = jobs.cancel(jdb, queued["_id"], actor=actor, reason="not needed")
    assert cancelled["state"] == "cancelled"
    actions = [(a["action"], a["target"]) for a in jdb[dbm.AUDIT].find().sort("seq", 1)]
    assert actions == [("job.retry", f"job:{dead['_id']}"),
                       ("job.cancel", f"job:{queued['_id']}")]
    assert jobs.claim(jdb, queued["_id"], "w") is None


def test_queue_depth_and_its_prometheus_gauges(jdb):
    jobs.enqueue(jdb, "test.noop", {})
    jobs.enqueue(jdb, "test.noop", {})
    jobs.enqueue(jdb, "test.ledger", {"n": 1})
    jobs.enqueue(jdb, "test.ledger", {"n": 2}, run_after=server_now(jdb) + timedelta(hours=1))
    jdb[dbm.JOBS].update_many({"kind": "test.noop"}, {"$set": {
        "run_after": server_now(jdb) - timedelta(seconds=40)}})
    depth = jobs.queue_depth(jdb)
    assert depth["by_kind"] == {"test.noop": 2, "test.ledger": 2}
    assert depth["due_by_kind"] == {"test.noop": 2, "test.ledger": 1}
    assert 39 <= depth["oldest_queued_age_seconds"] < 60
    registry = CollectorRegistry()
    registry.register(QueueDepthCollector(lambda: jdb))
    text = generate_latest(registry).decode()
    assert 'certautopilot_jobs_queued{kind="test.noop"} 2.0' in text
    assert 'certautopilot_jobs_queued{kind="test.ledger"} 2.0' in text
    assert "certautopilot_jobs_oldest_queued_age_seconds 4" in text


def test_jobs_cli(jdb, jsettings):
    from app.cli import cli

    dead = jobs.enqueue(jdb, "test.permanent", {})
    _run(jdb, jsettings, dead["_id"])
    queued = jobs.enqueue(jdb, "test.noop", {})
    cli_runner = CliRunner()
    listed = cli_runner.invoke(cli, ["jobs", "list", "--state", "dead"])
    assert listed.exit_code == 0 and dead["_id"] in listed.output
    assert "permanent failure" in listed.output
    shown = cli_runner.invoke(cli, ["jobs", "show", dead["_id"]])
    assert shown.exit_code == 0 and '"state": "dead"' in shown.output
    missing = cli_runner.invoke(cli, ["jobs", "show", "nope"])
    assert missing.exit_code == 1 and "not found" in missing.output
    refused = cli_runner.invoke(cli, ["jobs", "retry", queued["_id"]])
    assert refused.exit_code == 1 and "only a dead job can be retried" in refused.output
    assert cli_runner.invoke(cli, ["jobs", "retry", dead["_id"]]).exit_code == 0
    assert _job(jdb, dead["_id"])["state"] == "queued"
    assert cli_runner.invoke(cli, ["jobs", "cancel", queued["_id"]]).exit_code == 0
    assert _job(jdb, queued["_id"])["state"] == "cancelled"
    reaped = cli_runner.invoke(cli, ["jobs", "reap", "--json"])
    assert reaped.exit_code == 0 and '"requeued": 0' in reaped.output
    depth = cli_runner.invoke(cli, ["jobs", "depth"])
    assert depth.exit_code == 0 and "queued 1" in depth.output


def test_a_failed_publish_leaves_the_job_queued_for_the_reaper(jdb, jsettings):
    from tests.helpers.jobs import failpoint, failpoint_off

    # The broker's own client (appName certautopilot-broker) cannot insert messages.
    failpoint(jdb.client, ["insert"], times=50, error_code=10107,
              app_name=broker.BROKER_APPNAME)
    try:
        job = jobs.enqueue(jdb, "test.noop", {})
    finally:
        failpoint_off(jdb.client)
    assert _job(jdb, job["_id"])["state"] == "queued"
    assert broker_messages(jdb.client, jsettings.broker_db) == []
    # Marked for the reaper at once, not only after the usual threshold.
    assert jobs.reap(jdb)["republished"] == 1
    assert [m["args"] for m in broker_messages(jdb.client, jsettings.broker_db)] == \
        [[job["_id"]]]


def _enqueue_quietly(db, count, prefix="batch"):
    """Jobs enqueued in a transaction: nothing published yet (the renewal scan's way)."""
    def create(session):
        return [str(job["_id"]) for job in jobs.enqueue_many(
            db, "test.noop", [({"n": n}, f"{prefix}:{n}", None) for n in range(count)],
            session=session)]
    return dbm.transaction(db, create)


def test_publish_wakeups_writes_the_messages_single_publishes_would(jdb, jsettings):
    ids = _enqueue_quietly(jdb, 3)
    assert broker_messages(jdb.client, jsettings.broker_db) == []
    assert jobs.publish_wakeups(ids) == 3
    messages = broker_messages(jdb.client, jsettings.broker_db)
    assert messages == [{"task": broker.RUN_JOB_TASK, "args": [job_id], "kwargs": {},
                         "eta": None} for job_id in ids]
    single = jobs.enqueue(jdb, "test.noop", {})
    raw = list(jdb.client[jsettings.broker_db][dbm.MESSAGES_COLLECTION].find({}, {"_id": 0}))
    assert {frozenset(doc) for doc in raw} == {frozenset(raw[-1])}  # one document shape
    assert broker_messages(jdb.client, jsettings.broker_db)[-1]["args"] == [single["_id"]]
    # A worker woken by one of them runs its job.
    assert runner.run_job(ids[0], db=jdb, settings=jsettings, worker="w") == "succeeded"


def test_publish_wakeups_falls_back_to_one_by_one(jdb, jsettings):
    from tests.helpers.jobs import failpoint, failpoint_off

    ids = _enqueue_quietly(jdb, 3)
    # The batch's one insert fails: each wake-up is then published on its own.
    failpoint(jdb.client, ["insert"], times=1, error_code=10107,
              app_name=broker.BROKER_APPNAME)
    try:
        assert jobs.publish_wakeups(ids) == 3
    finally:
        failpoint_off(jdb.client)
    assert sorted(m["args"][0] for m in broker_messages(jdb.client, jsettings.broker_db)) \
        == sorted(ids)


def test_publish_wakeups_the_broker_refuses_are_left_to_the_reaper(jdb, jsettings):
    from tests.helpers.jobs import failpoint, failpoint_off

    later = _enqueue_quietly(jdb, 2, prefix="later")
    failpoint(jdb.client, ["insert"], times=50, error_code=10107,
              app_name=broker.BROKER_APPNAME)
    try:
        assert jobs.publish_wakeups(later) == 0
    finally:
        failpoint_off(jdb.client)
    assert broker_messages(jdb.client, jsettings.broker_db) == []
    assert all(_job(jdb, job_id)["state"] == "queued" for job_id in later)
    wait_for(lambda: jobs.reap(jdb)["republished"] == 2, timeout=20, message="the reaper")
    assert sorted(m["args"][0] for m in broker_messages(jdb.client, jsettings.broker_db)) \
        == sorted(later)


def test_kombu_channels_close_their_mongo_clients(jdb, jsettings):
    from kombu import Connection
    from pymongo.errors import InvalidOperation

    from app.jobs.kombu_mongo import Transport

    connection = Connection(broker.broker_url(jsettings), transport=Transport)
    channel = connection.channel()
    client = channel.client.client
    client.admin.command("ping")
    channel.close()
    connection.close()
    with pytest.raises(InvalidOperation):
        client.admin.command("ping")


def test_a_channel_that_fails_to_open_closes_its_client(jdb, jsettings, monkeypatch):
    """A step-down while kombu opens a channel (its index checks fail) used to leave the
    new MongoClient to the garbage collector: an unclosed client per failed publish."""
    from kombu import Connection
    from pymongo import MongoClient
    from pymongo.errors import AutoReconnect

    from app.jobs import kombu_mongo
    from app.jobs.kombu_mongo import Channel, Transport

    made: list[MongoClient] = []
    closed: list[MongoClient] = []

    class Recorded(MongoClient):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

        def close(self):
            closed.append(self)
            super().close()

    def stepped_down(self, database):
        raise AutoReconnect("not primary")

    monkeypatch.setattr(kombu_mongo, "MongoClient", Recorded)
    monkeypatch.setattr(Channel, "_ensure_indexes", stepped_down)
    connection = Connection(broker.broker_url(jsettings), transport=Transport)
    try:
        with pytest.raises(AutoReconnect):
            connection.channel()
        assert made and all(client in closed for client in made)
    finally:
        connection.close()


def test_two_workers_creating_the_broadcast_collection_at_once_both_start(jdb, jsettings):
    """kombu checks for ``messages.broadcast`` and then creates it: the second of two
    workers starting together used to die on CollectionInvalid."""
    from kombu import Connection

    from app.jobs.kombu_mongo import Transport

    connection = Connection(broker.broker_url(jsettings), transport=Transport)
    channel = connection.channel()  # creates the collection
    database = channel.client

    class Racing:  # what the loser saw: the collection missing at its check
        def __getattr__(self, name):
            return getattr(database, name)

        def list_collection_names(self):
            return []

    try:
        channel._create_broadcast(Racing())  # no CollectionInvalid
        assert "messages.broadcast" in database.list_collection_names()
    finally:
        channel.close()
        connection.close()


def test_finished_jobs_expire_and_a_retried_one_does_not(jdb, jsettings):
    done = jobs.enqueue(jdb, "test.noop", {})
    dead = jobs.enqueue(jdb, "test.permanent", {})
    _run(jdb, jsettings, done["_id"])
    _run(jdb, jsettings, dead["_id"])
    finished, died = _job(jdb, done["_id"]), _job(jdb, dead["_id"])
    assert finished["expire_at"] - finished["finished_at"] == lifecycle.FINISHED_RETENTION
    assert died["expire_at"] - died["finished_at"] == lifecycle.DEAD_RETENTION
    assert jdb[dbm.JOBS].index_information()["ttl_expire_at"]["expireAfterSeconds"] == 0
    jobs.retry_dead(jdb, dead["_id"], actor=system_actor("cli"))
    assert "expire_at" not in _job(jdb, dead["_id"])


def test_a_process_that_published_closes_its_broker_connections_at_exit(jdb, jenv,
                                                                       jsettings):
    """The api, the scheduler and the CLI publish wake-ups through a per-process
    publisher: at exit its broker connections are closed (no unclosed MongoClient)."""
    code = ("from app.jobs import broker; "
            "print(broker.publish_wakeup('x1'), broker.publish_wakeups(['x2', 'x3']))")
    done = subprocess.run([sys.executable, "-X", "dev", "-c", code], env=jenv,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.split() == ["True", "2"], done.stderr
    assert "ResourceWarning" not in done.stderr and "MongoClient" not in done.stderr, \
        done.stderr[-2000:]
    assert [m["args"] for m in broker_messages(jdb.client, jsettings.broker_db)] == [
        ["x1"], ["x2"], ["x3"]]
