"""``certautopilot health``: every check an operator relies on before sleeping, each
named when it fails."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from click.testing import CliRunner

from app.cli import cli

pytestmark = pytest.mark.integration


@pytest.fixture
def ca_env(cap_env, pebble, monkeypatch):
    monkeypatch.setenv("CAP_ACME_DIRECTORY_URL", pebble.directory_url)
    monkeypatch.setenv("CAP_ACME_CA_BUNDLE", str(pebble.ca_cert))
    return cap_env


def health(*args: str):
    return CliRunner().invoke(cli, ["health", *args])


def test_health_names_each_failing_check_and_passes_once_the_cluster_runs(
        migrated_db, ca_env, settings) -> None:
    from app.db.clock import server_now
    from app.jobs import enqueue
    from app.jobs.workers import WorkerHeartbeat
    from scheduler.lease import Lease, LeaseConfig

    # Nothing runs yet: no leader, no worker. The KEK, database and CA are fine.
    result = health("--json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    checks = report["checks"]
    assert not report["healthy"]
    assert checks["database"]["ok"] and checks["kek"]["ok"]
    assert checks["ca_directories"]["ok"], checks["ca_directories"]
    assert not checks["scheduler_leader"]["ok"] and not checks["workers"]["ok"]
    assert "scheduler_leader" in result.stderr and "workers" in result.stderr

    lease = Lease(migrated_db, LeaseConfig(lease_seconds=60), holder="test-leader")
    assert lease.acquire()
    WorkerHeartbeat(lambda: migrated_db, settings, node="w1@test", pool="prefork",
                    concurrency=1, running=list).beat()
    result = health()
    assert result.exit_code == 0, result.output
    assert "ok   scheduler_leader:" in result.stdout and "ok   workers:" in result.stdout

    # A due job that nobody picks up for longer than the bound fails queue_age.
    job = enqueue(migrated_db, "certificates.renewal_scan", {}, publish=False)
    # Age it through the data (enqueue never dates a job in the past).
    migrated_db["jobs"].update_one({"_id": job["_id"]}, {"$set": {
        "run_after": server_now(migrated_db) - timedelta(minutes=10)}})
    result = health("--max-queued-age", "60")
    assert result.exit_code == 1
    assert "queue_age (the oldest due job has waited" in result.stderr


def test_an_unreachable_ca_directory_is_named(migrated_db, cap_env, monkeypatch) -> None:
    monkeypatch.setenv("CAP_ACME_DIRECTORY_URL", "https://127.0.0.1:9/dir")
    result = health("--json")
    assert result.exit_code == 1
    checks = json.loads(result.stdout)["checks"]
    assert not checks["ca_directories"]["ok"]
    assert "https://127.0.0.1:9/dir" in checks["ca_directories"]["error"]


def test_a_bad_argument_is_one_line_and_exit_2(cap_env) -> None:
    result = health("--max-queued-age", "soon")
    assert result.exit_code == 2
    assert "soon" in result.output
