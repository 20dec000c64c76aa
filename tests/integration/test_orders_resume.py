"""Orders survive an interrupted worker: a second run of the same job resumes the stored
order by URL (one order at the CA per attempt), and finalize is fenced by the job's lease
token. Interruptions here are in-process (the crash points of tests/helpers/crash_points.py
raise instead of killing the process); tests/e2e/test_acme_e2e.py does the same with
kill -9 on real workers."""

from __future__ import annotations

import time

import pytest

from app import db as dbm
from app.config import load_settings
from app.domain import accounts, certificates, orders
from app.domain.issuance import run_issuance
from app.jobs import LeaseLost, enqueue
from app.jobs import lifecycle as job_store
from app.jobs.context import JobContext
from tests.helpers import crash_points
from tests.helpers.fences import LocalFence
from tests.integration.test_acme_helpers import (
    ACTOR,
    acme_settings,
    make_account,
    make_project,
    responder,
)


class SimulatedCrash(BaseException):
    pass


@pytest.fixture
def env(migrated_db, settings, pebble):
    s = acme_settings(settings, pebble)
    project_id = make_project(migrated_db)
    make_account(migrated_db, project_id, s)
    with responder(s, pebble.http_port):
        yield migrated_db, s, project_id


@pytest.fixture
def crash_at(monkeypatch):
    """Make the issuance raise at one crash point, once (like the marker of the kill)."""
    fired = []

    def arm(point):
        def crash(db, name):
            if name == point and not fired:
                fired.append(name)
                raise SimulatedCrash(name)

        crash_points.install(crash, monkeypatch.setattr)
        return fired

    return arm


def _finalize_posts(pebble):
    return pebble.log().count("POST /finalize-order/")


def _finalizations(pebble):
    """Finalizations Pebble processed. Not the POSTs: Pebble rejects some nonces on
    purpose, and the acme package then sends the same finalize again."""
    return pebble.log().count("fully authorized. Processing finalization")


@pytest.mark.parametrize("point", ["order_stored", "challenge_answered"])
def test_a_second_run_resumes_the_same_order(env, pebble, crash_at, point):
    db, s, project_id = env
    names = [f"{point.replace('_', '-')}-{i}.resume.test" for i in range(3)]
    cert = certificates.create_certificate(db, project_id, {"names": names}, ACTOR, settings=s)
    fired = crash_at(point)
    orders_at_ca = pebble.log().count("Added order")

    with pytest.raises(SimulatedCrash):
        run_issuance(db, LocalFence(db, "job-resume"), cert["_id"], reason="initial",
                     settings=s)
    assert fired == [point]
    stored = db[dbm.ORDERS].find_one({"job_id": "job-resume"})
    assert stored["order_url"] and stored["state"] == "pending"
    if point == "challenge_answered":
        assert any(a.get("answered_at") for a in stored["authorizations"])

    result = run_issuance(db, LocalFence(db, "job-resume"), cert["_id"], reason="initial",
                          settings=s)
    assert result["outcome"] == "issued" and result["resumed"] is True
    assert result["order_id"] == stored["_id"]
    assert db[dbm.ORDERS].count_documents({"job_id": "job-resume"}) == 1
    assert pebble.log().count("Added order") == orders_at_ca + 1
    assert certificates.get_certificate(db, cert["_id"])["status"] == "issued"


def test_expired_order_is_replaced_by_a_new_one(env, pebble, crash_at):
    db, s, project_id = env
    cert = certificates.create_certificate(db, project_id, {"names": ["expired.resume.test"]},
                                           ACTOR, settings=s)
    crash_at("order_stored")
    with pytest.raises(SimulatedCrash):
        run_issuance(db, LocalFence(db, "job-expired"), cert["_id"], reason="initial",
                     settings=s)
    first = db[dbm.ORDERS].find_one({"job_id": "job-expired"})
    # the CA forgot the order (as after its expiry and cleanup): point at a URL it never knew
    db[dbm.ORDERS].update_one({"_id": first["_id"]},
                              {"$set": {"order_url": first["order_url"] + "gone"}})
    result = run_issuance(db, LocalFence(db, "job-expired"), cert["_id"], reason="initial",
                          settings=s)
    assert result["outcome"] == "issued"
    docs = list(db[dbm.ORDERS].find({"job_id": "job-expired"}).sort("created_at", 1))
    assert [d["state"] for d in docs] == ["expired", "completed"]
    assert docs[1]["attempt"] == 2


def test_finalize_is_fenced_by_the_lease_token(env, pebble, crash_at):
    db, s, project_id = env
    cert = certificates.create_certificate(db, project_id, {"names": ["fenced.resume.test"]},
                                           ACTOR, settings=s)
    job = enqueue(db, certificates.ISSUE_JOB_KIND,
                  {"certificate_id": cert["_id"], "reason": "initial"},
                  dedupe_key=certificates.dedupe_key(cert["_id"]), publish=False)
    settings = load_settings().with_overrides(
        acme_directory_url=s.acme_directory_url, acme_ca_bundle=s.acme_ca_bundle)

    accounts.register_account(db, cert["account_id"], ACTOR, settings=settings)
    # worker A claims with a 3 s lease but believes (locally) it holds it for a minute
    claimed_a = job_store.claim(db, job["_id"], "worker-a", lease_seconds=3, settings=settings)
    ctx_a = JobContext(db, claimed_a, worker="worker-a", lease_seconds=60, settings=settings)
    crash_at("challenge_answered")
    with pytest.raises(SimulatedCrash):
        run_issuance(db, ctx_a, cert["_id"], reason="initial", settings=settings)

    lapse = claimed_a["lease"]["expires_at"] - dbm.server_now(db)
    time.sleep(max(0.0, lapse.total_seconds()) + 0.5)  # A's lease lapses (server clock)
    claimed_b = job_store.claim(db, job["_id"], "worker-b", lease_seconds=60, settings=settings)
    assert claimed_b is not None and claimed_b["lease"]["token"] != claimed_a["lease"]["token"]
    ctx_b = JobContext(db, claimed_b, worker="worker-b", lease_seconds=60, settings=settings)

    finalizes, finalizations = _finalize_posts(pebble), _finalizations(pebble)
    # A wakes up and carries on: its fenced 'finalizing' write is refused, no finalize sent
    with pytest.raises(LeaseLost):
        run_issuance(db, ctx_a, cert["_id"], reason="initial", settings=settings)
    assert _finalize_posts(pebble) == finalizes
    order = db[dbm.ORDERS].find_one({"job_id": job["_id"]})
    assert order["state"] in ("pending", "ready") and order["fence"] is None

    result = run_issuance(db, ctx_b, cert["_id"], reason="initial",
                          settings=settings)
    assert result["outcome"] == "issued"
    order = orders.get(db, result["order_id"])
    assert order["fence"]["lease_token"] == claimed_b["lease"]["token"]
    assert _finalizations(pebble) == finalizations + 1
    # the completing transaction also completed the job (same transaction, fenced by B)
    done = db[dbm.JOBS].find_one({"_id": job["_id"]})
    assert done["state"] == "succeeded" and done["result"]["order_id"] == order["_id"]


def test_spec_changed_while_issuing_stores_the_result_and_is_due_again(env, pebble, crash_at):
    db, s, project_id = env
    cert = certificates.create_certificate(db, project_id, {"names": ["moved.resume.test"]},
                                           ACTOR, settings=s)
    crash_at("order_stored")
    with pytest.raises(SimulatedCrash):
        run_issuance(db, LocalFence(db, "job-moved"), cert["_id"], reason="initial",
                     settings=s)
    certificates.update_certificate(db, cert["_id"], {
        "names": ["moved.resume.test", "also.resume.test"]}, ACTOR)
    result = run_issuance(db, LocalFence(db, "job-moved"), cert["_id"], reason="initial",
                          settings=s)
    assert result["outcome"] == "issued"
    stored = certificates.get_certificate(db, cert["_id"])
    assert stored["status"] == "issued" and stored["version"] == 3
    assert stored["names"] == ["moved.resume.test", "also.resume.test"]
    assert stored["renewal_source"] == "spec_changed"
    assert stored["next_renewal_at"] <= dbm.server_now(db)  # issue again with the new names


def test_certificate_deleted_while_issuing_completes_the_order_only(env, crash_at):
    db, s, project_id = env
    cert = certificates.create_certificate(db, project_id, {"names": ["deleted.resume.test"]},
                                           ACTOR, settings=s)
    crash_at("challenge_answered")
    with pytest.raises(SimulatedCrash):
        run_issuance(db, LocalFence(db, "job-deleted"), cert["_id"], reason="initial",
                     settings=s)
    certificates.delete_certificate(db, cert["_id"], ACTOR)
    result = run_issuance(db, LocalFence(db, "job-deleted"), cert["_id"], reason="initial",
                          settings=s)
    assert result["outcome"] == "skipped"
    order = db[dbm.ORDERS].find_one({"job_id": "job-deleted"})
    assert order["state"] == "abandoned"
    assert db[dbm.CHALLENGES].count_documents({"order_id": order["_id"]}) == 0
