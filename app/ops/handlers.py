"""Job kinds of app/ops: ``metrics.snapshot`` (every 60 s from the scheduler leader)."""

from __future__ import annotations

from typing import Any

from app.jobs import JobContext, register_handler
from app.ops import fleet_metrics


@register_handler(fleet_metrics.SNAPSHOT_KIND, max_attempts=2, backoff_base_seconds=5,
                  backoff_max_seconds=30)
def refresh_snapshot(ctx: JobContext) -> dict[str, Any]:
    """Publish a new fleet-metrics snapshot for every api replica to serve."""
    ctx.check_lease()
    return fleet_metrics.refresh(ctx.db, ctx.settings, check=ctx.check_lease)
