"""Job kinds the jobs package itself handles (listed in ``app.handlers``)."""

from __future__ import annotations

from typing import Any

from app.jobs.context import JobContext
from app.jobs.reaper import reap


def reap_job(ctx: JobContext) -> dict[str, Any]:
    """The scheduler's periodic reaper pass (see app.jobs.reaper)."""
    ctx.check_lease()
    return dict(reap(ctx.db, settings=ctx.settings))
