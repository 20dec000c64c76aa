"""Job handler ``audit.forward`` (listed in ``app.handlers``): chain the audit entries left
pending (a writer that died between its commit and its seal, ``app.audit.log``), then
deliver new audit entries to every CAP_AUDIT_SINKS sink.

The scheduler leader enqueues it every 10 s (``scheduler/timed.py``). One run forwards
each sink from its cursor until caught up or out of its time budget (half the job lease,
at most 30 s); the job's lease is checked before every send. A failing sink does not fail
the job: its error and backoff are recorded on the sink (``certautopilot audit sinks``,
``/readyz`` detail, metrics) and the next run tries again, so the job never goes dead
because a SIEM is down.
"""

from __future__ import annotations

from typing import Any, Protocol

from pymongo.database import Database

from app.audit.forward import forward_all
from app.audit.log import seal
from app.config import Settings
from app.db import Doc

KIND = "audit.forward"


class ForwardJob(Protocol):
    """What the handler uses of its ``app.jobs.JobContext`` (named by its shape: the jobs
    package records operator actions in the audit log, so this package does not import
    it)."""

    db: Database[Doc]
    settings: Settings
    lease_seconds: float

    @property
    def job_id(self) -> str: ...

    def check_lease(self) -> None: ...


def forward(ctx: ForwardJob) -> dict[str, Any]:
    """Seal what is pending, then forward the audit log to each configured sink, at least
    once and in order."""
    sealed = seal(ctx.db)
    sinks = ctx.settings.audit_sinks
    if not sinks:
        return {"sealed": sealed, "sinks": {}}
    budget = max(1.0, min(30.0, ctx.lease_seconds / 2))
    results = forward_all(ctx.db, sinks, owner=f"job:{ctx.job_id}", budget_seconds=budget,
                          check=ctx.check_lease)
    return {"sealed": sealed, "sinks": results}
