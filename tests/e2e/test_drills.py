"""HIGH-AVAILABILITY.md's promises, drilled: ``scripts/drills/run.py --quick``.

The whole stack as processes (embedded database, Pebble, 3 api behind HAProxy, 3 workers,
2 schedulers) renews 20 certificates in each drill while a probe sends API requests
through HAProxy: a rolling restart of every role, workers killed with -9 every 10 s,
the scheduler leader killed and then paused past its lease, the database stepped down,
failpointed and killed -9, an api killed -9. The pass conditions are the issue's
(see the script's docstring); the full drills (200 certificates) run from the script.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(1500)  # the harness alone takes 4-10 minutes


@pytest.fixture(scope="module")
def drills(tmp_path_factory: pytest.TempPathFactory) -> dict:
    if not shutil.which("haproxy"):
        pytest.fail("Debian's haproxy is not installed: run scripts/test (it installs it)")
    workdir = tmp_path_factory.mktemp("drills")
    harness = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "drills" / "run.py"), "--quick",
         "--workdir", str(workdir)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        stdout, stderr = harness.communicate(timeout=1200)
    except subprocess.TimeoutExpired:
        pytest.fail("the drills took over 20 minutes")
    finally:
        if harness.poll() is None:
            # SIGTERM: the harness stops every process it started, then exits.
            harness.terminate()
            harness.communicate(timeout=180)
    print(stdout)
    print(stderr[-6000:], file=sys.stderr)
    lines = stdout.strip().splitlines()
    assert lines, f"no output; stderr:\n{stderr[-4000:]}"
    results = json.loads(lines[-1])
    results["_exit"] = harness.returncode
    return results


def test_every_drill_ran_and_passed(drills: dict) -> None:
    failed = {k: v for k, v in drills.items() if k != "_exit" and not v.get("passed")}
    assert not failed, json.dumps(failed, indent=1)
    assert drills["_exit"] == 0
    for name in ("rolling_restart", "worker_loss", "scheduler_loss", "database_faults",
                 "api_loss"):
        result = drills[name]
        assert result["audit_verify_ok"] and result["health_ok"], name
        assert result["renewed"] == result["certificates"] == 20, name
        assert result["lost_jobs"] == 0 and result["lost_writes"] == 0, name


def test_rolling_restart_fails_no_renewal_and_keeps_the_api_up(drills: dict) -> None:
    r = drills["rolling_restart"]
    assert r["failed_renewal_jobs"] == 0
    assert r["duplicate_orders"] == 0
    assert r["probe_success_ratio"] >= 0.9995
    assert r["rolled"] == ["migrate", "api0", "api1", "api2", "worker0", "worker1",
                           "worker2", "scheduler (leader)", "scheduler"]


def test_worker_loss_converges_within_5_minutes(drills: dict) -> None:
    r = drills["worker_loss"]
    assert r["duplicate_orders"] == 0
    assert r["converged_s"] is not None and r["converged_s"] <= 300
    assert r["workers_killed"] >= 1


def test_scheduler_loss_promotes_within_30s_and_enqueues_no_slot_twice(drills: dict) -> None:
    r = drills["scheduler_loss"]
    assert len(r["promotions_s"]) == 2 and max(r["promotions_s"]) <= 30
    assert r["duplicate_enqueues"] == 0
    assert r["paused_leader_alive"]


def test_database_faults_lose_nothing_and_answer_no_500(drills: dict) -> None:
    r = drills["database_faults"]
    assert r["lost_jobs"] == 0 and r["lost_writes"] == 0
    assert r["probe_500"] == 0
    assert r["renewed_after_db_return_s"] <= 300


def test_api_loss_keeps_the_api_up(drills: dict) -> None:
    r = drills["api_loss"]
    assert r["probe_success_ratio"] >= 0.9995
    assert r["probe_transport_errors"] == {}
