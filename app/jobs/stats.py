"""Queue statistics: queued jobs by kind, how many are due, how long the oldest has
waited (the signal to scale workers on: ``app.jobs.metrics``, ``certautopilot jobs
depth``); whether another job of a kind runs under a live lease."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pymongo.client_session import ClientSession
from pymongo.database import Database

from app.db import Doc
from app.db.clock import server_now
from app.jobs.lifecycle import QUEUED, RUNNING, _jobs


def queue_depth(db: Database[Doc]) -> dict[str, Any]:
    """Queued jobs by kind (delayed ones included), how many of them are due, and the
    age of the oldest due one (seconds since it became due; 0 when none waits)."""
    jobs = _jobs(db)
    now = server_now(db)
    by_kind: dict[str, int] = {}
    due_by_kind: dict[str, int] = {}
    oldest_by_kind: dict[str, float] = {}
    is_due = {"$lte": ["$run_after", now]}
    pipeline: list[Doc] = [
        {"$match": {"state": QUEUED}},
        {"$group": {"_id": "$kind", "n": {"$sum": 1},
                    "due": {"$sum": {"$cond": [is_due, 1, 0]}},
                    "oldest": {"$min": {"$cond": [is_due, "$run_after", None]}}}},
    ]
    for row in jobs.aggregate(pipeline):
        kind = str(row["_id"])
        by_kind[kind] = int(row["n"])
        due_by_kind[kind] = int(row["due"])
        oldest = row.get("oldest")
        if isinstance(oldest, datetime):
            oldest_by_kind[kind] = max(0.0, (now - oldest).total_seconds())
    # The oldest due job of all is the oldest of the kinds': no sorted read of the queue
    # (the embedded server reads a sort's whole range before its limit).
    oldest_age = max(oldest_by_kind.values(), default=0.0)
    running = jobs.count_documents({"state": RUNNING})
    return {"queued": sum(by_kind.values()), "due": sum(due_by_kind.values()),
            "by_kind": by_kind, "due_by_kind": due_by_kind,
            "oldest_queued_age_seconds": oldest_age,
            "oldest_queued_age_seconds_by_kind": oldest_by_kind, "running": running}


def running_under_live_lease(db: Database[Doc], kind: str, *, exclude_id: str | None = None
                             ) -> bool:
    """Whether a job of ``kind`` (other than ``exclude_id``) is running and its lease has
    not lapsed, by the server's clock: a dead worker's job no longer counts."""
    query: Doc = {"kind": kind, "state": RUNNING,
                  "lease.expires_at": {"$gt": server_now(db)}}
    if exclude_id is not None:
        query["_id"] = {"$ne": exclude_id}
    return _jobs(db).count_documents(query, limit=1) > 0


def waiting_job(db: Database[Doc], job_id: object, now: datetime, *, kind: str,
                payload: Doc, session: ClientSession | None = None) -> Doc | None:
    """The job ``job_id`` if it is queued and due by ``now`` but no worker has claimed it
    yet, and is of ``kind`` with ``payload``, else None. The scheduler coalesces a timed
    entry's next slot into it: that job's work starts after the slot's time anyway, so a
    second job would only repeat it (a job of the entry's former definition does not
    count)."""
    if job_id is None:
        return None
    return _jobs(db).find_one({"_id": job_id, "state": QUEUED, "run_after": {"$lte": now},
                               "kind": kind, "payload": payload},
                              {"_id": 1, "dedupe_key": 1}, session=session)
