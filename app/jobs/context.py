"""What a handler gets: ``JobContext``, and the heartbeat that keeps its lease alive.

While a handler runs, ``LeaseKeeper`` (a thread) renews the lease every lease/3 with the
job's token. When a renewal is refused (a peer re-claimed the job) or cannot be made
before the lease would lapse, the context is marked lost: ``check_lease()`` raises
``LeaseLost`` from then on, and the runner will not complete the job. The context also
keeps a local deadline (monotonic clock, from the last renewal sent), so a process that
was paused (SIGSTOP, a long GC, a frozen VM) sees its lease as lost the moment it
resumes, before its heartbeat thread had a chance to run.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from pymongo.client_session import ClientSession
from pymongo.database import Database

from app.config import Settings
from app.db import Doc
from app.jobs import lifecycle
from app.jobs.errors import LeaseLost

log = logging.getLogger(__name__)

T = TypeVar("T")


class JobContext:
    """The job in hand. ``payload`` is the handler's input; ``check_lease()`` before any
    external side effect; ``transaction(fn)`` for database effects fenced by the lease."""

    def __init__(self, db: Database[Doc], job: Doc, *, worker: str, lease_seconds: float,
                 settings: Settings) -> None:
        self.db = db
        self.job = job
        self.worker = worker
        self.settings = settings
        self.lease_seconds = lease_seconds
        self.lease_token: str = job["lease"]["token"]
        self.cancelled = threading.Event()
        self.lost_reason: str | None = None
        self.completed = False
        self.result: dict[str, Any] | None = None
        # Set when one of this job's transactions ended in an error: its outcome on the
        # server may be unresolved, so the completion must be transactional too.
        self.txn_trouble = False
        # The lease surely holds until this monotonic time (claim/renewal send + lease).
        self._deadline = time.monotonic() + lease_seconds

    @property
    def job_id(self) -> str:
        return str(self.job["_id"])

    @property
    def kind(self) -> str:
        return str(self.job.get("kind"))

    @property
    def payload(self) -> dict[str, Any]:
        payload = self.job.get("payload")
        return payload if isinstance(payload, dict) else {}

    @property
    def attempt(self) -> int:
        return int(self.job.get("attempts") or 0)

    def lease_valid(self) -> bool:
        return not self.cancelled.is_set() and time.monotonic() < self._deadline

    def check_lease(self) -> None:
        """Raise LeaseLost unless this worker still holds the job's lease. Call it before
        every external side effect (a request to a CA, a DNS update, ...)."""
        if self.cancelled.is_set():
            raise LeaseLost(self.job_id, self.lost_reason or "lease lost")
        if time.monotonic() >= self._deadline:
            self.lose("the lease lapsed before it could be renewed (process paused or "
                      "database unreachable)")
            raise LeaseLost(self.job_id, self.lost_reason or "lease lapsed")

    def lose(self, reason: str) -> None:
        if not self.cancelled.is_set():
            self.lost_reason = reason
            self.cancelled.set()
            log.warning("job lease lost", extra={"job_id": self.job_id, "reason": reason,
                                                 "event": "job.lease_lost"})

    def renewed(self, sent_at_monotonic: float) -> None:
        self._deadline = sent_at_monotonic + self.lease_seconds

    def may_write_plainly(self) -> bool:
        """The lease surely holds for another third of its length and no transaction of
        this job is unresolved: a plain (non-transactional) completion is safe."""
        return (not self.txn_trouble and not self.cancelled.is_set()
                and self._deadline - time.monotonic() > self.lease_seconds / 3)

    def transaction(self, fn: Callable[[ClientSession], T], *, complete: bool = False) -> T:
        """Run ``fn(session)`` in a transaction that commits only while this worker holds
        the job's lease (LeaseLost otherwise, and nothing of ``fn`` is written). With
        ``complete=True`` the same transaction also marks the job succeeded, with ``fn``'s
        return value (dict or None) as its result: the effect and the completion commit
        together, so the effect happens exactly once even if the worker dies right after.
        """
        self.check_lease()
        try:
            value = lifecycle.fenced_transaction(self.db, self.job_id, self.lease_token, fn,
                                             complete=complete, worker=self.worker,
                                             retry_while=self.lease_valid)
        except LeaseLost:
            raise
        except Exception:
            self.txn_trouble = True
            raise
        if complete:
            self.completed = True
            self.result = value if isinstance(value, dict) else None
        return value


class LeaseKeeper:
    """Renews a running job's lease every lease/3 until stopped."""

    def __init__(self, ctx: JobContext) -> None:
        self.ctx = ctx
        self.interval = ctx.lease_seconds / 3
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{ctx.job_id}",
                                        daemon=True)

    def start(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
            if self._thread.is_alive():
                self.ctx.txn_trouble = True  # a renewal still in flight

    def _run(self) -> None:
        ctx = self.ctx
        wait = self.interval
        while not self._stop.wait(wait):
            if ctx.cancelled.is_set():
                return
            sent = time.monotonic()
            if sent >= ctx._deadline:
                ctx.lose("the lease lapsed before it could be renewed (process paused or "
                         "database unreachable)")
                return
            try:
                expires = lifecycle.heartbeat(ctx.db, ctx.job_id, ctx.lease_token,
                                          lease_seconds=ctx.lease_seconds,
                                          settings=ctx.settings)
            except Exception as exc:  # noqa: BLE001 - retried until the lease would lapse
                ctx.txn_trouble = True
                log.warning("could not renew a job lease; retrying",
                            extra={"job_id": ctx.job_id,
                                   "error": f"{exc.__class__.__name__}: {exc}"[:200]})
                wait = max(0.2, min(self.interval / 3, ctx._deadline - time.monotonic()))
                continue
            if self._stop.is_set():
                return
            if expires is None:
                ctx.lose("lease renewal refused: the lease lapsed or a peer re-claimed "
                         "the job")
                return
            ctx.renewed(sent)
            wait = self.interval
