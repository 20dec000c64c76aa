"""Issue #17, emergency renewal: 100 issued certificates (by a local CA named like
Pebble's), one bulk renewal by issuer through the api (as after a CA's mass-revocation
notice), run by 3 worker processes under a shared budget of 10 new orders per 10 s on
Pebble: the batch reports all 100 done, every certificate is renewed exactly once,
Pebble's log never shows more than 10 orders in a 10 s window, no job failed; the batch
is audited once and each certificate once."""

from __future__ import annotations

import json

import pytest
import requests

from app import db as dbm
from app.domain import accounts, certificates
from app.domain.tokens import clear_cache
from tests.e2e import test_acme_e2e as acme
from tests.e2e.test_ca_budget_e2e import _order_times, busiest_window, failed_attempts
from tests.helpers import wait_for
from tests.helpers.api import API, make_admin
from tests.helpers.seeded import issue_locally

ACTOR, stack_env = acme.ACTOR, acme.stack_env
setup = acme.setup

COUNT = 100
BUDGET, WINDOW = 10, 10


@pytest.mark.timeout(1800)
def test_bulk_renewal_by_issuer_of_100_certificates_within_the_budget(setup, procs, pebble,
                                                                      cap_env, tmp_path):
    db, project_id, account, s = setup
    base = stack_env(cap_env, pebble)
    acme.start_api(procs, base, pebble)
    bind = f"127.0.0.1:{pebble.http_port}"
    ids = [certificates.create_certificate(db, project_id, {
        "names": [f"www.bulk{i}.test"], "key_type": "ec256"}, ACTOR, settings=s)["_id"]
        for i in range(COUNT)]
    # Issued by a local CA named like Pebble's (tests.helpers.seeded): issuing them at
    # Pebble first took minutes and tests nothing asserted here.
    issue_locally(db, ids, issuer_cn="Pebble seed CA", directory=tmp_path / "seed-ca")
    accounts.register_account(db, account["_id"], ACTOR, settings=s)
    limited = dict(base, CAP_CA_BUDGETS=json.dumps(
        {pebble.directory_url: {"new_orders_per_account": f"{BUDGET}/{WINDOW}s"}}))
    workers = [procs.worker(limited, name=f"limited{i}", concurrency=2) for i in range(3)]
    log_offset = len(pebble.log())
    audit_before = db[dbm.AUDIT].count_documents({})

    clear_cache()
    admin = make_admin(db)
    started = requests.post(f"http://{bind}{API}/renewals", json={"issuer": "pebble"},
                            headers=admin.headers, timeout=60)
    assert started.status_code == 201, started.text
    batch = started.json()
    assert batch["counts"]["total"] == COUNT and sorted(batch["certificates"]) == sorted(ids)

    def progress():
        answer = requests.get(f"http://{bind}{API}/renewals/{batch['id']}",
                              headers=admin.headers, timeout=30).json()
        return answer if answer["finished"] else None

    final = wait_for(progress, timeout=900, interval=2, message="the batch finished")
    assert final["counts"] == {"total": COUNT, "queued": 0, "running": 0, "done": COUNT,
                               "failed": 0, "cancelled": 0}
    for doc in db[dbm.CERTIFICATES].find({"_id": {"$in": ids}}):
        assert doc["issue_count"] == 2 and doc["failure"] is None  # renewed exactly once
    times = _order_times(pebble.log()[log_offset:])
    print(f"{COUNT} bulk renewal orders over {times[-1] - times[0]}s; busiest {WINDOW}s "
          f"window: {busiest_window(times, WINDOW)}")
    assert len(times) == COUNT
    assert busiest_window(times, WINDOW) <= BUDGET
    jobs = list(db[dbm.JOBS].find({"payload.batch_id": batch["id"]}))
    assert len(jobs) == COUNT and all(j["state"] == "succeeded" for j in jobs)
    failed_attempts(jobs)
    new = list(db[dbm.AUDIT].find().sort("seq", 1).skip(audit_before))
    actions = [e["action"] for e in new]
    assert actions.count("renewal_batch.create") == 1
    assert actions.count("certificate.renew_requested") == COUNT
    assert actions.count("certificate.renew") == COUNT
    for proc in workers:
        assert proc.alive()
