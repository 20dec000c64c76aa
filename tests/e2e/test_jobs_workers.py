"""Durable jobs with real worker processes (``celery -A tasks worker``) on the embedded
server: kill -9 and SIGSTOP mid-handler, lost wake-ups, failover and failpoints,
failures, malformed jobs, graceful shutdown, worker heartbeats."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

import tests.helpers.job_kinds as kinds
from app import db as dbm
from app import jobs
from app.db.clock import CLOCK
from app.jobs import broker
from tests.helpers import wait_for
from tests.helpers.jobs import failpoint, failpoint_off


@pytest.fixture
def jdb(jenv, migrated_db):
    return migrated_db


def start_workers(procs, env, count, name="worker", pool_args=None):
    started = [procs.worker(env, name=name, concurrency=1, extra=pool_args) for _ in
               range(count)]
    return started


def wait_ready(db, count, timeout=150):
    # Generous: a worker kill -9'd by the previous test in the middle of a short job
    # transaction leaves it open until the server aborts it (transaction lifetime, 60 s on
    # mongod and on the embedded server), and the embedded server may hold other writes
    # (here the new workers' first heartbeat) behind it until then.
    wait_for(lambda: db[dbm.WORKERS].count_documents({"state": "running"}) >= count,
             timeout=timeout, message=f"{count} workers heartbeating")


def job(db, job_id):
    return db[dbm.JOBS].find_one({"_id": job_id})


def wait_state(db, job_id, state, timeout=60):
    return wait_for(lambda: (job(db, job_id) or {}).get("state") == state and job(db, job_id),
                    timeout=timeout, message=f"job {job_id} {state}")


def proc_of_pid(procs, pid):
    """The started worker whose process group holds ``pid`` (a prefork child)."""
    group = os.getpgid(pid)
    return next(p for p in procs.procs if p.alive() and p.pid == group)


def test_kill_9_mid_handler_a_peer_completes_and_the_dead_token_cannot(jdb, jenv, procs):
    first = procs.worker(jenv, name="first", concurrency=1)
    wait_ready(jdb, 1)
    item = jobs.enqueue(jdb, "test.sleep", {"seconds": 60, "then_seconds": 0.2})
    marker = wait_for(lambda: jdb[kinds.MARKERS].find_one({"job_id": item["_id"]}),
                      message="handler started")
    old_token = job(jdb, item["_id"])["lease"]["token"]
    assert marker["token"] == old_token
    first.kill9()
    procs.worker(jenv, name="peer", concurrency=1)
    done = wait_state(jdb, item["_id"], "succeeded", timeout=60)
    assert done["attempts"] == 2
    events = [h["event"] for h in done["history"]]
    assert events == ["enqueued", "claimed", "requeued", "claimed", "succeeded"]
    rows = list(jdb[kinds.LEDGER].find({"job_id": item["_id"]}))
    assert len(rows) == 1 and rows[0]["attempt"] == 2
    assert rows[0]["worker"] != marker["worker"]
    # The dead worker's token: no completion, no fenced write, no heartbeat.
    assert jobs.complete(jdb, item["_id"], old_token) is False
    with pytest.raises(jobs.LeaseLost):
        jobs.fenced_transaction(jdb, item["_id"], old_token,
                                lambda s: jdb[kinds.LEDGER].insert_one({"x": 1}, session=s))
    assert jobs.heartbeat(jdb, item["_id"], old_token) is None
    assert jdb[kinds.LEDGER].count_documents({}) == 1
    assert job(jdb, item["_id"])["result"] == {"slept": 0.2}


def test_kill_9_of_a_worker_a_peer_takes_its_job_back_before_the_job_lease_lapses(
        jdb, jenv, procs):
    """The default 60 s job lease: the peer sees the dead worker's heartbeat (every 5 s)
    stop for 20 s and requeues its job long before the lease would lapse."""
    env = {**jenv, "CAP_JOB_LEASE_SECONDS": "60", "CAP_REAPER_REPUBLISH_SECONDS": "30"}
    start_workers(procs, env, 2)
    wait_ready(jdb, 2)
    item = jobs.enqueue(jdb, "test.sleep", {"seconds": 300, "then_seconds": 0.2})
    marker = wait_for(lambda: jdb[kinds.MARKERS].find_one({"job_id": item["_id"]}),
                      message="handler started")
    claimed = job(jdb, item["_id"])["lease"]
    proc_of_pid(procs, marker["pid"]).kill9()
    killed_at = time.monotonic()
    done = wait_state(jdb, item["_id"], "succeeded", timeout=55)
    taken_back_in = time.monotonic() - killed_at
    requeued = [h for h in done["history"] if h["event"] == "requeued"]
    assert [h["reason"] for h in requeued] == ["worker lost"]
    assert requeued[0]["previous_owner"] == claimed["owner"]
    assert taken_back_in < 55  # the lease (60 s) had not lapsed
    assert jdb[dbm.WORKERS].find_one({"state": "lost"}) is not None
    rows = list(jdb[kinds.LEDGER].find({"job_id": item["_id"]}))
    assert len(rows) == 1 and rows[0]["attempt"] == 2


def test_a_paused_worker_past_its_lease_is_refused_and_the_effect_happens_once(jdb, jenv,
                                                                               procs):
    start_workers(procs, jenv, 2)
    wait_ready(jdb, 2)
    # `unchecked`: the handler never looks at its lease; only the server's fence can stop
    # the paused worker's write.
    item = jobs.enqueue(jdb, "test.sleep", {"seconds": 4, "then_seconds": 0.1,
                                            "unchecked": True})
    marker = wait_for(lambda: jdb[kinds.MARKERS].find_one({"job_id": item["_id"]}),
                      message="handler started")
    paused = proc_of_pid(procs, marker["pid"])
    paused.signal(signal.SIGSTOP)
    try:
        done = wait_state(jdb, item["_id"], "succeeded", timeout=60)
    finally:
        paused.signal(signal.SIGCONT)
    assert done["attempts"] == 2
    # The resumed worker finishes its sleep and tries to write and complete: refused.
    wait_for(lambda: "transaction_refused" in [h["event"] for h in
                                               job(jdb, item["_id"])["history"]],
             timeout=30, message="the paused worker's completion refused")
    refused = [h for h in job(jdb, item["_id"])["history"]
               if h["event"] == "transaction_refused"]
    assert refused[0]["worker"] == marker["worker"]
    rows = list(jdb[kinds.LEDGER].find({"job_id": item["_id"]}))
    assert len(rows) == 1 and rows[0]["worker"] != marker["worker"]
    assert job(jdb, item["_id"])["state"] == "succeeded"
    assert "fenced transaction refused" in paused.log()
    assert paused.alive()


def test_a_deleted_wakeup_message_still_runs_via_the_reaper(jdb, jenv, procs):
    item = jobs.enqueue(jdb, "test.noop", {})
    messages = jdb.client[jenv["CAP_BROKER_DB"]][dbm.MESSAGES_COLLECTION]
    assert messages.delete_many({}).deleted_count == 1
    procs.worker(jenv, concurrency=1)
    done = wait_state(jdb, item["_id"], "succeeded", timeout=60)
    assert done["attempts"] == 1 and done["result"] == {"ok": True}


def test_step_down_and_failpoints_during_claims_and_completes_lose_and_repeat_nothing(
        jdb, jenv, procs):
    start_workers(procs, jenv, 2)
    wait_ready(jdb, 2)
    stop = threading.Event()
    chaos_errors: list[str] = []

    def chaos():
        client = jdb.client
        plan = [
            lambda: failpoint(client, ["findAndModify"], times=3, error_code=10107),
            lambda: failpoint(client, ["commitTransaction"], times=2, close_connection=True),
            lambda: client.admin.command({"replSetStepDown": 1, "force": True}),
            lambda: failpoint(client, ["update"], times=3, error_code=10107),
            lambda: failpoint(client, ["commitTransaction"], times=2, error_code=10107),
            lambda: failpoint(client, ["findAndModify", "update"], times=4,
                              close_connection=True),
            lambda: client.admin.command({"replSetStepDown": 1, "force": True}),
        ]
        step = 0
        while not stop.is_set():
            try:
                plan[step % len(plan)]()
            except Exception as exc:  # noqa: BLE001 - a step-down answers oddly
                chaos_errors.append(repr(exc)[:200])
            step += 1
            stop.wait(1.5)

    # Jobs long enough (60 x 0.3 s over 2 workers) that the whole chaos plan runs
    # while workers claim and complete; the plan starts before the first job exists.
    thread = threading.Thread(target=chaos, daemon=True)
    thread.start()
    ids = []
    for i in range(60):
        ids.append(dbm.retry(lambda i=i: jobs.enqueue(jdb, "test.ledger",
                                                      {"n": i, "delay": 0.3})["_id"]))
    try:
        wait_for(lambda: _count_ok(jdb, ids), timeout=240, interval=0.5,
                 message="all jobs succeeded through the chaos")
    finally:
        stop.set()
        thread.join(10)
        try:
            failpoint_off(jdb.client)
        except Exception:  # noqa: BLE001 - re-tried below
            time.sleep(2)
            failpoint_off(jdb.client)
    CLOCK.reset()
    rows = list(jdb[kinds.LEDGER].find())
    assert len(rows) == 60
    assert sorted(r["job_id"] for r in rows) == sorted(ids)
    assert all(p.alive() for p in procs.procs)
    # The chaos reached the workers' claims and completions, which retried through it.
    logs = "".join(p.log() for p in procs.procs)
    assert "db.txn_retry" in logs or "transient database error" in logs


def _count_ok(db, ids):
    try:
        return db[dbm.JOBS].count_documents({"_id": {"$in": ids}, "state": "succeeded"}) \
            == len(ids)
    except Exception:  # noqa: BLE001 - the test's own read during a step-down
        return False


def test_a_raising_handler_is_retried_with_backoff_then_dead(jdb, jenv, procs):
    procs.worker(jenv, concurrency=1)
    item = jobs.enqueue(jdb, "test.raise", {})
    dead = wait_state(jdb, item["_id"], "dead", timeout=60)
    assert dead["attempts"] == 3
    assert dead["last_error"] == "RuntimeError: boom on attempt 3"
    failed = [h for h in dead["history"] if h["event"] == "failed"]
    # base 0.2 s: [0.1, 0.2) then [0.2, 0.4), stored rounded to 3 decimals (0.19996 is 0.2)
    assert len(failed) == 2 and 0.1 <= failed[0]["retry_in"] <= 0.2 <= failed[1]["retry_in"]
    claims = [h["at"] for h in dead["history"] if h["event"] == "claimed"]
    for before, after, entry in zip(claims, claims[1:], failed, strict=False):
        assert (after - before).total_seconds() >= entry["retry_in"] - 0.01


def test_malformed_and_unknown_jobs_fail_clearly_and_the_worker_keeps_running(jdb, jenv,
                                                                              procs):
    worker = procs.worker(jenv, concurrency=1)
    wait_ready(jdb, 1)
    from app.db.clock import server_now

    now = server_now(jdb)
    bad = {"a" * 24: {"kind": 7, "payload": {}}, "b" * 24: {"kind": "test.noop",
                                                            "payload": "oops"},
           "c" * 24: {"kind": "test.validated", "payload": {}}}
    for job_id, fields in bad.items():
        jdb[dbm.JOBS].insert_one({"_id": job_id, "state": "queued", "attempts": 0,
                                  "run_after": now, "wake_at": now, **fields})
        jobs.publish_wakeup(job_id)
    unknown = jobs.enqueue(jdb, "no.such_kind", {})
    publisher = broker._publisher()
    publisher.send_task(broker.RUN_JOB_TASK, args=[{"not": "an id"}], queue=broker.QUEUE)
    publisher.send_task(broker.RUN_JOB_TASK, args=[], queue=broker.QUEUE)
    publisher.send_task("no.such.task", args=["x"], queue=broker.QUEUE)
    for job_id in bad:
        wait_state(jdb, job_id, "dead")
    assert "kind 7 is not a job kind" in job(jdb, "a" * 24)["last_error"]
    assert "expected an object, got str" in job(jdb, "b" * 24)["last_error"]
    assert "payload.name must be a string" in job(jdb, "c" * 24)["last_error"]
    # The claim (attempts + 1) commits before the failure is recorded: wait for the error.
    tried = wait_for(lambda: (job(jdb, unknown["_id"]) or {}).get("last_error") and
                     job(jdb, unknown["_id"]), message="unknown kind tried")
    assert tried["attempts"] >= 1
    assert "unknown job kind 'no.such_kind'" in tried["last_error"]
    good = jobs.enqueue(jdb, "test.noop", {})
    wait_state(jdb, good["_id"], "succeeded")
    assert worker.alive()
    assert "malformed job id" in worker.log()


def test_sigterm_lets_short_jobs_finish_and_releases_long_ones_to_a_peer(jdb, jenv, procs,
                                                                         monkeypatch):
    env = dict(jenv, CAP_JOB_LEASE_SECONDS="60", CAP_JOB_GRACE_SECONDS="3")
    first = procs.worker(env, name="first", concurrency=2)
    wait_ready(jdb, 1)
    long = jobs.enqueue(jdb, "test.sleep", {"seconds": 120, "then_seconds": 0.1})
    row = jdb[dbm.WORKERS].find_one({"pid": first.pid})
    assert row is not None and row["state"] == "running"
    wait_for(lambda: jdb[dbm.WORKERS].find_one({"pid": first.pid})["running_jobs"]
             == [long["_id"]], timeout=20, message="the heartbeat lists the running job")
    short = jobs.enqueue(jdb, "test.sleep", {"seconds": 2})
    wait_for(lambda: jdb[kinds.MARKERS].count_documents({}) == 2, message="both started")
    started = time.monotonic()
    os.kill(first.pid, signal.SIGTERM)  # the main process only, as Kubernetes does
    done = wait_state(jdb, short["_id"], "succeeded", timeout=20)
    assert done["history"][-1]["worker"] == jdb[kinds.MARKERS].find_one(
        {"job_id": short["_id"]})["worker"]
    released = wait_for(lambda: "released" in [h["event"] for h in
                                               job(jdb, long["_id"])["history"]] and
                        job(jdb, long["_id"]), timeout=20, message="long job released")
    assert released["attempts"] in (0, 1)  # given back (1 if a peer already claimed it)
    first.popen.wait(60)  # generous: its last writes wait on the database
    assert not first.alive()
    # A peer re-claims it at once, long before the 60 s lease would have lapsed.
    procs.worker(env, name="peer", concurrency=1)
    finished = wait_state(jdb, long["_id"], "succeeded", timeout=40)
    assert time.monotonic() - started < 50
    assert finished["result"] == {"slept": 0.1}
    assert jdb[kinds.LEDGER].count_documents({}) == 2
    assert jdb[dbm.WORKERS].find_one({"pid": first.pid})["state"] in ("draining", "stopped")


def test_worker_heartbeat_documents(jdb, jenv, procs):
    worker = procs.worker(jenv, concurrency=1)
    wait_ready(jdb, 1)
    row = jdb[dbm.WORKERS].find_one({"pid": worker.pid})
    assert row["host"] and row["version"] and row["pool"] == "prefork"
    assert row["concurrency"] == 1 and row["running_jobs"] == []
    first_seen = row["last_seen"]
    wait_for(lambda: jdb[dbm.WORKERS].find_one({"pid": worker.pid})["last_seen"] > first_seen,
             timeout=10, message="a later heartbeat")
    worker.terminate()
    # Idle, it exits in about 5 s (Celery's pool shutdown); the bound is generous because
    # shutdown writes (the last heartbeat, restoring prefetched messages) wait on the
    # database.
    worker.popen.wait(60)
    assert jdb[dbm.WORKERS].find_one({"pid": worker.pid})["state"] == "stopped"
