"""HIGH-AVAILABILITY.md: "Survive a rolling restart of any one workload type with zero
failed renewal jobs", and a rolling upgrade "never drops in-flight ACME orders".

Whole processes against Debian's Pebble. While 16 certificates are first issued and then
renewed, every workload type is rolled the way the chart's Deployments roll them (one
pod at a time, a new one up before the old one gets SIGTERM): both workers (with jobs
running), both schedulers (the leader among them, while the renewal scan is due), and
the api (which answers Pebble's HTTP-01 requests; two gunicorns share the port through
SO_REUSEPORT, as two pods share a Service). Afterwards: every issuance and renewal
succeeded, no job attempt failed or died, and each issuance made exactly one ACME order.
"""

from __future__ import annotations

import json
import time
from datetime import timedelta

import requests

from app import db as dbm
from app.domain import certificates
from tests.e2e import test_acme_e2e as acme
from tests.helpers import wait_for

ACTOR, stack_env = acme.ACTOR, acme.stack_env
setup = acme.setup  # the fixture: a migrated database, a project, an account on Pebble

COUNT = 16


def _issued(db, ids, count):
    return db[dbm.CERTIFICATES].count_documents(
        {"_id": {"$in": ids}, "status": "issued", "issue_count": {"$gte": count}})


def _healthy(bind):
    try:
        return requests.get(f"http://{bind}/healthz", timeout=2).status_code == 200
    except requests.RequestException:
        return False


def _roll(old, start_new, ready, grace=60):
    """Start the replacement, wait until it is ready, then SIGTERM the old one."""
    new = start_new()
    ready(new)
    old.terminate()  # SIGTERM to the main process, as Kubernetes does
    old.popen.wait(grace)
    return new


def test_rolling_restart_of_every_workload_fails_no_renewal(setup, procs, pebble, cap_env):
    db, project_id, _, s = setup
    scan = {"name": "test.renewal_scan", "every_seconds": 2,
            "kind": "certificates.renewal_scan"}
    env = stack_env(cap_env, pebble, CAP_SCHEDULER_EXTRA_ENTRIES=json.dumps([scan]),
                    # A short grace: jobs still running when their worker stops are
                    # released mid-order, and a peer resumes the same ACME order.
                    CAP_JOB_GRACE_SECONDS="0.3", CAP_SCHEDULER_LEASE_SECONDS="6",
                    CAP_SCHEDULER_RENEW_SECONDS="2", CAP_SCHEDULER_RETRY_SECONDS="1")
    bind = f"127.0.0.1:{pebble.http_port}"

    def api():
        return procs.api(env, bind, workers=2, extra=["--reuse-port"])

    def worker():
        return procs.worker(env, concurrency=2)

    api_proc = api()
    wait_for(lambda: _healthy(bind), timeout=60, message="api up")
    workers = [worker(), worker()]
    schedulers = [procs.scheduler(env), procs.scheduler(env)]
    orders_before = pebble.log().count("Added order")

    ids = [certificates.create_certificate(db, project_id, {
        "names": [f"roll{i}.e2e.test"], "key_type": "ec256"}, ACTOR, settings=s)["_id"]
        for i in range(COUNT)]
    for cert_id in ids:
        certificates.request_issuance(db, cert_id, ACTOR, "initial")

    def running_jobs():
        return db[dbm.JOBS].count_documents({"kind": "certificates.issue",
                                             "state": "running"})

    def heartbeating(proc):
        wait_for(lambda: db[dbm.WORKERS].find_one({"pid": proc.pid, "state": "running"}),
                 timeout=120, message="the new worker heartbeating")

    # Roll the workers while issuances run.
    wait_for(running_jobs, timeout=60, message="issuance jobs running")
    rolled_while_running = 0
    for index, old in enumerate(list(workers)):
        rolled_while_running += bool(running_jobs())
        workers[index] = _roll(old, worker, heartbeating)
    assert rolled_while_running >= 1
    wait_for(lambda: _issued(db, ids, 1) == COUNT, timeout=240, interval=0.5,
             message="every certificate issued")

    # Every certificate is due for renewal: the leader's scan enqueues the renewals
    # while the schedulers roll, the leader first.
    db[dbm.CERTIFICATES].update_many({"_id": {"$in": ids}}, {"$set": {
        "next_renewal_at": dbm.server_now(db) - timedelta(seconds=1)}})

    def leader_pid():
        holder = (db[dbm.LEASES].find_one({"_id": "scheduler"}) or {}).get("holder", "")
        parts = holder.split(":")
        return int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else None

    wait_for(leader_pid, timeout=60, message="a scheduler leading")
    schedulers.sort(key=lambda p: p.pid != leader_pid())  # the leader rolls first
    for index, old in enumerate(list(schedulers)):
        schedulers[index] = _roll(old, lambda: procs.scheduler(env),
                                  lambda new: time.sleep(3))

    # Roll the api (it answers the CA's HTTP-01 requests) while renewals are validated.
    def api_ready(new):
        wait_for(lambda: "Booting worker" in new.log(), timeout=60, message="new api up")
        # Ready once it has answered (its access log; the kernel spreads connections over
        # both gunicorns on the port): a booted worker still loads the app, which takes
        # seconds on a loaded machine, longer than any fixed pause.
        wait_for(lambda: _healthy(bind) and '"path": "/healthz"' in new.log(), timeout=90,
                 interval=0.2, message="new api answering")

    api_proc = _roll(api_proc, api, api_ready)
    assert _healthy(bind)

    wait_for(lambda: _issued(db, ids, 2) == COUNT, timeout=300, interval=0.5,
             message="every certificate renewed")

    jobs = list(db[dbm.JOBS].find({"kind": "certificates.issue"}))
    assert sorted(j["payload"]["reason"] for j in jobs) == \
        ["initial"] * COUNT + ["renewal"] * COUNT
    assert all(j["state"] == "succeeded" for j in jobs)
    failed = [(j["_id"], h) for j in jobs for h in j.get("history", [])
              if h["event"] in ("failed", "dead")]
    assert failed == []
    handed_over = [j["_id"] for j in jobs
                   if any(h["event"] == "released" for h in j.get("history", []))]
    print(f"jobs released by a draining worker and finished by a peer: {len(handed_over)}")
    assert db[dbm.JOBS].count_documents({"state": "dead"}) == 0
    for doc in db[dbm.CERTIFICATES].find({"_id": {"$in": ids}}):
        assert doc["failure"] is None and doc["issue_count"] == 2
    # One ACME order per issuance: no order was dropped and re-made.
    assert db[dbm.ORDERS].count_documents({"certificate_id": {"$in": ids}}) == 2 * COUNT
    assert pebble.log().count("Added order") == orders_before + 2 * COUNT
    for proc in [api_proc, *workers, *schedulers]:
        assert proc.alive()
