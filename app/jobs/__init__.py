"""Durable jobs (DESIGN.md, invariant 1): a job's effect happens once, and a dead worker
never loses one.

The job document in MongoDB is the truth; a Celery message (kombu's MongoDB transport)
only wakes a worker. Public API::

    enqueue(db, kind, payload, *, dedupe_key=None, run_after=None, project_id=None,
            session=None, publish=True) -> dict       # the job (or the active duplicate)
    publish_wakeup(job_id) -> bool                    # after a transaction that enqueued

    @register_handler("kind", max_attempts=..., backoff_base_seconds=...,
                      backoff_max_seconds=..., validate=...)
    def handle(ctx: JobContext) -> dict | None: ...
        ctx.job, ctx.payload, ctx.db, ctx.lease_token
        ctx.check_lease()            # LeaseLost if the lease is gone: before side effects
        ctx.transaction(fn)          # fn(session) committed only while the lease holds
        ctx.transaction(fn, complete=True)   # ... and the job completes in the same txn
    raise RetryLater(delay_seconds, reason) | PermanentFailure(reason)

    claim / heartbeat / complete / fail (fenced by the lease token), reap(db),
    queue_depth(db), get_job / list_jobs / retry_dead / cancel (operator actions).

Handler modules are listed in ``app.jobs.registry.HANDLER_MODULES``.
"""

from app.jobs.context import JobContext
from app.jobs.errors import (
    InvalidJob,
    JobNotFound,
    JobStateConflict,
    LeaseLost,
    PermanentFailure,
    RetryLater,
)
from app.jobs.metrics import register_with_api_metrics
from app.jobs.reaper import reap
from app.jobs.registry import HANDLER_MODULES, load_handlers, register_handler
from app.jobs.store import (
    ACTIVE_STATES,
    STATES,
    cancel,
    claim,
    complete,
    enqueue,
    enqueue_many,
    fail,
    fenced_transaction,
    get_job,
    heartbeat,
    list_jobs,
    publish_wakeup,
    queue_depth,
    release,
    retry_dead,
    retry_later,
)

register_with_api_metrics()

__all__ = [
    "ACTIVE_STATES", "HANDLER_MODULES", "STATES", "InvalidJob", "JobContext", "JobNotFound",
    "JobStateConflict", "LeaseLost", "PermanentFailure", "RetryLater", "cancel", "claim",
    "complete", "enqueue", "enqueue_many", "fail", "fenced_transaction", "get_job", "heartbeat",
    "list_jobs", "load_handlers", "publish_wakeup", "queue_depth", "reap",
    "register_handler", "release", "retry_dead", "retry_later",
]
