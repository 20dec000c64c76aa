"""Operator actions on jobs: read, list, retry a dead job, cancel a queued one (the last
two audited), and cancel many queued jobs in a caller's transaction (the caller audits:
a renewal batch's cancel). Used by the API (``/api/v1/jobs``), ``certautopilot jobs``
and ``app.domain.renewal_batches``."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pymongo import DESCENDING, ReturnDocument
from pymongo.client_session import ClientSession
from pymongo.database import Database
from pymongo.errors import DuplicateKeyError

from app import db as dbm
from app.config import Settings
from app.db import Doc, txn
from app.db.clock import server_now
from app.jobs import broker
from app.jobs.errors import InvalidJob, JobNotFound, JobStateConflict
from app.jobs.lifecycle import (
    CANCELLED,
    DEAD,
    FINISHED_RETENTION,
    QUEUED,
    STATES,
    _check_id,
    _history,
    _jobs,
    _settings,
)


def get_job(db: Database[Doc], job_id: str) -> Doc:
    job = _jobs(db).find_one({"_id": _check_id(job_id)})
    if job is None:
        raise JobNotFound(job_id)
    return job


def list_jobs(db: Database[Doc], *, state: str | None = None, kind: str | None = None,
              project_id: str | None = None, limit: int = 50) -> list[Doc]:
    """Newest first."""
    query: Doc = {}
    if state is not None:
        if state not in STATES:
            raise InvalidJob(f"state must be one of {', '.join(STATES)}")
        query["state"] = state
    if kind is not None:
        query["kind"] = kind
    if project_id is not None:
        query["project_id"] = project_id
    limit = max(1, min(int(limit), 1000))
    return list(_jobs(db).find(query, {"history": 0}).sort("_id", DESCENDING).limit(limit))


def retry_dead(db: Database[Doc], job_id: str, *, actor: Any,
               settings: Settings | None = None) -> Doc:
    """Operator action: put a dead job back in the queue with a fresh attempt budget
    (audited). Refused for any other state, or when another active job holds its
    dedupe key."""
    from app import audit

    job_id = _check_id(job_id)
    settings = _settings(settings)
    now = server_now(db)
    jobs = db[dbm.JOBS]

    def run(session: ClientSession) -> Doc:
        job = jobs.find_one({"_id": job_id}, session=session)
        if job is None:
            raise JobNotFound(job_id)
        if job.get("state") != DEAD:
            raise JobStateConflict(job_id, str(job.get("state")),
                                   "only a dead job can be retried")
        try:
            updated = jobs.find_one_and_update(
                {"_id": job_id, "state": DEAD},
                {"$set": {"state": QUEUED, "attempts": 0, "run_after": now, "wake_at": now,
                          "lease": None, "finished_at": None, "updated_at": now},
                 "$unset": {"expire_at": ""},
                 "$push": {"history": _history(now, "retried", actor=actor.id)}},
                session=session, return_document=ReturnDocument.AFTER)
        except DuplicateKeyError:
            raise JobStateConflict(job_id, DEAD, "another active job holds its dedupe key "
                                   f"{job.get('dedupe_key')!r}") from None
        audit.record(db, session, actor=actor, action="job.retry", target=f"job:{job_id}",
                     project_id=job.get("project_id"),
                     details={"kind": job.get("kind"), "attempts": job.get("attempts"),
                              "last_error": str(job.get("last_error") or "")[:300]})
        assert updated is not None
        return updated

    updated = txn.run(db, run, what="retry dead job")
    broker.publish_wakeup(job_id, settings=settings)
    return updated


def cancel(db: Database[Doc], job_id: str, *, actor: Any, reason: str = "") -> Doc:
    """Operator action: cancel a queued job (audited). A running job cannot be cancelled
    here: its handler holds the lease."""
    from app import audit

    job_id = _check_id(job_id)
    now = server_now(db)
    jobs = db[dbm.JOBS]

    def run(session: ClientSession) -> Doc:
        job = jobs.find_one_and_update(
            {"_id": job_id, "state": QUEUED},
            {"$set": {"state": CANCELLED, "finished_at": now, "updated_at": now,
                      "expire_at": now + FINISHED_RETENTION},
             "$push": {"history": _history(now, "cancelled", actor=actor.id,
                                           reason=reason[:500])}},
            session=session, return_document=ReturnDocument.AFTER)
        if job is None:
            current = jobs.find_one({"_id": job_id}, {"state": 1}, session=session)
            if current is None:
                raise JobNotFound(job_id)
            raise JobStateConflict(job_id, str(current.get("state")),
                                   "only a queued job can be cancelled")
        audit.record(db, session, actor=actor, action="job.cancel", target=f"job:{job_id}",
                     project_id=job.get("project_id"),
                     details={"kind": job.get("kind"), "reason": reason[:300]})
        return job

    return txn.run(db, run, what="cancel job")


def cancel_queued(db: Database[Doc], job_ids: list[str], *, actor: Any, reason: str,
                  session: ClientSession, now: datetime) -> int:
    """Cancel those of ``job_ids`` still queued, in ``session``'s transaction (running
    ones finish), at the caller's ``now``; the caller's own audit entry covers them.
    Returns how many."""
    result = _jobs(db).update_many(
        {"_id": {"$in": job_ids}, "state": QUEUED},
        {"$set": {"state": CANCELLED, "finished_at": now, "updated_at": now,
                  "expire_at": now + FINISHED_RETENTION},
         "$push": {"history": _history(now, "cancelled", actor=actor.id,
                                       reason=reason[:500])}},
        session=session)
    return int(result.modified_count)
