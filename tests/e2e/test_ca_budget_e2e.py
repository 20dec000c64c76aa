"""Issue #17: the CA budget is shared by every worker. Three worker processes renew 60
due certificates against Pebble under a budget of 5 new orders per 10 s: Pebble's own
log never shows more than 5 orders in any 10 s window, and every renewal finishes, with
no job failed or dead (a job without a token is deferred, not failed).

The 60 certificates start issued (by a local CA: ``tests.helpers.seeded``; issuing them
at Pebble first took minutes and tested nothing asserted here), and due; three workers
that run with CAP_CA_BUDGETS = 5/10s renew them.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta

import pytest

from app import db as dbm
from app.domain import accounts, certificates
from tests.e2e import test_acme_e2e as acme
from tests.helpers import wait_for
from tests.helpers.seeded import issue_locally

ACTOR, stack_env = acme.ACTOR, acme.stack_env
setup = acme.setup  # the fixture: a migrated database, a project, an account on Pebble

COUNT = 60
BUDGET, WINDOW = 5, 10
ORDER_LINE = re.compile(r"^Pebble (\d{4}/\d\d/\d\d \d\d:\d\d:\d\d) Added order", re.M)


def _issued(db, ids, count):
    return db[dbm.CERTIFICATES].count_documents(
        {"_id": {"$in": ids}, "status": "issued", "issue_count": {"$gte": count}})


def _order_times(log_text: str) -> list[int]:
    """Seconds (Pebble logs whole seconds) of every order Pebble added."""
    return sorted(int(datetime.strptime(m, "%Y/%m/%d %H:%M:%S").timestamp())
                  for m in ORDER_LINE.findall(log_text))


def busiest_window(times: list[int], window: int) -> int:
    """The most orders in any window of ``window`` seconds. With whole-second stamps,
    two orders at least ``window`` seconds apart are logged at least ``window`` apart,
    so counting stamps within ``window - 1`` of each other cannot miss a breach."""
    return max((sum(1 for u in times if 0 <= u - t <= window - 1) for t in times), default=0)


BUDGET_WORDS = ("budget", "ratelimited", "rate limit", "deferuntil")


def failed_attempts(jobs: list[dict]) -> None:
    """Print the error of every failed attempt in these jobs' histories; no job dead
    (asserted here). A failed attempt that a retry then finished is what a loaded
    machine may give (a slow challenge answer, a database retry given up); one caused
    by the budget is never allowed: a job without a token is deferred, not failed."""
    failures = [(h["event"], str(h.get("error"))) for j in jobs for h in j["history"]
                if h["event"] in ("failed", "dead")]
    for event, error in failures:
        print(f"job attempt {event}: {error}")
    assert "dead" not in [event for event, _ in failures]
    assert not [e for _, e in failures if any(w in e.lower() for w in BUDGET_WORDS)]


# 60 renewals at no more than 5 per 10 s (two minutes at least).
@pytest.mark.timeout(1500)
def test_three_workers_share_one_budget_for_60_renewals(setup, procs, pebble, cap_env,
                                                         tmp_path):
    db, project_id, account, s = setup
    scan = {"name": "test.renewal_scan", "every_seconds": 2,
            "kind": "certificates.renewal_scan"}
    base = stack_env(cap_env, pebble, CAP_SCHEDULER_EXTRA_ENTRIES=json.dumps([scan]))
    acme.start_api(procs, base, pebble)

    # One registered domain each: the default per-domain budget (50 a week) stays out of
    # the way; the per-account one is under test.
    ids = [certificates.create_certificate(db, project_id, {
        "names": [f"www.budget{i}.test"], "key_type": "ec256"}, ACTOR, settings=s)["_id"]
        for i in range(COUNT)]
    issue_locally(db, ids, issuer_cn="Pebble seed CA", directory=tmp_path / "seed-ca")
    accounts.register_account(db, account["_id"], ACTOR, settings=s)
    assert _issued(db, ids, 1) == COUNT

    limited = dict(base, CAP_CA_BUDGETS=json.dumps(
        {pebble.directory_url: {"new_orders_per_account": f"{BUDGET}/{WINDOW}s"}}))
    workers = [procs.worker(limited, name=f"limited{i}", concurrency=2) for i in range(3)]
    scheduler = procs.scheduler(limited)
    log_offset = len(pebble.log())
    db[dbm.CERTIFICATES].update_many({"_id": {"$in": ids}}, {"$set": {
        "next_renewal_at": dbm.server_now(db) - timedelta(seconds=1)}})

    wait_for(lambda: _issued(db, ids, 2) == COUNT, timeout=900, interval=1,
             message="every certificate renewed")

    times = _order_times(pebble.log()[log_offset:])
    assert len(times) == COUNT  # one order per renewal, none lost or repeated
    spread = times[-1] - times[0]
    print(f"{COUNT} renewal orders over {spread}s; busiest {WINDOW}s window: "
          f"{busiest_window(times, WINDOW)}")
    assert busiest_window(times, WINDOW) <= BUDGET
    # 60 orders at 5 per 10 s cannot take less than 11 windows.
    assert spread >= (COUNT // BUDGET - 1) * WINDOW

    jobs = list(db[dbm.JOBS].find({"kind": "certificates.issue",
                                   "payload.reason": "renewal"}))
    assert len(jobs) == COUNT and all(j["state"] == "succeeded" for j in jobs)
    failed_attempts(jobs)  # and every job succeeded (above): no failed job
    deferred = [j for j in jobs if any(h["event"] == "retry_later" for h in j["history"])]
    # Jobs that found no token waited for one instead of failing (how many depends on
    # how fast the workers claim: some are claimed only after a token came back).
    assert deferred
    # A deferral gives its attempt back: a deferred job's attempts count only its real
    # claims (a lapsed lease on a loaded machine is one), never its deferrals.
    for job in deferred:
        claims = sum(1 for h in job["history"] if h["event"] == "claimed")
        given_back = sum(1 for h in job["history"]
                         if h["event"] in ("retry_later", "released"))
        assert int(job["attempts"]) == claims - given_back
    for doc in db[dbm.CERTIFICATES].find({"_id": {"$in": ids}}):
        assert doc["failure"] is None and doc["issue_count"] == 2
    for proc in [*workers, scheduler]:
        assert proc.alive()
