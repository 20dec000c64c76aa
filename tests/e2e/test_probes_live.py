"""``certautopilot probe worker|scheduler`` against real processes: each probe judges the
process of its own CAP_PROBE_DIR (as each container has its own /tmp), from the state
that process wrote. A healthy worker or scheduler passes; a SIGSTOPped one fails (its
loop goes stale) and passes again after SIGCONT; a killed one fails; a scheduler that
cannot reach the database fails."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from app import db as dbm
from app.db.names import SCHEDULER_LEASE_ID
from devstack.embedded import free_port
from tests.helpers import wait_for

# Short enough to keep the test quick, far above the loop periods used here (worker
# heartbeat 1 s with CAP_JOB_LEASE_SECONDS=3; scheduler ticks at most every 2 s).
MAX_AGE = "8"


def probe(env: dict[str, str], role: str, max_age: str = MAX_AGE
          ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "app.cli", "probe", role,
                           "--max-age", max_age], env=env, capture_output=True, text=True,
                          timeout=60)


def passes(env: dict[str, str], role: str) -> bool:
    return probe(env, role).returncode == 0


def fails_with(env: dict[str, str], role: str, text: str) -> str | None:
    result = probe(env, role)
    if result.returncode == 1 and text in result.stderr:
        return result.stderr
    return None


def own_dir(env: dict[str, str], tmp_path: Path, name: str) -> dict[str, str]:
    return {**env, "CAP_PROBE_DIR": str(tmp_path / f"probe-{name}")}


def test_worker_probe_passes_while_healthy_and_fails_when_stopped_or_gone(
        jenv, migrated_db, procs, tmp_path) -> None:
    env = own_dir(jenv, tmp_path, "worker")
    worker = procs.worker(env, concurrency=1)
    # Generous: the first heartbeat waits for the worker to boot on a loaded machine.
    wait_for(lambda: passes(env, "worker"), timeout=150, interval=1, message="probe passes")
    ok = probe(env, "worker")
    assert ok.stdout.startswith(f"ok: worker {worker.pid} running")
    state = json.loads((tmp_path / "probe-worker" / "worker.json").read_text())
    assert state["pid"] == worker.pid  # the main process, not a pool child

    worker.signal(signal.SIGSTOP)
    try:
        message = wait_for(lambda: fails_with(env, "worker", "is stuck"), timeout=90,
                           interval=1, message="probe fails on the stopped worker")
        assert f"worker {worker.pid} is stuck" in message
        assert message.count("\n") == 1  # one line
    finally:
        worker.signal(signal.SIGCONT)
    wait_for(lambda: passes(env, "worker"), timeout=90, interval=1,
             message="probe passes again after SIGCONT")

    worker.kill9()
    assert "is gone" in probe(env, "worker").stderr


def test_scheduler_probes_pass_for_leader_and_standby_and_fail_for_a_stopped_one(
        cap_env, migrated_db, procs, tmp_path) -> None:
    envs = [own_dir(cap_env, tmp_path, f"s{i}") for i in range(2)]
    pair = [procs.scheduler(env) for env in envs]
    for env in envs:
        wait_for(lambda env=env: passes(env, "scheduler"), timeout=150, interval=1,
                 message="scheduler probe passes")
    holder = wait_for(lambda: (dbm.primary(migrated_db)[dbm.LEASES].find_one(
        {"_id": SCHEDULER_LEASE_ID}) or {}).get("holder"), timeout=90, message="a leader")
    leader_index = next(i for i, p in enumerate(pair) if p.pid == int(holder.split(":")[-2]))
    details = {i: probe(envs[i], "scheduler").stdout for i in range(2)}
    assert " leader " in details[leader_index]
    assert " standby " in details[1 - leader_index]

    leader, leader_env = pair[leader_index], envs[leader_index]
    standby_env = envs[1 - leader_index]
    leader.signal(signal.SIGSTOP)
    try:
        wait_for(lambda: fails_with(leader_env, "scheduler", "is stuck"), timeout=90,
                 interval=1, message="probe fails on the stopped leader")
        # The standby's probe is about the standby: it still passes (and it takes over).
        assert passes(standby_env, "scheduler")
        wait_for(lambda: " leader " in probe(standby_env, "scheduler").stdout, timeout=90,
                 interval=1, message="the standby leads")
    finally:
        leader.signal(signal.SIGCONT)


def test_scheduler_probe_fails_when_the_database_is_unreachable(
        cap_env, procs, tmp_path) -> None:
    # A port nobody listens on: the scheduler runs, but never reaches the database.
    env = own_dir(cap_env, tmp_path, "cut")
    env["CAP_MONGO_URI"] = f"mongodb://127.0.0.1:{free_port()}/{cap_env['CAP_MONGO_DB']}"
    env["CAP_MONGO_TIMEOUT_MS"] = "500"
    scheduler = procs.scheduler(env)
    message = wait_for(lambda: fails_with(env, "scheduler", "has not reached the database"),
                       timeout=120, interval=1, message="probe fails without a database")
    assert scheduler.alive()  # Running, yet the probe tells Kubernetes to act
    assert f"scheduler {scheduler.pid} has not reached the database yet" in message


@pytest.mark.parametrize("role", ["worker", "scheduler"])
def test_probe_without_any_state_fails_in_one_line(cap_env, tmp_path, role) -> None:
    result = probe(own_dir(cap_env, tmp_path, "empty"), role)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and f"no {role} state" in result.stderr
