"""``app.probes``: what a worker or scheduler records, and how the probe judges it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from app import probes
from app.config import Settings


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(probe_dir=tmp_path / "probe", job_lease_seconds=60.0)


def test_a_recorded_healthy_loop_passes(settings: Settings) -> None:
    probes.record(settings, "worker", ok=True, detail="running")
    state = probes.check(settings, "worker")
    assert state["pid"] == os.getpid() and state["detail"] == "running"
    assert state["max_age_seconds"] == 30.0


def test_no_state_yet_fails_naming_the_file(settings: Settings) -> None:
    with pytest.raises(probes.ProbeFailed, match="no scheduler state at .*scheduler.json"):
        probes.check(settings, "scheduler")


def test_a_stale_loop_fails_as_stuck(settings: Settings) -> None:
    probes.record(settings, "worker", ok=True)
    later = json.loads(probes.state_path(settings, "worker").read_text())["tick_at"] + 31
    with pytest.raises(probes.ProbeFailed, match="stuck: its loop last ran 31.0s ago"):
        probes.check(settings, "worker", now=later)
    assert probes.check(settings, "worker", max_age=60, now=later)["tick_age_seconds"] == 31


def test_a_loop_that_cannot_reach_the_database_fails(settings: Settings) -> None:
    probes.record(settings, "scheduler", ok=False, error=TimeoutError("no primary"))
    with pytest.raises(probes.ProbeFailed, match="not reached the database yet .no primary."):
        probes.check(settings, "scheduler")


def test_a_database_lost_long_ago_fails_even_while_the_loop_runs(settings: Settings) -> None:
    path = probes.state_path(settings, "scheduler")
    probes.record(settings, "scheduler", ok=True)
    state = json.loads(path.read_text())
    state["ok_at"] -= 100
    path.write_text(json.dumps(state))
    with pytest.raises(probes.ProbeFailed, match="not reached the database for 100"):
        probes.check(settings, "scheduler")


def test_a_state_written_by_a_dead_process_fails(settings: Settings) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    probes.record(settings, "worker", ok=True)
    path = probes.state_path(settings, "worker")
    state = json.loads(path.read_text())
    state["pid"] = int(dead.stdout)
    path.write_text(json.dumps(state))
    with pytest.raises(probes.ProbeFailed, match="is gone"):
        probes.check(settings, "worker")


@pytest.mark.parametrize("text", ["", "[]", '{"pid": "1"}', "{not json"])
def test_a_malformed_state_fails(settings: Settings, text: str) -> None:
    path = probes.state_path(settings, "worker")
    path.parent.mkdir(parents=True)
    path.write_text(text)
    with pytest.raises(probes.ProbeFailed, match="state at"):
        probes.check(settings, "worker")


def test_an_unwritable_probe_dir_never_breaks_the_loop(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    settings = Settings(probe_dir=blocker / "sub")
    probes.record(settings, "worker", ok=True)  # logs, does not raise
    with pytest.raises(probes.ProbeFailed):
        probes.check(settings, "worker")


def test_default_bounds_follow_the_loop_periods() -> None:
    assert probes.default_max_age(Settings(job_lease_seconds=300.0), "worker") == 30.0
    assert probes.default_max_age(Settings(scheduler_renew_seconds=20.0,
                                           scheduler_lease_seconds=60.0), "scheduler") == 60.0
