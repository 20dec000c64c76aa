"""Durable jobs (DESIGN.md, invariant 1): a job's effect happens once, and a dead worker
never loses one.

The job document in MongoDB is the truth; a Celery message (kombu's MongoDB transport)
only wakes a worker. Public API::

    enqueue(db, kind, payload, *, dedupe_key=None, run_after=None, project_id=None,
            session=None, publish=True) -> dict       # the job (or the active duplicate)
    publish_wakeup(job_id) -> bool                    # after a transaction that enqueued
    publish_wakeups(job_ids) -> int                   # ... many, in one broker write

    @register_handler("kind", max_attempts=..., backoff_base_seconds=...,
                      backoff_max_seconds=..., validate=...)
    def handle(ctx: JobContext) -> dict | None: ...
        ctx.job, ctx.payload, ctx.db, ctx.lease_token
        ctx.check_lease()            # LeaseLost if the lease is gone: before side effects
        ctx.transaction(fn)          # fn(session) committed only while the lease holds
        ctx.transaction(fn, complete=True)   # ... and the job completes in the same txn
    raise RetryLater(delay_seconds, reason) | DeferUntil(until, now, reason)
          | PermanentFailure(reason)

    claim / heartbeat / complete / fail (fenced by the lease token)   # app.jobs.lifecycle
    get_job / list_jobs / retry_dead / cancel / cancel_queued         # app.jobs.actions
    queue_depth(db)                                                  # app.jobs.stats
    jobs_by_dedupe_key(db, keys, session=...) -> {key: KeyJobs}       # app.jobs.dedupe
    running_under_live_lease(db, kind, exclude_id=...)               # app.jobs.stats
    waiting_job(db, job_id, now, kind=..., payload=..., session=...) # app.jobs.stats
    reap(db)                                                         # app.jobs.reaper

The application's job kinds are listed in ``app.handlers`` (nothing registers by import).
"""

from app.jobs.actions import cancel, cancel_queued, get_job, list_jobs, retry_dead
from app.jobs.context import JobContext
from app.jobs.dedupe import KeyJobs, active_dedupe_keys, jobs_by_dedupe_key
from app.jobs.errors import (
    DeferUntil,
    InvalidJob,
    JobNotFound,
    JobStateConflict,
    LeaseLost,
    PermanentFailure,
    RetryLater,
)
from app.jobs.lifecycle import (
    ACTIVE_STATES,
    STATES,
    claim,
    complete,
    enqueue,
    enqueue_many,
    fail,
    fenced_transaction,
    heartbeat,
    publish_wakeup,
    publish_wakeups,
    release,
    retry_later,
)
from app.jobs.reaper import reap
from app.jobs.registry import load_modules, register_handler
from app.jobs.stats import queue_depth, running_under_live_lease, waiting_job

__all__ = [
    "ACTIVE_STATES", "STATES", "InvalidJob", "JobContext", "JobNotFound",
    "JobStateConflict", "LeaseLost", "PermanentFailure", "RetryLater", "DeferUntil",
    "KeyJobs", "active_dedupe_keys", "jobs_by_dedupe_key",
    "cancel", "cancel_queued", "claim", "complete", "enqueue", "enqueue_many", "fail",
    "fenced_transaction",
    "get_job", "heartbeat", "list_jobs", "load_modules", "publish_wakeup", "publish_wakeups",
    "queue_depth", "reap",
    "register_handler", "release", "retry_dead", "retry_later", "running_under_live_lease",
    "waiting_job",
]
