"""What the jobs of some dedupe keys are doing: for a caller that enqueues many jobs at
once and skips keys whose work is already in hand (the renewal scan), in one read."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from pymongo.client_session import ClientSession
from pymongo.database import Database

from app import db as dbm
from app.db import Doc
from app.jobs.lifecycle import ACTIVE_STATES


@dataclass(frozen=True)
class KeyJobs:
    """Of one dedupe key's jobs still kept: whether one is queued or running, and the
    newest one's creation time and state."""

    active: bool
    last_created_at: datetime | None
    last_state: str | None


def jobs_by_dedupe_key(db: Database[Doc], keys: Iterable[str], *,
                       session: ClientSession | None = None) -> dict[str, KeyJobs]:
    """For each of ``keys`` that has jobs (inside ``session``'s transaction when given):
    ``KeyJobs``. Keys without a job are absent."""
    wanted = list(keys)
    if not wanted:
        return {}
    found: dict[str, KeyJobs] = {}
    # By key alone, on the plain dedupe_key index (m0010): a filter on the state too
    # leaves the embedded server's planner with no index to use.
    for job in db[dbm.JOBS].find({"dedupe_key": {"$in": wanted}},
                                 {"dedupe_key": 1, "state": 1, "created_at": 1},
                                 session=session):
        key = str(job["dedupe_key"])
        seen = found.get(key, KeyJobs(False, None, None))
        created, state = job.get("created_at"), job.get("state")
        newer = created is not None and (seen.last_created_at is None
                                         or created > seen.last_created_at)
        found[key] = KeyJobs(seen.active or state in ACTIVE_STATES,
                             created if newer else seen.last_created_at,
                             state if newer else seen.last_state)
    return found


def active_dedupe_keys(db: Database[Doc], keys: Iterable[str], *,
                       session: ClientSession | None = None) -> set[str]:
    """The subset of ``keys`` held by a queued or running job (inside ``session``'s
    transaction when given)."""
    return {key for key, held in jobs_by_dedupe_key(db, keys, session=session).items()
            if held.active}
