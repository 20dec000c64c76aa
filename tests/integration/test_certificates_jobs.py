"""Certificates through durable jobs: request_issuance, the renewal scan, and the
certificates.issue handler run by the job runner (in-process here; e2e tests use real
worker processes)."""

from __future__ import annotations

from datetime import timedelta

import pytest

from app import db as dbm
from app.domain import certificates, renewal
from app.handlers import load_handlers
from app.jobs.runner import run_job
from tests.integration.test_acme_helpers import (
    ACTOR,
    acme_settings,
    make_account,
    make_project,
    responder,
)


@pytest.fixture
def env(migrated_db, settings, pebble, monkeypatch):
    s = acme_settings(settings, pebble)
    monkeypatch.setenv("CAP_ACME_DIRECTORY_URL", pebble.directory_url)
    monkeypatch.setenv("CAP_ACME_CA_BUNDLE", str(pebble.ca_cert))
    project_id = make_project(migrated_db)
    make_account(migrated_db, project_id, s)
    load_handlers()

    with responder(s, pebble.http_port):
        yield migrated_db, s, project_id


def _run(db, s, job_id):
    return run_job(job_id, db=db, settings=s, worker="test-worker")


def test_request_issuance_enqueues_one_job_and_the_handler_issues(env):
    db, s, project_id = env
    cert = certificates.create_certificate(db, project_id, {"names": ["job.jobs.test"]},
                                           ACTOR, settings=s)
    job = certificates.request_issuance(db, cert["_id"], ACTOR, "initial")
    again = certificates.request_issuance(db, cert["_id"], ACTOR, "manual")
    assert again["_id"] == job["_id"]  # dedupe key per certificate
    assert job["dedupe_key"] == f"certificate:{cert['_id']}:issue"

    assert _run(db, s, job["_id"]) == "succeeded"
    done = db[dbm.JOBS].find_one({"_id": job["_id"]})
    stored = certificates.get_certificate(db, cert["_id"])
    assert stored["status"] == "issued"
    assert done["result"]["outcome"] == "issued"
    assert done["result"]["order_id"] == stored["order_id"]
    # a new request after completion is a new job
    assert certificates.request_issuance(db, cert["_id"], ACTOR)["_id"] != job["_id"]


def test_renewal_scan_enqueues_only_due_certificates_in_batches(env):
    db, s, project_id = env
    certs = [certificates.create_certificate(db, project_id, {"names": [f"c{i}.scan.test"]},
                                             ACTOR, settings=s) for i in range(5)]
    now = dbm.server_now(db)
    due, later = certs[:3], certs[3:]
    for i, cert in enumerate(due):
        db[dbm.CERTIFICATES].update_one({"_id": cert["_id"]}, {"$set": {
            "next_renewal_at": now - timedelta(minutes=i + 1)}})
    for cert in later:
        db[dbm.CERTIFICATES].update_one({"_id": cert["_id"]}, {"$set": {
            "next_renewal_at": now + timedelta(days=30)}})
    before = {c["_id"]: c for c in db[dbm.CERTIFICATES].find()}

    result = renewal.renewal_scan(db, batch_size=2)
    assert result == {"enqueued": 3, "batches": 2, "in_hand": 0}
    jobs = list(db[dbm.JOBS].find({"kind": "certificates.issue"}))
    assert sorted(j["payload"]["certificate_id"] for j in jobs) == sorted(c["_id"] for c in due)
    assert all(j["payload"]["reason"] == "initial" for j in jobs)
    # The scan writes only jobs: no certificate is touched, due or not.
    assert {c["_id"]: c for c in db[dbm.CERTIFICATES].find()} == before

    # Still due while their jobs are queued: no second job.
    assert renewal.renewal_scan(db) == {"enqueued": 0, "batches": 0, "in_hand": 3}
    assert db[dbm.JOBS].count_documents({"kind": "certificates.issue"}) == 3


def test_a_job_that_died_holds_its_certificate_for_an_hour_unless_a_newer_due_time(env):
    """A due certificate whose issuance job died (no outcome recorded, so
    ``next_renewal_at`` did not move) is not enqueued at every scan: not for an hour after
    that job. A due time set after the job (a revocation, a changed spec) enqueues at
    once."""
    db, s, project_id = env
    certs = [certificates.create_certificate(db, project_id, {"names": [f"d{i}.scan.test"]},
                                             ACTOR, settings=s) for i in range(3)]
    now = dbm.server_now(db)
    for cert in certs:
        db[dbm.CERTIFICATES].update_one({"_id": cert["_id"]}, {"$set": {
            "next_renewal_at": now - timedelta(hours=3)}})
    assert renewal.renewal_scan(db)["enqueued"] == 3
    recent, old, redue = certs

    def died(cert: dict, ago: timedelta) -> None:
        db[dbm.JOBS].update_one(
            {"payload.certificate_id": cert["_id"], "state": "queued"},
            {"$set": {"state": "dead", "created_at": now - ago, "finished_at": now}})

    died(recent, timedelta(minutes=10))
    died(old, timedelta(hours=2))
    died(redue, timedelta(minutes=10))
    # a due time set after redue's job died: the renewal is wanted again now
    db[dbm.CERTIFICATES].update_one({"_id": redue["_id"]}, {"$set": {
        "next_renewal_at": now - timedelta(minutes=1)}})

    assert renewal.renewal_scan(db) == {"enqueued": 2, "batches": 1, "in_hand": 1}
    queued = {j["payload"]["certificate_id"] for j in db[dbm.JOBS].find(
        {"kind": "certificates.issue", "state": "queued"})}
    assert queued == {old["_id"], redue["_id"]}


def test_scan_job_then_renewal_job_renews(env):
    from app.jobs import enqueue

    db, s, project_id = env
    cert = certificates.create_certificate(db, project_id, {"names": ["renew.scan.test"]},
                                           ACTOR, settings=s)
    first_job = certificates.request_issuance(db, cert["_id"], ACTOR, "initial")
    assert _run(db, s, first_job["_id"]) == "succeeded"
    issued = certificates.get_certificate(db, cert["_id"])
    assert issued["next_renewal_at"] > dbm.server_now(db) + timedelta(days=365)

    db[dbm.CERTIFICATES].update_one({"_id": cert["_id"]}, {"$set": {
        "next_renewal_at": dbm.server_now(db) - timedelta(seconds=1)}})
    scan = enqueue(db, "certificates.renewal_scan", {}, publish=False)
    assert _run(db, s, scan["_id"]) == "succeeded"
    assert db[dbm.JOBS].find_one({"_id": scan["_id"]})["result"]["enqueued"] == 1
    renewal_job = db[dbm.JOBS].find_one({"kind": "certificates.issue", "state": "queued"})
    assert renewal_job["payload"] == {"certificate_id": cert["_id"], "reason": "renewal"}
    assert _run(db, s, renewal_job["_id"]) == "succeeded"
    renewed = certificates.get_certificate(db, cert["_id"])
    assert renewed["serial"] != issued["serial"] and renewed["issue_count"] == 2
    assert renewed["next_renewal_at"] > dbm.server_now(db) + timedelta(days=365)


def test_a_scan_job_skips_while_another_scan_runs(env):
    """Overlapping scans (slow scans on a loaded database) would fight over the same due
    certificates: a scan that finds another one running under a live lease does nothing."""
    from app.jobs import enqueue

    db, s, project_id = env
    cert = certificates.create_certificate(db, project_id, {"names": ["one.scan.test"]},
                                           ACTOR, settings=s)
    running = enqueue(db, "certificates.renewal_scan", {}, publish=False)
    db[dbm.JOBS].update_one({"_id": running["_id"]}, {"$set": {
        "state": "running", "lease": {"owner": "peer", "token": "t",
                                      "expires_at": dbm.server_now(db) + timedelta(minutes=1)}}})
    scan = enqueue(db, "certificates.renewal_scan", {}, publish=False)
    assert _run(db, s, scan["_id"]) == "succeeded"
    assert db[dbm.JOBS].find_one({"_id": scan["_id"]})["result"]["skipped"]
    assert db[dbm.JOBS].count_documents({"kind": "certificates.issue"}) == 0

    # Once the other scan's lease has lapsed (its worker died), scans run again.
    db[dbm.JOBS].update_one({"_id": running["_id"]}, {"$set": {
        "lease.expires_at": dbm.server_now(db) - timedelta(seconds=1)}})
    scan = enqueue(db, "certificates.renewal_scan", {}, publish=False)
    assert _run(db, s, scan["_id"]) == "succeeded"
    assert db[dbm.JOBS].find_one({"_id": scan["_id"]})["result"]["enqueued"] == 1
    assert db[dbm.JOBS].find_one({"kind": "certificates.issue"})["payload"] == {
        "certificate_id": cert["_id"], "reason": "initial"}


def test_validation_failure_fails_the_job_and_backs_off_the_certificate(env, pebble):
    from tests.integration.test_acme_helpers import challtest

    db, s, project_id = env
    bad = "nope.jobs.test"
    challtest(pebble, "set-servfail", {"host": bad})
    try:
        cert = certificates.create_certificate(db, project_id, {"names": [bad]}, ACTOR,
                                               settings=s)
        job = certificates.request_issuance(db, cert["_id"], ACTOR, "initial")
        assert _run(db, s, job["_id"]) == "dead"
        done = db[dbm.JOBS].find_one({"_id": job["_id"]})
        stored = certificates.get_certificate(db, cert["_id"])
        assert stored["failure"]["last_error"]["type"] in done["last_error"]
        assert stored["next_renewal_at"] > dbm.server_now(db) + timedelta(minutes=59)
    finally:
        challtest(pebble, "clear-servfail", {"host": bad})


def test_deleted_certificate_job_is_skipped(env):
    db, s, project_id = env
    cert = certificates.create_certificate(db, project_id, {"names": ["gone.jobs.test"]},
                                           ACTOR, settings=s)
    job = certificates.request_issuance(db, cert["_id"], ACTOR, "initial")
    certificates.delete_certificate(db, cert["_id"], ACTOR)
    assert _run(db, s, job["_id"]) == "succeeded"
    assert db[dbm.JOBS].find_one({"_id": job["_id"]})["result"]["outcome"] == "skipped"
    assert db[dbm.ORDERS].count_documents({"certificate_id": cert["_id"]}) == 0
