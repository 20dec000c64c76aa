"""Liveness/readiness state of the long-running roles, for ``certautopilot probe``.

Workers and schedulers serve no HTTP, so Kubernetes probes them with an exec probe. The
probe must judge *this* process (not the cluster), must be cheap and must never hang on
the database, so the process itself records what it last did in a small JSON file in
``CAP_PROBE_DIR`` (one file per role; each container has its own ``/tmp``):

- the worker, after each heartbeat attempt (``app.jobs.workers.WorkerHeartbeat``);
- the scheduler, after each lease step of its tick (``scheduler.schedulers``).

``{"role", "pid", "started_at", "tick_at", "ok_at", "detail", "error"}``: ``tick_at`` is
the last time the loop ran at all, ``ok_at`` the last time it reached the database
(heartbeat written; lease renewed, acquired or read). Times are this host's wall clock,
written and read on the same host.

The probe fails when the file is missing, when the pid that wrote it is gone, when the
loop has not run for ``max_age`` seconds (a hung or SIGSTOPped process) or when the
database has not been reached for ``max_age`` seconds (a scheduler cut off from it).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.config import Settings

log = logging.getLogger("certautopilot.ops.probes")

ROLES = ("worker", "scheduler")

# A rewrite of the state file when nothing but the times changed happens at most this
# often: the scheduler may tick many times a second while it waits for the lease.
MIN_REWRITE_SECONDS = 1.0


def state_path(settings: Settings, role: str) -> Path:
    return settings.probe_dir / f"{role}.json"


def default_max_age(settings: Settings, role: str) -> float:
    """How stale the state may be before the probe fails: three loop periods, at least
    30 s (a loaded node, a database failover of a few seconds)."""
    if role == "worker":
        # WorkerHeartbeat's interval, plus a reaper pass that may run in the same thread.
        period = max(1.0, min(10.0, settings.job_lease_seconds / 3))
    else:
        period = max(settings.scheduler_renew_seconds, settings.scheduler_retry_seconds)
    return max(30.0, 3 * period)


@dataclass
class _Recorder:
    path: Path
    role: str
    started_at: float
    ok_at: float | None = None
    written_at: float = 0.0
    last_key: tuple[bool, str, str | None] | None = None
    broken: bool = False


_recorders: dict[tuple[str, Path], _Recorder] = {}


def record(settings: Settings, role: str, *, ok: bool, detail: str = "",
           error: BaseException | str | None = None) -> None:
    """Note one pass of ``role``'s loop (``ok``: it reached the database). Never raises:
    a probe file that cannot be written makes the probe fail, not the process."""
    path = state_path(settings, role)
    now = time.time()
    rec = _recorders.get((role, path))
    if rec is None or rec.started_at > now:
        rec = _recorders[(role, path)] = _Recorder(path=path, role=role, started_at=now)
    if ok:
        rec.ok_at = now
    text = None if error is None else str(error)[:300]
    key = (ok, detail, text)
    if key == rec.last_key and now - rec.written_at < MIN_REWRITE_SECONDS:
        return
    state = {"role": role, "pid": os.getpid(), "started_at": rec.started_at, "tick_at": now,
             "ok_at": rec.ok_at, "detail": detail, "error": text}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, path)  # the probe never reads a half-written file
    except OSError as exc:
        if not rec.broken:
            log.error("cannot write the probe state file %s: %s", path, exc)
        rec.broken = True
        return
    rec.broken = False
    rec.written_at = now
    rec.last_key = key


class ProbeFailed(Exception):
    """The probed process is not healthy; the message says why, in one line."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def check(settings: Settings, role: str, max_age: float | None = None,
          now: float | None = None) -> dict[str, Any]:
    """Judge ``role``'s state file; return it (with ages) or raise ``ProbeFailed``."""
    if role not in ROLES:
        raise ProbeFailed(f"unknown role {role!r}: expected one of {', '.join(ROLES)}")
    bound = default_max_age(settings, role) if max_age is None else max_age
    path = state_path(settings, role)
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        raise ProbeFailed(f"no {role} state at {path}: the {role} has not completed a "
                          "loop yet (or CAP_PROBE_DIR differs)") from None
    except (OSError, ValueError) as exc:
        raise ProbeFailed(f"unreadable {role} state at {path}: {exc}") from None
    if not isinstance(state, dict) or not isinstance(state.get("pid"), int) \
            or not isinstance(state.get("tick_at"), int | float):
        raise ProbeFailed(f"malformed {role} state at {path}")
    now = time.time() if now is None else now
    pid = state["pid"]
    if not _alive(pid):
        raise ProbeFailed(f"the {role} process {pid} that wrote {path} is gone")
    tick_age = now - float(state["tick_at"])
    if tick_age > bound:
        raise ProbeFailed(f"{role} {pid} is stuck: its loop last ran {tick_age:.1f}s ago "
                          f"(bound {bound:g}s)")
    ok_at = state.get("ok_at")
    if not isinstance(ok_at, int | float):
        raise ProbeFailed(f"{role} {pid} has not reached the database yet"
                          + (f" ({state['error']})" if state.get("error") else ""))
    ok_age = now - float(ok_at)
    if ok_age > bound:
        raise ProbeFailed(f"{role} {pid} has not reached the database for {ok_age:.1f}s "
                          f"(bound {bound:g}s): {state.get('error') or 'no error recorded'}")
    return {**state, "tick_age_seconds": round(tick_age, 1),
            "ok_age_seconds": round(ok_age, 1), "max_age_seconds": bound}
