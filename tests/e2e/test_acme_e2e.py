"""Whole processes against Debian's Pebble: gunicorn (the api, serving HTTP-01 on the port
Pebble's VA fetches), Celery workers running certificates.issue, and the scheduler leader
running the renewal scan.

- Issue and renew EC, RSA and a 10-name certificate; the api process answers the CA.
- kill -9 the worker between newOrder's answer and saving its URL, right after the order
  URL is stored, and right after a challenge is answered (tests/helpers/crash_points.py,
  CAP_TEST_CRASH_AT): a peer resumes the same order (the unsaved one found in the
  account's orders list at the CA); ``orders`` and Pebble's log show one order for the attempt;
  the certificate is issued.
"""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
import requests

from app import db as dbm
from app.audit import system_actor
from app.domain import accounts, certificates, orders
from devstack.embedded import free_port
from tests.helpers import wait_for
from tests.integration.test_acme_helpers import make_project

ACTOR = system_actor("cli")


def stack_env(cap_env, pebble, **extra):
    env = dict(cap_env)
    env.update({
        "CAP_ACME_DIRECTORY_URL": pebble.directory_url,
        "CAP_ACME_CA_BUNDLE": str(pebble.ca_cert),
        "CAP_JOB_LEASE_SECONDS": "6",
        "CAP_REAPER_REPUBLISH_SECONDS": "2",
        "CAP_API_RATE_LIMIT": "off",
        "CAP_LOG_LEVEL": "INFO",
    })
    env.update(extra)
    return env


def start_api(procs, env, pebble):
    bind = f"127.0.0.1:{pebble.http_port}"
    proc = procs.api(env, bind, workers=2)

    def ready():
        try:
            return requests.get(f"http://{bind}/healthz", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    wait_for(ready, timeout=60, message="api on Pebble's HTTP-01 port")
    return proc


@pytest.fixture
def setup(migrated_db, settings, pebble, cap_env, monkeypatch):
    monkeypatch.setenv("CAP_ACME_DIRECTORY_URL", pebble.directory_url)
    monkeypatch.setenv("CAP_ACME_CA_BUNDLE", str(pebble.ca_cert))
    project_id = make_project(migrated_db, "e2e-acme")
    s = settings.with_overrides(acme_directory_url=pebble.directory_url,
                                acme_ca_bundle=pebble.ca_cert)
    account = accounts.create_account(migrated_db, project_id, {
        "contact": ["ops@example.test"], "terms_agreed": True}, ACTOR, register=False,
        settings=s)
    return migrated_db, project_id, account, s


def wait_issued(db, cert_id, serial_not=None, timeout=150.0):
    def done():
        doc = db[dbm.CERTIFICATES].find_one({"_id": cert_id})
        if doc and doc.get("status") == "issued" and doc.get("serial") != serial_not:
            return doc
        return None

    try:
        return wait_for(done, timeout=timeout, interval=0.2,
                        message=f"certificate {cert_id} issued")
    except pytest.fail.Exception:
        jobs = [{k: j.get(k) for k in ("state", "attempts", "last_error", "payload")}
                for j in db[dbm.JOBS].find({"payload.certificate_id": cert_id})]
        doc = db[dbm.CERTIFICATES].find_one({"_id": cert_id}) or {}
        pytest.fail(f"certificate {cert_id} not issued within {timeout:g} s: status "
                    f"{doc.get('status')}, failure {doc.get('failure')}, jobs {jobs}")


def test_issue_and_renew_through_the_api_process(setup, procs, pebble, cap_env):
    db, project_id, _, s = setup
    scan = {"name": "test.renewal_scan", "every_seconds": 2,
            "kind": "certificates.renewal_scan"}
    env = stack_env(cap_env, pebble, CAP_SCHEDULER_EXTRA_ENTRIES=json.dumps([scan]))
    api = start_api(procs, env, pebble)
    metrics_port = free_port()
    procs.worker({**env, "CAP_WORKER_METRICS_PORT": str(metrics_port)}, concurrency=2)
    procs.scheduler(env)

    specs = {
        "ec": {"names": ["ec.e2e.test"], "key_type": "ec256"},
        "rsa": {"names": ["rsa.e2e.test"], "key_type": "rsa2048"},
        "ten": {"names": [f"san{i}.ten.e2e.test" for i in range(10)], "key_type": "ec384"},
    }
    certs = {k: certificates.create_certificate(db, project_id, spec, ACTOR, settings=s)
             for k, spec in specs.items()}
    for cert in certs.values():
        certificates.request_issuance(db, cert["_id"], ACTOR, "initial")
    issued = {k: wait_issued(db, c["_id"]) for k, c in certs.items()}
    assert len(issued["ten"]["names"]) == 10

    from cryptography import x509

    leaf = x509.load_pem_x509_certificate(issued["ten"]["certificate_pem"].encode())
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sorted(sans.get_values_for_type(x509.DNSName)) == sorted(specs["ten"]["names"])
    # the api process answered Pebble's validation requests
    wait_for(lambda: "/.well-known/acme-challenge/" in api.log(), timeout=10,
             message="HTTP-01 requests in the api's access log")

    # time passes: the renewal is due; the scheduler's scan enqueues it, a worker renews
    for cert in certs.values():
        db[dbm.CERTIFICATES].update_one({"_id": cert["_id"]}, {"$set": {
            "next_renewal_at": dbm.server_now(db) - timedelta(seconds=1)}})
    renewed = {k: wait_issued(db, c["_id"], serial_not=issued[k]["serial"])
               for k, c in certs.items()}
    for key, doc in renewed.items():
        assert doc["key_id"] != issued[key]["key_id"]
        assert doc["issue_count"] == 2
        assert doc["next_renewal_at"] > dbm.server_now(db) + timedelta(days=365)
    jobs = list(db[dbm.JOBS].find({"kind": "certificates.issue"}))
    assert sorted(j["payload"]["reason"] for j in jobs) == ["initial"] * 3 + ["renewal"] * 3
    assert all(j["state"] == "succeeded" for j in jobs)
    # The worker removes the order's challenge records just after the transaction that
    # stores the certificate and completes the job, so they may outlive "succeeded" by a
    # moment; they must not outlive the run.
    wait_for(lambda: db[dbm.CHALLENGES].count_documents({}) == 0, timeout=10,
             message="the orders' challenge records removed")

    # The worker serves what its two pool processes counted, summed. A pool process
    # counts a job once its handler has returned, which is after the transaction that
    # completed it and after the challenge cleanup above: the last count may trail both
    # by a moment (CI once scraped 5 of 6 in between).
    def counted():
        samples = scrape(f"http://127.0.0.1:{metrics_port}/metrics")
        issued_ok = [value for name, labels, value in samples
                     if name == "certautopilot_jobs_completed_total"
                     and labels == {"kind": "certificates.issue", "state": "succeeded"}]
        return samples if issued_ok == [6.0] else None

    samples = wait_for(counted, timeout=10, interval=0.2,
                       message="6 succeeded issuances counted by the worker's metrics")
    acme = [(labels, value) for name, labels, value in samples
            if name == "certautopilot_acme_requests_total"]
    assert sum(value for labels, value in acme
               if labels["endpoint"] == "newOrder" and labels["status"] == "201") == 6
    assert all(labels["ca"] for labels, _ in acme)


def scrape(url):
    """(name, labels, value) of every sample a Prometheus endpoint serves."""
    from prometheus_client.parser import text_string_to_metric_families

    answer = requests.get(url, timeout=10)
    answer.raise_for_status()
    return [(sample.name, sample.labels, sample.value)
            for family in text_string_to_metric_families(answer.text)
            for sample in family.samples]


@pytest.mark.parametrize("point", ["order_unsaved", "order_stored", "challenge_answered"])
def test_kill9_worker_then_a_peer_resumes_the_same_order(setup, procs, pebble, cap_env,
                                                         point):
    db, project_id, _, s = setup
    env = stack_env(cap_env, pebble)
    start_api(procs, env, pebble)
    names = [f"{point.replace('_', '-')}-{i}.kill.e2e.test" for i in range(3)]
    cert = certificates.create_certificate(db, project_id, {"names": names}, ACTOR,
                                           settings=s)
    orders_before = pebble.log().count("Added order")

    doomed = procs.worker({**env, "CAP_TEST_CRASH_AT": point,
                           "CAP_EXTRA_HANDLER_MODULES": "tests.helpers.crash_points"},
                          name="doomed")
    job = certificates.request_issuance(db, cert["_id"], ACTOR, "initial")
    wait_for(lambda: not doomed.alive(), timeout=60, message=f"worker killed at {point}")
    assert doomed.popen.returncode == -9
    stored = db[dbm.ORDERS].find_one({"job_id": job["_id"]})
    if point == "order_unsaved":  # the CA made the order; its URL never reached us
        assert pebble.log().count("Added order") == orders_before + 1
        assert stored["state"] == "created" and stored["new_order_sent_at"]
        assert not stored.get("order_url")
    else:
        assert stored["order_url"] and stored["state"] == "pending"
    if point == "challenge_answered":
        assert sum(1 for a in stored["authorizations"] if a.get("answered_at")) == 1
    assert db[dbm.JOBS].find_one({"_id": job["_id"]})["state"] == "running"

    procs.worker(env, name="peer")
    doc = wait_issued(db, cert["_id"], timeout=120)
    assert doc["order_id"] == stored["_id"]
    assert db[dbm.ORDERS].count_documents({"certificate_id": cert["_id"]}) == 1
    assert pebble.log().count("Added order") == orders_before + 1
    order = orders.get(db, stored["_id"])
    assert order["state"] == "completed"
    done = db[dbm.JOBS].find_one({"_id": job["_id"]})
    assert done["state"] == "succeeded" and done["attempts"] == 2
    owners = [h.get("worker") for h in done["history"] if h.get("event") == "claimed"]
    assert len(owners) == 2 and owners[0] != owners[1]
    assert order["fence"]["lease_token"] == done["lease"]["token"]
