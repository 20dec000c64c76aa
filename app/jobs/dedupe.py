"""Which dedupe keys active jobs hold: for a caller that enqueues many jobs at once and
skips those already queued or running (the renewal scan), in one read."""

from __future__ import annotations

from collections.abc import Iterable

from pymongo.client_session import ClientSession
from pymongo.database import Database

from app import db as dbm
from app.db import Doc
from app.jobs.lifecycle import ACTIVE_STATES


def active_dedupe_keys(db: Database[Doc], keys: Iterable[str], *,
                       session: ClientSession | None = None) -> set[str]:
    """The subset of ``keys`` held by a queued or running job (inside ``session``'s
    transaction when given)."""
    wanted = list(keys)
    if not wanted:
        return set()
    # By key alone, on the plain dedupe_key index (m0010): a filter on the state too
    # leaves the embedded server's planner with no index to use.
    return {str(job["dedupe_key"]) for job in db[dbm.JOBS].find(
        {"dedupe_key": {"$in": wanted}}, {"dedupe_key": 1, "state": 1}, session=session)
        if job.get("state") in ACTIVE_STATES}
