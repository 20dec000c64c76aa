"""Job handler ``audit.forward``: deliver new audit entries to every CAP_AUDIT_SINKS sink.

The scheduler leader enqueues it every 10 s (``scheduler/timed.py``). One run forwards
each sink from its cursor until caught up or out of its time budget (half the job lease,
at most 30 s); the job's lease is checked before every send. A failing sink does not fail
the job: its error and backoff are recorded on the sink (``certautopilot audit sinks``,
``/readyz`` detail, metrics) and the next run tries again, so the job never goes dead
because a SIEM is down.
"""

from __future__ import annotations

from typing import Any

from app.audit.forward import forward_all
from app.jobs import JobContext, register_handler

KIND = "audit.forward"


@register_handler(KIND, max_attempts=3, backoff_base_seconds=2.0, backoff_max_seconds=10.0)
def forward(ctx: JobContext) -> dict[str, Any]:
    """Forward the audit log to each configured sink, at least once and in order."""
    sinks = ctx.settings.audit_sinks
    if not sinks:
        return {"sinks": {}}
    budget = max(1.0, min(30.0, ctx.lease_seconds / 2))
    results = forward_all(ctx.db, sinks, owner=f"job:{ctx.job_id}", budget_seconds=budget,
                          check=ctx.check_lease)
    return {"sinks": results}
