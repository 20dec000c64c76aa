"""Exceptions of the durable job queue.

Handlers raise ``RetryLater`` and ``PermanentFailure``; the runner raises ``LeaseLost``
into a handler (through ``JobContext.check_lease()`` and ``JobContext.transaction()``)
when its claim on the job is gone. Operator-facing errors derive from
``CertAutoPilotError`` so the API and the CLI map them in one place.
"""

from __future__ import annotations

from datetime import datetime

from app.errors import CertAutoPilotError, Conflict, NotFound


class RetryLater(Exception):  # noqa: N818 - a control signal, named for what it asks
    """Raised by a handler: try again after ``delay_seconds`` without spending one of the
    job's failure attempts (e.g. a DNS record that has not propagated yet)."""

    def __init__(self, delay_seconds: float, reason: str = "retry later") -> None:
        if not delay_seconds >= 0:
            raise ValueError("RetryLater delay_seconds must be >= 0")
        super().__init__(reason)
        self.delay_seconds = float(delay_seconds)
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.reason} (retry in {self.delay_seconds:g}s)"


class DeferUntil(RetryLater):
    """Raised by a handler: the job may not run before ``until`` (the database server's
    clock, as ``now`` was read): it is rescheduled then, neither failed nor charged an
    attempt (e.g. a shared rate-limit budget with no token free before ``until``)."""

    def __init__(self, until: datetime, now: datetime, reason: str = "deferred") -> None:
        super().__init__(max(0.0, (until - now).total_seconds()), reason)
        self.until = until


class PermanentFailure(Exception):  # noqa: N818 - a control signal, named for what it asks
    """Raised by a handler: retrying cannot help; the job goes ``dead`` at once."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class LeaseLost(Exception):  # noqa: N818 - it says what happened
    """This worker no longer holds the job's lease (it lapsed, a peer re-claimed the job,
    or the worker is shutting down and released it). The handler must stop before any
    further external side effect; nothing it writes through the fenced paths commits."""

    def __init__(self, job_id: str, reason: str = "lease lost") -> None:
        super().__init__(f"job {job_id}: {reason}")
        self.job_id = job_id
        self.reason = reason


class JobNotFound(NotFound):
    code = "job_not_found"

    def __init__(self, job_id: str) -> None:
        super().__init__(f"job {job_id!r} not found")
        self.job_id = job_id


class JobStateConflict(Conflict):
    code = "job_state_conflict"

    def __init__(self, job_id: str, state: str, wanted: str) -> None:
        super().__init__(f"job {job_id} is {state}: {wanted}")
        self.job_id = job_id
        self.state = state


class InvalidJob(CertAutoPilotError):
    """Bad arguments to ``enqueue`` (kind, payload, run_after, dedupe_key)."""

    status, code = 422, "invalid_job"
