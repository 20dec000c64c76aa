"""Job kinds the jobs package itself handles."""

from __future__ import annotations

from typing import Any

from app.jobs.context import JobContext
from app.jobs.reaper import reap
from app.jobs.registry import register_handler


@register_handler("jobs.reap", max_attempts=1)
def reap_job(ctx: JobContext) -> dict[str, Any]:
    """The scheduler's periodic reaper pass (see app.jobs.reaper)."""
    ctx.check_lease()
    return dict(reap(ctx.db, settings=ctx.settings))
