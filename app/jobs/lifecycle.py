"""A job's life: enqueue, claim, heartbeat, complete, fail, retry later, release, and the
transactions fenced by its lease.

A job is one document in ``jobs`` (DESIGN.md, invariant 1)::

    _id           str (an ObjectId's hex)
    kind          "certificates.issue", ...       payload   dict given to the handler
    state         queued | running | succeeded | dead | cancelled   (active: queued|running)
    dedupe_key    unique among active jobs (partial unique index ``dedupe_key_active``)
    project_id    owner, if any
    attempts      claims so far (RetryLater and a shutdown release give theirs back)
    max_attempts  per kind (None: CAP_JOB_MAX_ATTEMPTS)
    run_after     not before this time (server clock)
    wake_at       when a wake-up was last expected to arrive; the reaper re-publishes a
                  queued job whose ``wake_at`` is older than CAP_REAPER_REPUBLISH_SECONDS
    lease         {owner, token, expires_at, claimed_at} of the current/last holder
    result, last_error, history (last 50 transitions), created_at, updated_at,
    started_at, finished_at
    expire_at     set when the job finishes: a TTL index removes it then (7 days after
                  success or cancellation, 30 days after it went dead)

Every transition out of ``running`` is fenced: its filter names the holder's lease token
and requires the lease to be unexpired on the server's clock, so a worker whose lease
lapsed (killed, paused, partitioned) can never complete, fail or release a job a peer
has re-claimed. The lease is ``app.db.lease``'s primitive in the ``lease`` sub-document
(``JOB_LEASE``); times are the server's (``app.db.clock``), compared with plain query
operators. Operator actions are in ``app.jobs.actions``, queue statistics in
``app.jobs.stats``.
"""

from __future__ import annotations

import logging
import random
import re
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, TypeVar

import bson
from bson import ObjectId
from pymongo.client_session import ClientSession
from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.errors import DuplicateKeyError

from app import db as dbm
from app.config import Settings, load_settings
from app.db import Doc, txn
from app.db.clock import server_now
from app.db.lease import LeaseSchema
from app.jobs import broker
from app.jobs.errors import InvalidJob, JobNotFound, JobStateConflict, LeaseLost
from app.jobs.registry import get_handler, valid_kind

log = logging.getLogger(__name__)

T = TypeVar("T")

# The job's lease: the ``lease`` sub-document, its token random at every claim.
JOB_LEASE = LeaseSchema(within="lease", holder="owner", token="token",
                        acquired_at="claimed_at", renewed_at="renewed_at")

QUEUED, RUNNING, SUCCEEDED, DEAD, CANCELLED = (
    "queued", "running", "succeeded", "dead", "cancelled")
STATES = (QUEUED, RUNNING, SUCCEEDED, DEAD, CANCELLED)
ACTIVE_STATES = (QUEUED, RUNNING)
HISTORY_LIMIT = 50
# Finished jobs are kept this long (TTL index on ``expire_at``, m0002): a week of history
# for succeeded and cancelled jobs, a month for dead ones (an operator may retry them).
FINISHED_RETENTION = timedelta(days=7)
DEAD_RETENTION = timedelta(days=30)
MAX_PAYLOAD_BYTES = 256 * 1024
JOB_ID_RE = re.compile(r"^[0-9a-f]{24}$")


def _jobs(db: Database[Doc]) -> Collection[Doc]:
    return dbm.primary(db)[dbm.JOBS]


def _settings(settings: Settings | None) -> Settings:
    return settings or load_settings()


def _history(now: datetime, event: str, **fields: Any) -> dict[str, Any]:
    return {"$each": [{"at": now, "event": event, **fields}], "$slice": -HISTORY_LIMIT}


def valid_job_id(job_id: object) -> bool:
    return isinstance(job_id, str) and bool(JOB_ID_RE.match(job_id))


def _check_id(job_id: object) -> str:
    if not valid_job_id(job_id):
        raise JobNotFound(str(job_id)[:100])
    return str(job_id)


# ---------------------------------------------------------------------------- enqueue


def _validate(kind: object, payload: object, dedupe_key: object, run_after: object,
              project_id: object) -> None:
    if not valid_kind(kind):
        raise InvalidJob(f"job kind {kind!r} is invalid: expected dotted lowercase words, "
                         "e.g. 'certificates.issue'")
    if not isinstance(payload, dict):
        raise InvalidJob(f"job payload must be a dict, not {type(payload).__name__}")
    try:
        size = len(bson.encode(payload))
    except (bson.errors.InvalidDocument, TypeError, OverflowError) as exc:
        raise InvalidJob(f"job payload cannot be stored: {exc}") from None
    if size > MAX_PAYLOAD_BYTES:
        raise InvalidJob(f"job payload is {size} bytes; the limit is {MAX_PAYLOAD_BYTES}")
    if dedupe_key is not None and (not isinstance(dedupe_key, str) or not dedupe_key
                                   or len(dedupe_key) > 512):
        raise InvalidJob("dedupe_key must be a non-empty string of at most 512 characters")
    if run_after is not None and (not isinstance(run_after, datetime)
                                  or run_after.tzinfo is None):
        raise InvalidJob("run_after must be a timezone-aware datetime")
    if project_id is not None and not isinstance(project_id, str):
        raise InvalidJob("project_id must be a string")


def _job_doc(kind: str, payload: dict[str, Any], dedupe_key: str | None,
             project_id: str | None, now: datetime, due: datetime,
             settings: Settings) -> Doc:
    spec = get_handler(kind)
    return {
        "_id": str(ObjectId()),
        "kind": kind,
        "payload": payload,
        "state": QUEUED,
        "dedupe_key": dedupe_key,
        "project_id": project_id,
        "attempts": 0,
        "max_attempts": spec.max_attempts if spec else None,
        "run_after": due,
        "wake_at": _wake_at(due, (due - now).total_seconds(), settings),
        "created_at": now,
        "updated_at": now,
        "started_at": None,
        "finished_at": None,
        "lease": None,
        "result": None,
        "last_error": None,
        "history": [{"at": now, "event": "enqueued"}],
    }


def enqueue_many(db: Database[Doc], kind: str,
                 jobs: list[tuple[dict[str, Any], str | None, str | None]], *,
                 session: ClientSession, settings: Settings | None = None) -> list[Doc]:
    """Insert queued jobs due now, ``(payload, dedupe_key, project_id)`` each, with one
    ``insert_many`` in the caller's transaction (the renewal scan's batches). The caller
    has excluded dedupe keys held by active jobs (a concurrent holder aborts the
    transaction, which is retried); publish the wake-ups after the commit
    (``publish_wakeups``)."""
    if not jobs:
        return []
    for payload, dedupe_key, project_id in jobs:
        _validate(kind, payload, dedupe_key, None, project_id)
    settings = _settings(settings)
    now = server_now(db)
    docs = [_job_doc(kind, payload, dedupe_key, project_id, now, now, settings)
            for payload, dedupe_key, project_id in jobs]
    db[dbm.JOBS].insert_many(docs, ordered=True, session=session)
    return docs


def enqueue(db: Database[Doc], kind: str, payload: dict[str, Any], *,
            dedupe_key: str | None = None, run_after: datetime | None = None,
            project_id: str | None = None, session: ClientSession | None = None,
            publish: bool = True, settings: Settings | None = None,
            expire_at: datetime | None = None, request_key: str | None = None) -> Doc:
    """Insert a queued job (``w=majority``) and publish its wake-up; return the job.

    With a ``dedupe_key`` already held by an active (queued or running) job, return that
    job instead and publish nothing. With ``session`` the insert joins the caller's
    transaction and nothing is published: call ``publish_wakeup(job["_id"])`` after the
    commit (or leave it to the reaper). A failed publish leaves the job queued for the
    reaper. A ``run_after`` in the future delays the job. ``expire_at`` (the scheduler's
    slot jobs) removes the job then, whatever its state (``slot_expire_at``, TTL, m0010).
    ``request_key`` (an API request's idempotency reservation) is kept beside the payload,
    not in it: how a retry finds the job, not an input of its handler, and in no answer.
    """
    _validate(kind, payload, dedupe_key, run_after, project_id)
    settings = _settings(settings)
    now = server_now(db)
    due = max(run_after, now) if run_after is not None else now
    countdown = (due - now).total_seconds()
    doc = _job_doc(kind, payload, dedupe_key, project_id, now, due, settings)
    if expire_at is not None:
        doc["slot_expire_at"] = expire_at
    if request_key is not None:
        doc["request_key"] = request_key
    jobs = db[dbm.JOBS]
    if session is not None:
        if dedupe_key is not None:
            existing = jobs.find_one({"dedupe_key": dedupe_key,
                                      "state": {"$in": list(ACTIVE_STATES)}}, session=session)
            if existing is not None:
                return existing
        jobs.insert_one(doc, session=session)
        return doc

    jobs = _jobs(db)
    insert = doc

    def insert_in_txn(session: ClientSession) -> None:
        jobs.insert_one(insert, session=session)

    for _ in range(5):
        try:
            if dedupe_key is None:
                dbm.retry(lambda: jobs.insert_one(insert), what="enqueue job")
            else:
                # In a transaction: a killed enqueuer's open transaction holding the same
                # key then conflicts at once instead of stalling the server (app.db.txn).
                txn.run(db, insert_in_txn, what="enqueue job")
        except DuplicateKeyError:
            # Our own insert retried after a lost reply, or an active job with this key.
            mine = jobs.find_one({"_id": doc["_id"]})
            if mine is None:
                existing = jobs.find_one({"dedupe_key": dedupe_key,
                                          "state": {"$in": list(ACTIVE_STATES)}})
                if existing is not None:
                    return existing
                continue  # the holder finished between our insert and our read: insert again
            doc = mine
        if publish:
            _publish_or_leave(db, doc["_id"], due, countdown, settings)
        return doc
    raise JobStateConflict(str(dedupe_key), "contended", "could not enqueue: the dedupe "
                           "key keeps changing hands; try again")


def _wake_at(due: datetime, countdown: float, settings: Settings) -> datetime:
    """When the reaper should consider the wake-up lost: ``threshold`` after ``due`` for
    a published wake-up; for one we leave to the reaper, as soon as the job is due."""
    if countdown > broker.MAX_COUNTDOWN_SECONDS:
        return due - timedelta(seconds=settings.reaper_republish_seconds)
    return due


def _publish_or_leave(db: Database[Doc], job_id: str, due: datetime, countdown: float,
                      settings: Settings) -> bool:
    if countdown > broker.MAX_COUNTDOWN_SECONDS:
        return False  # wake_at already tells the reaper to publish it when due
    if broker.publish_wakeup(job_id, countdown if countdown > 0 else None,
                             settings=settings):
        return True
    # Tell the reaper at once instead of after the usual threshold (best effort).
    try:
        txn.update_one(_jobs(db), {"_id": job_id, "state": QUEUED}, {"$set": {
            "wake_at": due - timedelta(seconds=settings.reaper_republish_seconds)}},
            attempts=1)
    except Exception as exc:  # noqa: BLE001 - the job is queued; the reaper finds it anyway
        log.debug("could not mark the job for the reaper", extra={"error": str(exc)[:200]})
    return False


def publish_wakeup(job_id: str) -> bool:
    """Publish the wake-up of a job (e.g. after the transaction that enqueued it with
    ``session=`` committed). Never raises; False means the reaper will do it."""
    return broker.publish_wakeup(str(job_id))


def publish_wakeups(job_ids: list[str]) -> int:
    """Publish the wake-ups of several jobs due now in one broker write (after the
    transaction that enqueued them committed). Never raises; returns how many were
    published (0: the reaper will do it)."""
    return broker.publish_wakeups(job_ids)


# ------------------------------------------------------------------------------ claim


def claim(db: Database[Doc], job_id: str, worker: str, *, lease_seconds: float | None = None,
          settings: Settings | None = None) -> Doc | None:
    """Claim a job for ``worker``: in one transaction, a queued job that is due (or a
    running job whose lease lapsed) becomes running under a fresh lease token, with
    ``lease.expires_at = now + lease``, one more attempt and a ``claimed`` history entry.

    Returns the claimed job, or None when there is nothing to do: the job is running under
    a live lease, finished, cancelled, unknown, or not due yet (its wake-up is then
    re-published for when it is due). A lapsed job with no attempts left goes ``dead``.

    The job is read first, then the transaction updates it only if it is still exactly
    as read (state, attempts and lease token in the filter): an optimistic claim, so a
    concurrent claimer makes it a no-op. (Read + update + commit is cheaper on the
    server than a findAndModify inside the transaction, and the read tells a wake-up
    that came too early when to come back.)
    """
    if not valid_job_id(job_id):
        return None
    settings = _settings(settings)
    lease = lease_seconds or settings.job_lease_seconds
    jobs = _jobs(db)
    seen = jobs.find_one({"_id": job_id}, {"history": 0})
    if seen is None:
        return None
    now = server_now(db)
    state = seen.get("state")
    old_lease = seen.get("lease") or {}
    if state == QUEUED:
        run_after = seen.get("run_after")
        if isinstance(run_after, datetime) and run_after > now:
            broker.publish_wakeup(job_id, (run_after - now).total_seconds(),
                                  settings=settings)
            return None
    elif state == RUNNING:
        expires = old_lease.get("expires_at")
        if isinstance(expires, datetime) and expires > now:
            return None  # a live lease: someone is on it
    else:
        return None  # finished or cancelled
    attempts = int(seen.get("attempts") or 0)
    as_seen: Doc = {"_id": job_id, "state": state, "attempts": seen.get("attempts"),
                    "lease.token": old_lease.get("token")}
    # ... and still claimable: a renewal since the read keeps the token but moves the
    # expiry; a reschedule keeps the state but moves run_after.
    if state == RUNNING:
        as_seen.update(JOB_LEASE.lapsed(now))
    else:
        as_seen["run_after"] = {"$lte": now}
    if state == RUNNING:
        limit = int(seen.get("max_attempts") or settings.job_max_attempts)
        if attempts >= limit:
            txn.run(db, lambda session: _mark_lapsed_dead(jobs, seen, as_seen, now, session),
                    attempts=3, what="claim job")
            return None
    granted = JOB_LEASE.grant(worker, lease, now)["$set"]
    new_lease = granted["lease"]
    update = {"$set": {**granted, "state": RUNNING, "started_at": now, "updated_at": now,
                       "attempts": attempts + 1},
              "$push": {"history": _history(now, "claimed", worker=worker)}}
    # Few attempts: a claim that keeps conflicting is someone else's business (a peer's
    # claim, or a killed worker's open transaction); the reaper wakes the job again.
    if not txn.update_one(_jobs(db), as_seen, update, attempts=3, what="claim job"):
        return None
    job = dict(seen)
    job.update(state=RUNNING, lease=new_lease, started_at=now, updated_at=now,
               attempts=attempts + 1)
    return job


def _mark_lapsed_dead(jobs: Collection[Doc], seen: Doc, as_seen: Doc, now: datetime,
                      session: ClientSession) -> None:
    lease = seen.get("lease") or {}
    error = (f"attempt {seen.get('attempts')} of {seen.get('max_attempts') or 'max'}: "
             f"the lease held by {lease.get('owner')} lapsed (the worker stopped or lost "
             "the database) and no attempts are left")
    jobs.update_one(as_seen, {
        "$set": {"state": DEAD, "finished_at": now, "updated_at": now, "last_error": error,
                 "expire_at": now + DEAD_RETENTION},
        "$push": {"history": _history(now, "dead", error=error)}}, session=session)


# ----------------------------------------------------------------- fenced transitions


def _fence(job_id: str, token: str, now: datetime) -> Doc:
    return {"_id": job_id, "state": RUNNING, **JOB_LEASE.held(token, now)}


def heartbeat(db: Database[Doc], job_id: str, token: str, *,
              lease_seconds: float | None = None,
              settings: Settings | None = None) -> datetime | None:
    """Renew the lease: ``expires_at = now + lease`` while ``token`` still holds it.
    Returns the new expiry, or None when the lease is gone (lapsed or re-claimed)."""
    lease = lease_seconds or _settings(settings).job_lease_seconds
    now = server_now(db)
    renewal = JOB_LEASE.renewal(lease, now)
    renewed = txn.update_one(_jobs(db), _fence(job_id, token, now), {"$set": renewal},
                             attempts=3, what="renew job lease")
    return renewal["lease.expires_at"] if renewed else None


def _finished_by(db: Database[Doc], job_id: str, token: str, state: str) -> bool:
    """After a refused transition: had this very token already made it (a retried write
    whose first reply was lost)?"""
    job = _jobs(db).find_one({"_id": job_id}, {"state": 1, "lease.token": 1})
    return bool(job and job.get("state") == state
                and (job.get("lease") or {}).get("token") == token)


def _note_refused(db: Database[Doc], job_id: str, worker: str | None, event: str,
                  now: datetime) -> None:
    """Record, outside the fence, that a former holder's transition was refused. Never
    while another worker holds a live lease on the job: the holder may then complete with
    a plain write (see ``complete``), which nobody else's transaction may be holding up."""
    try:
        txn.update_one(_jobs(db), {"_id": job_id, "$or": [{"state": {"$ne": RUNNING}},
                                                          JOB_LEASE.lapsed(now)]},
                       {"$push": {"history": _history(now, event, worker=worker)}},
                       attempts=1)
    except Exception:  # noqa: BLE001 - informational only
        pass


def complete(db: Database[Doc], job_id: str, token: str,
             result: dict[str, Any] | None = None, *, worker: str | None = None,
             plain: bool = False) -> bool:
    """Mark the job succeeded with ``result``, only while ``token`` holds a live lease.
    False: the lease is gone (a peer may be running the job); nothing was changed.

    ``plain=True`` writes without a transaction (one command instead of two). Only for
    a holder that knows its lease is live with time to spare and that left no
    transaction of its own unresolved: then no other process can have a transaction
    open on the job (every other writer's filter needs a lapsed lease or another token,
    see ``app.db.txn``), so the plain write cannot wait on one."""
    now = server_now(db)
    update = {"$set": {"state": SUCCEEDED, "result": result, "finished_at": now,
                       "updated_at": now, "expire_at": now + FINISHED_RETENTION},
              "$push": {"history": _history(now, "succeeded", worker=worker)}}
    fence = _fence(job_id, token, now)
    if plain:
        done = dbm.retry(lambda: _jobs(db).update_one(fence, update),
                         what="complete job").matched_count == 1
    else:
        done = txn.update_one(_jobs(db), fence, update, what="complete job")
    if done or _finished_by(db, job_id, token, SUCCEEDED):
        return True
    log.warning("job completion refused: this worker's lease is gone",
                extra={"job_id": job_id, "event": "job.complete_refused", "worker": worker})
    _note_refused(db, job_id, worker, "complete_refused", now)
    return False


def backoff_seconds(attempt: int, base: float, cap: float) -> float:
    """Exponential backoff with jitter: base·2^(attempt-1), capped, scaled by [0.5, 1)."""
    raw = min(cap, base * (2 ** max(0, attempt - 1)))
    return raw * random.uniform(0.5, 1.0)


def fail(db: Database[Doc], job_id: str, token: str, error: str, *, attempts: int,
         max_attempts: int | None = None, permanent: bool = False,
         backoff_base_seconds: float = 5.0, backoff_max_seconds: float = 600.0,
         worker: str | None = None, settings: Settings | None = None) -> str | None:
    """Record a failed attempt while ``token`` holds the lease: back to ``queued`` after
    an exponential, jittered backoff, or ``dead`` when ``permanent`` or when the attempts
    are spent. Returns the new state, or None when the lease is gone (nothing changed)."""
    settings = _settings(settings)
    limit = max_attempts or settings.job_max_attempts
    now = server_now(db)
    error = error[:2000]
    if permanent or attempts >= limit:
        state, delay = DEAD, 0.0
        fields: Doc = {"state": DEAD, "finished_at": now, "expire_at": now + DEAD_RETENTION}
    else:
        state = QUEUED
        delay = backoff_seconds(attempts, backoff_base_seconds, backoff_max_seconds)
        due = now + timedelta(seconds=delay)
        fields = {"state": QUEUED, "run_after": due, "wake_at": _wake_at(due, delay, settings),
                  "lease": None}
    fields.update(updated_at=now, last_error=error, max_attempts=limit)
    update = {"$set": fields, "$push": {"history": _history(
        now, "dead" if state == DEAD else "failed", worker=worker, error=error[:500],
        **({"retry_in": round(delay, 3)} if state == QUEUED else {}))}}
    if not txn.update_one(_jobs(db), _fence(job_id, token, now), update,
                          what="record job failure"):
        if state == DEAD and _finished_by(db, job_id, token, DEAD):
            return DEAD
        log.warning("job failure not recorded: this worker's lease is gone",
                    extra={"job_id": job_id, "event": "job.fail_refused", "worker": worker})
        _note_refused(db, job_id, worker, "fail_refused", now)
        return None
    if state == QUEUED:
        _publish_or_leave(db, job_id, now + timedelta(seconds=delay), delay, settings)
    return state


def retry_later(db: Database[Doc], job_id: str, token: str, delay_seconds: float,
                reason: str, *, worker: str | None = None,
                settings: Settings | None = None) -> bool:
    """Requeue after ``delay_seconds`` without spending an attempt (RetryLater)."""
    settings = _settings(settings)
    now = server_now(db)
    due = now + timedelta(seconds=delay_seconds)
    update = {"$set": {"state": QUEUED, "run_after": due,
                       "wake_at": _wake_at(due, delay_seconds, settings), "lease": None,
                       "updated_at": now, "last_error": f"retry later: {reason}"[:2000]},
              "$inc": {"attempts": -1},
              "$push": {"history": _history(now, "retry_later", worker=worker,
                                            reason=reason[:500],
                                            retry_in=round(delay_seconds, 3))}}
    if not txn.update_one(_jobs(db), _fence(job_id, token, now), update,
                          what="reschedule job"):
        _note_refused(db, job_id, worker, "retry_later_refused", now)
        return False
    _publish_or_leave(db, job_id, due, delay_seconds, settings)
    return True


def release(db: Database[Doc], job_id: str, token: str, reason: str, *,
            worker: str | None = None, settings: Settings | None = None) -> bool:
    """Give a running job back (e.g. a worker shutting down): queued at once, the attempt
    given back, a wake-up published so a peer claims it without waiting for the lease."""
    settings = _settings(settings)
    now = server_now(db)
    update = {"$set": {"state": QUEUED, "run_after": now, "wake_at": now, "lease": None,
                       "updated_at": now},
              "$inc": {"attempts": -1},
              "$push": {"history": _history(now, "released", worker=worker,
                                            reason=reason[:500])}}
    # No expiry in the filter: releasing a lapsed lease that nobody re-claimed is fine.
    fence = {"_id": job_id, "state": RUNNING, **JOB_LEASE.owned(token)}
    if not txn.update_one(_jobs(db), fence, update, attempts=3, what="release job"):
        return False
    broker.publish_wakeup(job_id, settings=settings)
    return True


class AlreadyCommitted(Exception):  # noqa: N818 - internal control flow
    def __init__(self, result: Any) -> None:
        super().__init__("already committed")
        self.result = result


def fenced_transaction(db: Database[Doc], job_id: str, token: str,
                       fn: Callable[[ClientSession], T], *, complete: bool = False,
                       worker: str | None = None,
                       retry_while: Callable[[], bool] | None = None) -> T:
    """Run ``fn(session)`` in a transaction that commits only while ``token`` holds a
    live lease on the job; with ``complete=True`` the same transaction marks the job
    succeeded with ``fn``'s return value (a dict or None) as its result, so the effect
    and the completion commit together or not at all.

    The fence is a write to the job document inside the transaction, so a concurrent
    re-claim conflicts with it: one of the two aborts. Raises LeaseLost when the lease
    is gone (nothing of ``fn`` commits). If a retry follows a commit whose reply was lost,
    ``fn`` does not run twice: each call stamps the job with its own id.
    """
    call_id = uuid.uuid4().hex
    jobs = _jobs(db)

    def run(session: ClientSession) -> T:
        now = server_now(db)
        fence = {**_fence(job_id, token, now), "lease.txn": {"$ne": call_id}}
        if not complete:
            res = jobs.update_one(fence, {"$set": {"lease.txn": call_id}}, session=session)
            if res.matched_count != 1:
                _diagnose(session)
            return fn(session)
        value = fn(session)
        if value is not None and not isinstance(value, dict):
            raise TypeError("a completing transaction's function must return a dict or None "
                            f"(the job's result), not {type(value).__name__}")
        res = jobs.update_one(fence, {
            "$set": {"lease.txn": call_id, "state": SUCCEEDED, "result": value,
                     "finished_at": now, "updated_at": now,
                     "expire_at": now + FINISHED_RETENTION},
            "$push": {"history": _history(now, "succeeded", worker=worker)}},
            session=session)
        if res.matched_count != 1:
            _diagnose(session)
        return value

    def _diagnose(session: ClientSession) -> None:
        job = jobs.find_one({"_id": job_id}, {"state": 1, "lease": 1, "result": 1},
                            session=session) or {}
        lease = job.get("lease") or {}
        if lease.get("token") == token and lease.get("txn") == call_id:
            raise AlreadyCommitted(job.get("result") if complete else None)
        raise LeaseLost(job_id, "the lease is gone: a peer re-claimed the job or it lapsed; "
                                "the transaction was not committed")

    try:
        return txn.run(db, run, attempts=8, what="fenced job transaction",
                       retry_while=retry_while)
    except AlreadyCommitted as done:
        return done.result
    except LeaseLost:
        log.warning("fenced transaction refused: this worker's lease is gone",
                    extra={"job_id": job_id, "event": "job.transaction_refused",
                           "worker": worker})
        _note_refused(db, job_id, worker, "transaction_refused", server_now(db))
        raise
