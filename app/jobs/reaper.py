"""The reaper: what brings jobs back when a worker or a message is lost.

- A running job whose lease lapsed (its worker was killed, paused past its lease, or
  lost the database) goes back to ``queued`` and its wake-up is published, or goes
  ``dead`` when it has no attempts left.
- A queued job whose wake-up should have arrived more than CAP_REAPER_REPUBLISH_SECONDS
  ago and that nobody claimed (kombu's MongoDB transport deletes a message when a worker
  fetches it, so a killed worker takes its prefetched messages with it) gets a new
  wake-up. Jobs delayed beyond the broker's countdown limit are published this way when
  they become due.

The scheduler leader runs it (job kind ``jobs.reap``), each worker also runs it now and
then, and ``certautopilot jobs reap`` runs it by hand. Concurrent reapers are safe: every
transition is a conditional update; at worst a job gets two wake-ups and the second claim
is a no-op.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from pymongo.database import Database

from app import db as dbm
from app.config import Settings, load_settings
from app.db import Doc, txn
from app.db.clock import server_now
from app.errors import DatabaseUnavailable
from app.jobs import broker, lifecycle
from app.jobs.lifecycle import JOB_LEASE

log = logging.getLogger("certautopilot.jobs.reaper")
BATCH = 500


def reap(db: Database[Doc], *, settings: Settings | None = None,
         limit: int = BATCH) -> dict[str, int]:
    """One pass; returns counts: requeued, dead, republished, stale (queued jobs past
    their wake-up time, including those whose wake-up is still waiting in the broker)."""
    settings = settings or load_settings()
    jobs = dbm.primary(db)[dbm.JOBS]
    now = server_now(db)
    counts = {"requeued": 0, "dead": 0, "republished": 0, "stale": 0}

    lapsed = list(jobs.find({"state": lifecycle.RUNNING, **JOB_LEASE.lapsed(now)},
                            _JOB_FIELDS).limit(limit))
    for job in lapsed:
        lease = job.get("lease") or {}
        fence = {"_id": job["_id"], "state": lifecycle.RUNNING,
                 **JOB_LEASE.owned(lease.get("token")), **JOB_LEASE.lapsed(now)}
        outcome = _take_back(db, job, fence, now, settings, reason="lease lapsed",
                             why="lapsed (the worker stopped or lost the database)")
        if outcome:
            counts[outcome] += 1

    cutoff = now - timedelta(seconds=settings.reaper_republish_seconds)
    stale = list(jobs.find({"state": lifecycle.QUEUED, "wake_at": {"$lte": cutoff}},
                           {"_id": 1}).sort("wake_at", 1).limit(limit))
    counts["stale"] = len(stale)
    if stale:
        # A deep queue is slow, not lost: the wake-ups still in the broker will each wake
        # a worker, so only the surplus of stale jobs over them needs new messages. As the
        # backlog drains, later passes cover the rest.
        backlog = broker.broker_backlog(settings)
        wanted = len(stale) if backlog is None else max(0, len(stale) - backlog)
        for doc in stale[:wanted]:
            if _write(db, {"_id": doc["_id"], "state": lifecycle.QUEUED,
                           "wake_at": {"$lte": cutoff}}, {"$set": {"wake_at": now}}) \
                    and broker.publish_wakeup(doc["_id"], settings=settings):
                counts["republished"] += 1
        if counts["republished"]:
            log.info("re-published wake-ups of queued jobs nobody claimed",
                     extra={"count": counts["republished"], "stale": len(stale),
                            "broker_backlog": backlog, "event": "jobs.republished"})
    return counts


_JOB_FIELDS = {"attempts": 1, "max_attempts": 1, "lease": 1, "kind": 1}


def _take_back(db: Database[Doc], job: Doc, fence: Doc, now: datetime, settings: Settings,
               *, reason: str, why: str) -> str | None:
    """Requeue a running job its holder lost (or end it ``dead`` on its last attempt),
    fenced by ``fence``; returns "requeued", "dead" or None (the fence did not match)."""
    lease = job.get("lease") or {}
    attempts = int(job.get("attempts") or 0)
    limit_attempts = int(job.get("max_attempts") or settings.job_max_attempts)
    if attempts >= limit_attempts:
        error = (f"attempt {attempts} of {limit_attempts}: the lease held by "
                 f"{lease.get('owner')} {why} and no attempts are left")
        if not _write(db, fence, {
                "$set": {"state": lifecycle.DEAD, "finished_at": now, "updated_at": now,
                         "last_error": error, "expire_at": now + lifecycle.DEAD_RETENTION},
                "$push": {"history": lifecycle._history(now, "dead", error=error)}}):
            return None
        log.error("job dead: its holder was lost on the last attempt",
                  extra={"job_id": job["_id"], "kind": job.get("kind"), "reason": reason,
                         "event": "job.dead"})
        return "dead"
    if not _write(db, fence, {
            "$set": {"state": lifecycle.QUEUED, "lease": None, "run_after": now,
                     "wake_at": now, "updated_at": now,
                     "last_error": f"the lease held by {lease.get('owner')} {why}"},
            "$push": {"history": lifecycle._history(now, "requeued", reason=reason,
                                                previous_owner=lease.get("owner"))}}):
        return None
    log.warning("requeued a job whose holder was lost",
                extra={"job_id": job["_id"], "kind": job.get("kind"), "reason": reason,
                       "previous_owner": lease.get("owner"), "event": "job.requeued"})
    broker.publish_wakeup(job["_id"], settings=settings)
    return "requeued"


def release_orphans(db: Database[Doc], *, dead_after: float,
                    settings: Settings | None = None) -> dict[str, int]:
    """Take back the running jobs of workers whose heartbeat stopped ``dead_after``
    seconds ago, without waiting for their job leases (60 s by default) to lapse.

    A worker's heartbeat lists the lease owners of its processes (``owners``: host:pid of
    the worker and of its pool processes). A worker not seen for ``dead_after`` (several
    missed beats) while still ``running`` or ``draining`` is marked ``lost`` and every
    running job held by one of its owners goes back to the queue, fenced on the job's
    lease token (as lapsed leases are). An owner that a worker seen since also lists (a
    restarted container reuses host and pids) is left to the lease.

    Only a caller whose own heartbeats are on time calls this
    (``WorkerHeartbeat.own_beats_on_time``): after a database outage every heartbeat is
    old, and on a saturated database every beat is late. Should the worker still be
    alive (paused, cut off from the database), its lease is gone: the fence refuses its
    completion and its effects, as for a lapsed lease, and its next beat marks it
    ``running`` again. Returns counts: lost (workers), requeued, dead."""
    settings = settings or load_settings()
    primary = dbm.primary(db)
    now = server_now(db)
    cutoff = now - timedelta(seconds=dead_after)
    counts = {"lost": 0, "requeued": 0, "dead": 0}
    rows = list(primary[dbm.WORKERS].find({}, {"state": 1, "last_seen": 1, "owners": 1}))
    alive = {o for w in rows if w.get("last_seen") and w["last_seen"] >= cutoff
             for o in w.get("owners") or ()}
    for worker in rows:
        if worker.get("state") not in ("running", "draining") or not worker.get("last_seen") \
                or worker["last_seen"] >= cutoff:
            continue
        owners = sorted(set(worker.get("owners") or ()) - alive)
        marked = primary[dbm.WORKERS].update_one(
            {"_id": worker["_id"], "last_seen": worker["last_seen"]},
            {"$set": {"state": "lost", "lost_at": now}})
        if marked.modified_count != 1:
            continue  # it beat again meanwhile, or another reaper got there first
        counts["lost"] += 1
        held = list(primary[dbm.JOBS].find(
            {"state": lifecycle.RUNNING, "lease.owner": {"$in": owners}}, _JOB_FIELDS)) \
            if owners else []
        log.warning("worker lost: no heartbeat for %.0f s; taking back its %d running "
                    "job(s)", (now - worker["last_seen"]).total_seconds(), len(held),
                    extra={"worker": worker["_id"], "owners": owners,
                           "event": "worker.lost"})
        for job in held:
            lease = job.get("lease") or {}
            fence = {"_id": job["_id"], "state": lifecycle.RUNNING,
                     **JOB_LEASE.owned(lease.get("token"), lease.get("owner"))}
            outcome = _take_back(db, job, fence, now, settings, reason="worker lost",
                                 why=f"belongs to worker {worker['_id']}, whose heartbeat "
                                     "stopped")
            if outcome:
                counts[outcome] += 1
    return counts


def _write(db: Database[Doc], fence: Doc, update: Doc) -> bool:
    """One fenced transition in its own short transaction. A job that keeps conflicting
    (a killed worker's transaction still open on it) is skipped until a later pass."""
    try:
        return txn.update_one(dbm.primary(db)[dbm.JOBS], fence, update, attempts=2,
                              what="reap job")
    except DatabaseUnavailable as exc:
        log.info("reaper skipped a job it could not update now",
                 extra={"job_id": fence.get("_id"), "error": str(exc)[:200]})
        return False
