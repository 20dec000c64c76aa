"""Running one job: claim it, call its handler with a heartbeat, record the outcome.

``run_job(job_id)`` is what a worker does for each wake-up (``tasks/`` calls it). It
never raises for anything a job or its message can contain: malformed ids, unknown or
malformed kinds and payloads, handler exceptions all end as a recorded outcome and a log
line, and the worker keeps running.

Shutdown: ``begin_drain(grace)`` (the worker calls it on SIGTERM) makes this process take
no new job; jobs already running get ``grace`` seconds to finish, then their leases are
released (so a peer re-claims them at once instead of waiting for the lease to lapse),
their handlers are told (``LeaseLost``) and the process exits. A prefork pool process
(``exit_after=False``) does not exit at once: its handler unwinds on ``LeaseLost`` and
the task returns, and the pool stops the process with the others. (A pool process that
exits by itself during the warm shutdown is replaced by billiard, and a replacement
killed while it holds the pool's queue lock deadlocks the main process's shutdown.) Only
a handler still running ``STUCK_HANDLER_EXIT_SECONDS`` after its lease was released
makes the process exit anyway.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import traceback
from typing import Any

from pymongo.database import Database

from app import db as dbm
from app.config import Settings, load_settings
from app.db import Doc
from app.jobs import broker, lifecycle
from app.jobs.context import JobContext, LeaseKeeper
from app.jobs.errors import LeaseLost, PermanentFailure, RetryLater
from app.jobs.registry import HandlerSpec, get_handler, registered_kinds, valid_kind
from app.logs import redact, request_id_var

log = logging.getLogger("certautopilot.jobs")

_running: dict[str, JobContext] = {}
_running_lock = threading.Lock()
_draining = threading.Event()
_drain_timer: threading.Timer | None = None


def worker_identity(pid: int | None = None) -> str:
    """The owner name of the job leases a process takes (this one, or ``pid`` here)."""
    return f"{socket.gethostname()}:{pid or os.getpid()}"


def running_jobs() -> list[str]:
    with _running_lock:
        return list(_running)


def is_draining() -> bool:
    return _draining.is_set()


def _observe(kind: str, state: str, started: float) -> None:
    try:
        from app.metrics import JOB_DURATION, JOBS_COMPLETED

        label = kind if valid_kind(kind) else "invalid"
        JOBS_COMPLETED.labels(label, state).inc()
        JOB_DURATION.labels(label, state).observe(time.monotonic() - started)
    except Exception:  # noqa: BLE001 - metrics never break a job
        pass


def run_job(job_id: object, *, db: Database[Doc] | None = None,
            settings: Settings | None = None, worker: str | None = None) -> str:
    """Handle one wake-up. Returns the outcome: succeeded, retry, retry_later, dead,
    lease_lost, skipped (nothing to claim), deferred (draining), invalid, db_unavailable."""
    if not lifecycle.valid_job_id(job_id):
        log.error("ignoring a wake-up with a malformed job id",
                  extra={"job_id": repr(job_id)[:100], "event": "job.invalid_wakeup"})
        return "invalid"
    job_id = str(job_id)
    settings = settings or load_settings()
    db = db if db is not None else dbm.get_db(settings)
    worker = worker or worker_identity()
    if _draining.is_set():
        broker.publish_wakeup(job_id, settings=settings)
        return "deferred"
    try:
        job = lifecycle.claim(db, job_id, worker, settings=settings)
    except Exception as exc:  # noqa: BLE001 - the job stays queued; the reaper re-publishes
        log.error("could not claim a job; it stays for the reaper",
                  extra={"job_id": job_id, "error": f"{exc.__class__.__name__}: {exc}"[:300]})
        return "db_unavailable"
    if job is None:
        log.debug("nothing to claim", extra={"job_id": job_id})
        return "skipped"
    token = request_id_var.set(job_id)
    try:
        return _execute(db, job, settings, worker)
    finally:
        request_id_var.reset(token)


def _execute(db: Database[Doc], job: Doc, settings: Settings, worker: str) -> str:
    started = time.monotonic()
    job_id = str(job["_id"])
    kind_value = job.get("kind")
    kind = kind_value if isinstance(kind_value, str) else repr(kind_value)
    spec = get_handler(kind) if valid_kind(kind_value) else None
    max_attempts = (spec.max_attempts if spec and spec.max_attempts else None) \
        or job.get("max_attempts") or settings.job_max_attempts
    attempts = int(job.get("attempts") or 0)
    token = job["lease"]["token"]

    def record_failure(error: str, permanent: bool) -> str:
        try:
            state = lifecycle.fail(
                db, job_id, token, error, attempts=attempts, max_attempts=max_attempts,
                permanent=permanent,
                backoff_base_seconds=spec.backoff_base_seconds if spec else 5.0,
                backoff_max_seconds=spec.backoff_max_seconds if spec else 600.0,
                worker=worker, settings=settings)
        except Exception as exc:  # noqa: BLE001 - the lease lapses; the reaper requeues
            log.error("could not record a job failure; the lease will lapse",
                      extra={"job_id": job_id, "error": str(exc)[:300]})
            _observe(kind, "error", started)
            return "db_unavailable"
        outcome = {None: "lease_lost", lifecycle.DEAD: "dead", lifecycle.QUEUED: "retry"}[state]
        (log.error if outcome == "dead" else log.warning)(
            "job %s (%s) failed on attempt %s of %s (%s): %s", job_id, kind, attempts,
            max_attempts, outcome, error[:300],
            extra={"job_id": job_id, "kind": kind, "attempt": attempts,
                   "max_attempts": max_attempts, "outcome": outcome, "error": error[:500],
                   "event": "job.failed"})
        _observe(kind, outcome, started)
        return outcome

    if attempts > max_attempts:
        return record_failure(f"no attempts left (attempt {attempts} of {max_attempts})",
                              True)
    if not valid_kind(kind_value):
        return record_failure(f"malformed job: kind {kind_value!r} is not a job kind "
                              "(dotted lowercase words, e.g. 'certificates.issue')", True)
    if spec is None:
        known = ", ".join(registered_kinds()) or "none"
        return record_failure(f"unknown job kind {kind!r}: no handler is registered for it "
                              f"in this worker (known kinds: {known})", False)
    payload = job.get("payload")
    if not isinstance(payload, dict):
        return record_failure(f"malformed payload for {kind}: expected an object, got "
                              f"{type(payload).__name__}", True)
    if spec.validate is not None:
        try:
            spec.validate(payload)
        except (ValueError, TypeError, KeyError) as exc:
            return record_failure(f"invalid payload for {kind}: {exc}", True)

    ctx = JobContext(db, job, worker=worker, lease_seconds=settings.job_lease_seconds,
                     settings=settings)
    with _running_lock:
        _running[job_id] = ctx
    keeper = LeaseKeeper(ctx).start()
    try:
        return _call(db, ctx, spec, started, record_failure, keeper)
    finally:
        keeper.stop()
        with _running_lock:
            _running.pop(job_id, None)


def _call(db: Database[Doc], ctx: JobContext, spec: HandlerSpec, started: float,
          record_failure: Any, keeper: LeaseKeeper) -> str:
    job_id, kind = ctx.job_id, ctx.kind
    try:
        result = spec.fn(ctx)
    except LeaseLost as exc:
        if ctx.completed:
            return _succeeded(ctx, started)
        log.warning("job %s abandoned: %s", job_id, exc.reason,
                    extra={"job_id": job_id, "kind": kind, "reason": exc.reason})
        _observe(kind, "lease_lost", started)
        return "lease_lost"
    except RetryLater as exc:
        if ctx.completed:
            return _succeeded(ctx, started)
        if not ctx.lease_valid():
            _observe(kind, "lease_lost", started)
            return "lease_lost"
        try:
            ok = lifecycle.retry_later(db, job_id, ctx.lease_token, exc.delay_seconds, exc.reason,
                                   worker=ctx.worker, settings=ctx.settings)
        except Exception as err:  # noqa: BLE001
            log.error("could not reschedule a job", extra={"job_id": job_id,
                                                           "error": str(err)[:300]})
            return "db_unavailable"
        log.info("job will retry later", extra={"job_id": job_id, "kind": kind,
                                                "delay_s": exc.delay_seconds,
                                                "reason": exc.reason})
        _observe(kind, "retry_later" if ok else "lease_lost", started)
        return "retry_later" if ok else "lease_lost"
    except PermanentFailure as exc:
        if ctx.completed:
            return _succeeded(ctx, started)
        return str(record_failure(f"permanent failure: {exc.reason}", True))
    except Exception as exc:  # noqa: BLE001 - any handler error is a failed attempt
        if ctx.completed:
            log.warning("handler raised after its completing transaction committed",
                        extra={"job_id": job_id, "error": str(exc)[:300]})
            return _succeeded(ctx, started)
        tail = redact("".join(traceback.format_exception(exc)[-3:]))[-1500:]
        log.debug("handler traceback", extra={"job_id": job_id, "traceback": tail})
        return str(record_failure(redact(f"{exc.__class__.__name__}: {exc}"), False))

    if ctx.completed:
        return _succeeded(ctx, started)
    if result is not None and not isinstance(result, dict):
        return str(record_failure(f"handler for {kind} returned {type(result).__name__}; "
                                  "expected a dict or None", True))
    if not ctx.lease_valid():
        log.warning("job finished after its lease was lost; not completing it",
                    extra={"job_id": job_id, "kind": kind, "event": "job.complete_refused",
                           "reason": ctx.lost_reason})
        _observe(kind, "lease_lost", started)
        return "lease_lost"
    keeper.stop()  # no renewal of ours races the completion
    try:
        done = lifecycle.complete(db, job_id, ctx.lease_token, result, worker=ctx.worker,
                              plain=ctx.may_write_plainly())
    except Exception as exc:  # noqa: BLE001 - the lease lapses; a peer re-runs the job
        log.error("could not record a job's completion; the lease will lapse",
                  extra={"job_id": job_id, "error": str(exc)[:300]})
        return "db_unavailable"
    if not done:
        _observe(kind, "lease_lost", started)
        return "lease_lost"
    ctx.result = result
    return _succeeded(ctx, started)


def _succeeded(ctx: JobContext, started: float) -> str:
    log.info("job %s (%s) succeeded", ctx.job_id, ctx.kind,
             extra={"job_id": ctx.job_id, "kind": ctx.kind, "attempt": ctx.attempt,
                    "event": "job.succeeded",
                    "duration_s": round(time.monotonic() - started, 3)})
    _observe(ctx.kind, "succeeded", started)
    return "succeeded"


# ---------------------------------------------------------------------------- draining


def begin_drain(grace_seconds: float, *, exit_after: bool = True) -> None:
    """Take no new job; after ``grace_seconds`` release the leases of jobs still running
    (a peer re-claims them at once), tell their handlers, and exit the process if any
    was abandoned. Idempotent."""
    global _drain_timer
    if _draining.is_set():
        return
    _draining.set()
    log.info("draining: no new jobs; running jobs have %ss to finish", grace_seconds,
             extra={"running": running_jobs(), "event": "worker.draining"})
    _drain_timer = threading.Timer(grace_seconds, _abandon_running, kwargs={
        "exit_after": exit_after})
    _drain_timer.daemon = True
    _drain_timer.start()


STUCK_HANDLER_EXIT_SECONDS = 10.0
_stuck_timer: threading.Timer | None = None


def _exit_if_still_running(job_ids: set[str]) -> None:
    with _running_lock:
        stuck = job_ids & set(_running)
    if stuck:
        log.error("a handler ignored the loss of its lease; exiting the process",
                  extra={"job_ids": sorted(stuck), "event": "job.stuck_handler_exit"})
        logging.shutdown()
        os._exit(0)


def _abandon_running(exit_after: bool = True) -> int:
    with _running_lock:
        contexts = list(_running.values())
    for ctx in contexts:
        ctx.lose("the worker is shutting down and its grace period is over")
        try:
            released = lifecycle.release(ctx.db, ctx.job_id, ctx.lease_token,
                                     "worker shut down before the job finished",
                                     worker=ctx.worker, settings=ctx.settings)
        except Exception as exc:  # noqa: BLE001 - the lease then lapses on its own
            released = False
            log.error("could not release a job lease on shutdown; it will lapse",
                      extra={"job_id": ctx.job_id, "error": str(exc)[:300]})
        log.warning("abandoned a running job at shutdown", extra={
            "job_id": ctx.job_id, "kind": ctx.kind, "released": released,
            "event": "job.abandoned"})
    if contexts and exit_after:
        logging.shutdown()
        os._exit(0)
    if contexts:
        global _stuck_timer
        _stuck_timer = threading.Timer(STUCK_HANDLER_EXIT_SECONDS, _exit_if_still_running,
                                       args=({ctx.job_id for ctx in contexts},))
        _stuck_timer.daemon = True
        _stuck_timer.start()
    return len(contexts)
