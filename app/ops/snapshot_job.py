"""The ``metrics.snapshot`` job (every 60 s from the scheduler leader; listed in
``app/handlers.py``): one worker rebuilds the fleet gauges every api replica serves."""

from __future__ import annotations

from typing import Any

from app import metrics_snapshot
from app.jobs import JobContext


def refresh_snapshot(ctx: JobContext) -> dict[str, Any]:
    """Publish a new fleet-metrics snapshot for every api replica to serve."""
    ctx.check_lease()
    return metrics_snapshot.refresh(ctx.db, ctx.settings, check=ctx.check_lease)
