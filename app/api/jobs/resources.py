"""Durable jobs: thin views over ``app.jobs`` (list, read, retry a dead one, cancel a
queued one). A job belongs to the project in its ``project_id``; jobs of no project
(internal timed work) are visible to admin tokens only."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from bson import ObjectId
from flask.views import MethodView

from app import db as dbm
from app.api import windows
from app.api.auth import READ, WRITE, scope
from app.api.common import (
    API_PREFIX,
    Blueprint,
    current_db,
    ensure_visible,
    principal,
    scoped_query,
)
from app.api.jobs.schemas import CancelSchema, JobListArgsSchema, JobPageSchema, JobSchema
from app.errors import NotFound

blp = Blueprint("jobs", __name__, url_prefix=f"{API_PREFIX}/jobs",
                description="Durable background jobs (issuance, renewal, ...).")

# The lease token fences a worker's writes: never shown.
_PROJECTION = {"lease.token": 0}


def _load(job_id: str) -> dict[str, Any]:
    from app.jobs import get_job

    try:
        doc = get_job(current_db(), job_id)
    except NotFound:
        doc = None
    if doc is not None and doc.get("lease"):
        doc["lease"] = {k: v for k, v in doc["lease"].items() if k != "token"}
    return ensure_visible(doc, "job", job_id)


@blp.route("")
class Jobs(MethodView):
    @scope(READ)
    @blp.arguments(JobListArgsSchema, location="query")
    @blp.response(200, JobPageSchema)
    def get(self, args: dict[str, Any]) -> dict[str, Any]:
        """List jobs, newest first, by state, kind or project."""
        query = scoped_query(args, "state", "kind")
        # Read through created_at windows (app.api.windows): a page costs its own jobs.
        # The first is a minute wide, as the dashboard's: a busy fleet makes thousands
        # of jobs an hour, and an hour-wide first window sorted all of them.
        return windows.time_page(current_db()[dbm.JOBS], query, limit=args["limit"],
                                 cursor=args["cursor"], descending=True,
                                 projection=_PROJECTION, key="created_at", tie="_id",
                                 tie_type=ObjectId, key_first=False,
                                 first_span=timedelta(minutes=1))


@blp.route("/<string:job_id>")
class JobById(MethodView):
    @scope(READ)
    @blp.response(200, JobSchema)
    def get(self, job_id: str) -> dict[str, Any]:
        """Read a job (state, attempts, last error, history)."""
        return _load(job_id)


@blp.route("/<string:job_id>/retry")
class RetryJob(MethodView):
    @scope(WRITE)
    @blp.response(200, JobSchema)
    def post(self, job_id: str) -> dict[str, Any]:
        """Retry a dead job with a fresh attempt budget (409 in any other state)."""
        from app.jobs import retry_dead

        _load(job_id)
        return _strip(retry_dead(current_db(), job_id, actor=principal().actor))


@blp.route("/<string:job_id>/cancel")
class CancelJob(MethodView):
    @scope(WRITE)
    @blp.arguments(CancelSchema)
    @blp.response(200, JobSchema)
    def post(self, data: dict[str, Any], job_id: str) -> dict[str, Any]:
        """Cancel a queued job (409 once it runs or has finished)."""
        from app.jobs import cancel

        _load(job_id)
        return _strip(cancel(current_db(), job_id, actor=principal().actor,
                             reason=data["reason"]))


def _strip(doc: dict[str, Any]) -> dict[str, Any]:
    if doc.get("lease"):
        doc["lease"] = {k: v for k, v in doc["lease"].items() if k != "token"}
    return doc
