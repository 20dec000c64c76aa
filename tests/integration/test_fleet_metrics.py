"""/metrics at fleet scale: the certificate gauges come from one shared snapshot (built
by the metrics.snapshot job), are right against a seeded fleet, can be aggregate-only,
and say how old they are."""

from __future__ import annotations

import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from app import create_app
from app import db as dbm
from app import metrics_snapshot as fleet_metrics
from app.config import load_settings
from app.domain import tokens
from tests.helpers.api import make_project
from tests.helpers.fleet import seed_fleet

EXPIRY = "certautopilot_certificate_expiration_timestamp_seconds"
RENEWAL = "certautopilot_certificate_renewal_timestamp_seconds"
READY = "certautopilot_certificate_ready_status"


def scrape(settings: Any) -> dict[str, list[Any]]:
    tokens.clear_cache()
    response = create_app(settings).test_client().get("/metrics")
    assert response.status_code == 200
    families: dict[str, list[Any]] = {}
    for family in text_string_to_metric_families(response.data.decode()):
        # A family split over two groups would be parsed twice: invalid exposition.
        assert family.name not in families, f"{family.name} appears twice"
        families[family.name] = family.samples
    return families


def chunk_generations(db: Any) -> set[str]:
    return {d["generation"] for d in db[dbm.METRICS_SNAPSHOTS].find({"kind": "chunk"})}


@pytest.fixture
def fleet(migrated_db: Any) -> tuple[list[str], list[dict[str, Any]], datetime]:
    projects = [make_project(migrated_db, f"fleet-{i}") for i in range(3)]
    now = dbm.server_now(migrated_db)
    return projects, seed_fleet(migrated_db, 230, projects, now), now


def test_snapshot_matches_a_seeded_fleet(migrated_db, settings, fleet, monkeypatch) -> None:
    projects, docs, now = fleet
    # Small chunks: the series of each family span several stored chunks.
    monkeypatch.setattr(fleet_metrics, "CHUNK_CERTIFICATES", 40)
    summary = fleet_metrics.refresh(migrated_db, settings)
    live = [d for d in docs if d["deleted_at"] is None]
    assert summary["certificates"] == len(live)
    assert summary["chunks"] >= 3 * (len(live) // 40)

    metrics = scrape(settings)

    expiry = {s.labels["id"]: s.value for s in metrics[EXPIRY]}
    assert expiry == {d["_id"]: d["not_after"].timestamp() for d in live if d["not_after"]}
    renewal = {s.labels["id"]: s.value for s in metrics[RENEWAL]}
    assert renewal == {d["_id"]: d["next_renewal_at"].timestamp() for d in live}
    ready = {s.labels["id"] for s in metrics[READY]
             if s.labels["condition"] == "True" and s.value == 1.0}
    assert ready == {d["_id"] for d in live
                     if d["status"] == "issued" and d["not_after"] > now}
    assert {s.labels["project"] for s in metrics[EXPIRY]} == set(projects)

    by_status = {s.labels["status"]: s.value for s in metrics["certautopilot_certificates"]}
    assert by_status == dict(Counter(d["status"] for d in live))
    issued = [d for d in live if d["status"] == "issued"]
    buckets = {s.labels["le"]: s.value for s in metrics["certautopilot_certificate_days_left"]
               if s.name.endswith("_bucket")}
    for le in ("0.0", "7.0", "30.0", "90.0"):
        days = float(le)
        assert buckets[le] == sum(1 for d in issued if d["not_after"] <= now
                                  + timedelta(days=days)), le
    assert buckets["+Inf"] == len(issued)
    soonest = {s.labels["project"]: s.value
               for s in metrics["certautopilot_project_soonest_expiry_timestamp_seconds"]}
    assert soonest == {p: min(d["not_after"] for d in issued if d["project_id"] == p)
                       .timestamp() for p in projects}


def test_aggregate_switch_serves_no_per_certificate_series(migrated_db, cap_env, fleet,
                                                           settings) -> None:
    aggregate = load_settings({**cap_env, "CAP_METRICS_CERTIFICATE_SERIES": "aggregate"})
    assert aggregate.metrics_certificate_series == "aggregate"
    # A snapshot built per certificate, served by an api set to aggregate: none.
    fleet_metrics.refresh(migrated_db, settings)
    metrics = scrape(aggregate)
    assert not {EXPIRY, RENEWAL, READY} & set(metrics)
    assert sum(s.value for s in metrics["certautopilot_certificates"]) > 0
    assert metrics["certautopilot_project_soonest_expiry_timestamp_seconds"]
    # Built in aggregate mode, the snapshot stores no per-certificate chunk at all.
    summary = fleet_metrics.refresh(migrated_db, aggregate)
    assert summary["chunks"] == 0
    assert chunk_generations(migrated_db) <= {
        g for g in chunk_generations(migrated_db) if g != summary["generation"]}
    assert not {EXPIRY, RENEWAL, READY} & set(scrape(settings))


def test_snapshot_freshness_and_old_generations(migrated_db, settings, fleet) -> None:
    projects, docs, _ = fleet
    before = scrape(settings)
    assert before["certautopilot_metrics_snapshot_age_seconds"][0].value == -1.0
    assert EXPIRY not in before and "certautopilot_certificates" not in before

    generations = [fleet_metrics.refresh(migrated_db, settings)["generation"]]
    server_now = dbm.server_now(migrated_db).timestamp()
    metrics = scrape(settings)
    built = metrics["certautopilot_metrics_snapshot_timestamp_seconds"][0].value
    assert abs(built - server_now) < 30
    assert 0 <= metrics["certautopilot_metrics_snapshot_age_seconds"][0].value < 60

    # A change shows at the next refresh, not before (every replica serves one snapshot).
    migrated_db[dbm.CERTIFICATES].update_one({"_id": docs[0]["_id"]}, {"$set": {
        "not_after": datetime(2031, 1, 1, tzinfo=UTC), "status": "issued"}})
    stale = {s.labels["id"]: s.value for s in scrape(settings)[EXPIRY]}
    assert stale[docs[0]["_id"]] != datetime(2031, 1, 1, tzinfo=UTC).timestamp()
    time.sleep(0.01)
    generations.append(fleet_metrics.refresh(migrated_db, settings)["generation"])
    fresh = {s.labels["id"]: s.value for s in scrape(settings)[EXPIRY]}
    assert fresh[docs[0]["_id"]] == datetime(2031, 1, 1, tzinfo=UTC).timestamp()

    # Chunks of older generations are dropped; the previous one stays for a scrape
    # that read the old head. Every chunk expires by TTL if refreshes stop.
    generations.append(fleet_metrics.refresh(migrated_db, settings)["generation"])
    assert chunk_generations(migrated_db) == set(generations[-2:])
    chunk = migrated_db[dbm.METRICS_SNAPSHOTS].find_one({"kind": "chunk"})
    assert chunk["expire_at"] > dbm.server_now(migrated_db)
    ttl = migrated_db[dbm.METRICS_SNAPSHOTS].index_information()["ttl_expire_at"]
    assert ttl["expireAfterSeconds"] == 0


def test_the_scheduled_job_publishes_the_snapshot(migrated_db, settings, fleet) -> None:
    from app.handlers import load_handlers
    from app.jobs import enqueue
    from app.jobs.runner import run_job
    from scheduler.timed import TIMED_WORK

    work = {w.name: w for w in TIMED_WORK}["metrics.snapshot"]
    assert (work.kind, work.every_seconds) == (fleet_metrics.SNAPSHOT_KIND, 60)
    load_handlers()
    job = enqueue(migrated_db, work.kind, {}, publish=False)
    assert run_job(job["_id"], db=migrated_db, settings=settings) == "succeeded"
    done = migrated_db[dbm.JOBS].find_one({"_id": job["_id"]})
    assert done["result"]["certificates"] == fleet_metrics.read_head(migrated_db)[
        "certificates"] > 0
