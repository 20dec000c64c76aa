"""/metrics: cert-manager-like certificate gauges, ACME request counters, jobs, the
scheduler lease; and a database that stops answering mid-request gives 503."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client.parser import text_string_to_metric_families

from app import create_app
from app import db as dbm
from app.audit import system_actor
from app.domain import accounts, certificates, tokens
from tests.helpers.api import API, make_project, make_token


@pytest.fixture
def client(migrated_db, settings):
    tokens.clear_cache()
    return create_app(settings).test_client()


def scrape(client) -> dict[str, list]:
    response = client.get("/metrics")
    assert response.status_code == 200
    families = {}
    for family in text_string_to_metric_families(response.data.decode()):
        families[family.name] = family.samples
    return families


def test_certificate_scheduler_job_and_acme_metrics(client, migrated_db, settings) -> None:
    from app import metrics_snapshot as fleet_metrics
    from app.metrics import ACME_REQUEST_DURATION, ACME_REQUESTS

    actor = system_actor("cli")
    pid = make_project(migrated_db, "alpha")
    accounts.create_account(migrated_db, pid, {"directory_url": "https://127.0.0.1:1/dir",
                                               "terms_agreed": True}, actor, register=False)
    issued = certificates.create_certificate(migrated_db, pid, {"names": ["m.example.com"]},
                                             actor)
    pending = certificates.create_certificate(migrated_db, pid,
                                              {"names": ["p.example.com"]}, actor)
    not_after = datetime(2027, 3, 1, tzinfo=UTC)
    renew_at = datetime(2027, 1, 30, tzinfo=UTC)
    migrated_db[dbm.CERTIFICATES].update_one({"_id": issued["_id"]}, {"$set": {
        "status": "issued", "not_after": not_after, "next_renewal_at": renew_at}})
    now = dbm.server_now(migrated_db)
    migrated_db[dbm.LEASES].insert_one({"_id": "scheduler", "holder": "sched-a@host",
                                        "term": 7, "expires_at": now + timedelta(seconds=12),
                                        "renewed_at": now, "acquired_at": now})
    from app.jobs import enqueue

    enqueue(migrated_db, "certificates.issue", {"certificate_id": pending["_id"]},
            project_id=pid, publish=False)
    ACME_REQUESTS.labels("pebble.test", "newOrder", "201").inc(3)
    ACME_REQUEST_DURATION.labels("pebble.test", "newOrder", "201").observe(0.04)
    # Fleet gauges come from the snapshot the metrics.snapshot job publishes.
    fleet_metrics.refresh(migrated_db, settings)

    metrics = scrape(client)

    def value(family: str, sample: str | None = None, **labels: str) -> float:
        for s in metrics[family]:
            if (sample is None or s.name == sample) and all(
                    s.labels.get(k) == v for k, v in labels.items()):
                return s.value
        raise AssertionError(f"{family} {labels} not in {metrics.get(family)}")

    expiry = "certautopilot_certificate_expiration_timestamp_seconds"
    assert value(expiry, id=issued["_id"], name="m.example.com", project=pid) == \
        not_after.timestamp()
    assert value("certautopilot_certificate_renewal_timestamp_seconds",
                 id=issued["_id"]) == renew_at.timestamp()
    # A certificate never issued has no expiry yet, and is not ready.
    assert not [s for s in metrics[expiry] if s.labels["id"] == pending["_id"]]
    ready = "certautopilot_certificate_ready_status"
    assert value(ready, id=issued["_id"], condition="True") == 1.0
    assert value(ready, id=issued["_id"], condition="False") == 0.0
    assert value(ready, id=pending["_id"], condition="True") == 0.0
    assert value("certautopilot_scheduler_leader", holder="sched-a@host") == 1.0
    assert value("certautopilot_scheduler_term") == 7.0
    assert value("certautopilot_jobs", kind="certificates.issue", state="queued") == 1.0
    assert value("certautopilot_jobs_queued", kind="certificates.issue") == 1.0
    assert value("certautopilot_acme_requests", "certautopilot_acme_requests_total",
                 ca="pebble.test", endpoint="newOrder", status="201") >= 3
    assert value("certautopilot_acme_request_duration_seconds",
                 "certautopilot_acme_request_duration_seconds_count",
                 ca="pebble.test", endpoint="newOrder") >= 1
    assert value("certautopilot_database_up") == 1.0

    # A lapsed lease: nobody leads.
    migrated_db[dbm.LEASES].update_one({"_id": "scheduler"}, {"$set": {
        "expires_at": now - timedelta(seconds=1)}})
    metrics = scrape(client)
    assert value("certautopilot_scheduler_leader") == 0.0


def test_metrics_still_answer_without_the_database(cap_env) -> None:
    from app.config import load_settings

    settings = load_settings({**cap_env, "CAP_MONGO_URI": "mongodb://127.0.0.1:1/x",
                              "CAP_MONGO_TIMEOUT_MS": "300"})
    response = create_app(settings).test_client().get("/metrics")
    assert response.status_code == 200
    assert b"certautopilot_database_up 0.0" in response.data


def test_database_failing_mid_request_is_503_with_retry_after(client, migrated_db) -> None:
    pid = make_project(migrated_db, "alpha")
    tok = make_token(migrated_db, pid, ["read"])
    assert client.get(f"{API}/certificates", headers=tok.headers).status_code == 200
    admin_db = migrated_db.client.admin
    # The token is cached now; every find on the database fails as during an election.
    admin_db.command({"configureFailPoint": "failCommand", "mode": {"times": 50},
                      "data": {"failCommands": ["find"], "errorCode": 91,
                               "errorLabels": ["RetryableWriteError"]}})
    try:
        response = client.get(f"{API}/certificates", headers=tok.headers)
    finally:
        admin_db.command({"configureFailPoint": "failCommand", "mode": "off"})
    assert response.status_code == 503, response.json
    assert set(response.json) == {"code", "status", "message", "errors"}
    assert int(response.headers["Retry-After"]) >= 1
    assert client.get(f"{API}/certificates", headers=tok.headers).status_code == 200
