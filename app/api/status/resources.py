"""Scheduler and worker status (read scope; the same for every project)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from flask.views import MethodView
from marshmallow import fields, validate

from app import db as dbm
from app.api.auth import READ, scope
from app.api.common import API_PREFIX, Blueprint, StrictQuery, current_db, principal
from app.api.status.schemas import (
    CaBudgetsSchema,
    SchedulerStatusSchema,
    WorkersStatusSchema,
)

blp = Blueprint("status", __name__, url_prefix=f"{API_PREFIX}/status",
                description="Scheduler leader lease and schedule; worker heartbeats; "
                            "the shared CA rate-limit budget.")

# A worker whose heartbeat is older than this is reported as not alive.
WORKER_LIVENESS = timedelta(seconds=60)


class SchedulerArgsSchema(StrictQuery):
    fires = fields.Integer(load_default=10, validate=validate.Range(min=0, max=100),
                           metadata={"description": "How many recent fired slots"})


@blp.route("/scheduler")
class SchedulerStatus(MethodView):
    @scope(READ)
    @blp.arguments(SchedulerArgsSchema, location="query")
    @blp.response(200, SchedulerStatusSchema)
    def get(self, args: dict[str, Any]) -> dict[str, Any]:
        """Scheduler: the leader lease (holder, term, expiry) and every timed entry."""
        from app.db.schedule import status

        return status(current_db(), fires=args["fires"])


@blp.route("/workers")
class WorkersStatus(MethodView):
    @scope(READ)
    @blp.response(200, WorkersStatusSchema)
    def get(self) -> dict[str, Any]:
        """Workers: heartbeats, liveness and running jobs; job counts by state."""
        from app.jobs.workers import list_workers

        db = current_db()
        now = dbm.server_now(db)
        docs = dbm.retry(lambda: list_workers(db)[:500], what="read workers")
        admin = principal().is_admin
        workers = []
        for doc in docs:
            running = doc.get("running_jobs", doc.get("running")) or []
            if not isinstance(running, list):
                running = []
            last_seen = doc.get("last_seen")
            row: dict[str, Any] = {
                "id": str(doc["_id"]), "host": doc.get("host"), "pid": doc.get("pid"),
                "version": doc.get("version"), "started_at": doc.get("started_at"),
                "state": doc.get("state"), "concurrency": doc.get("concurrency"),
                "last_seen": last_seen,
                "alive": last_seen is not None and last_seen > now - WORKER_LIVENESS,
                "running": len(running),
            }
            if admin:
                row["running_jobs"] = [str(j.get("_id", j.get("job_id", j)))
                                       if isinstance(j, dict) else str(j) for j in running]
            workers.append(row)
        queue, finished_at = job_counts(db)
        return {"server_time": now, "alive": sum(1 for w in workers if w["alive"]),
                "workers": workers, "queue": queue, "finished_counted_at": finished_at}


def job_counts(db: Any) -> tuple[dict[str, int], Any]:
    """Jobs by state: the active states (queued, running) counted now, each one range of
    the ``state`` index; the finished ones (a week of every renewal and timed slot, far
    more documents) as the metrics snapshot counted them (``app.metrics_snapshot``, at
    most a minute old), with the time it counted them (None before its first refresh).
    A count of the whole collection at every request took seconds at 100,000 jobs."""
    from app.jobs import ACTIVE_STATES
    from app.metrics_snapshot import read_head

    def count(state: str) -> int:
        return int(dbm.retry(lambda: db[dbm.JOBS].count_documents({"state": state}),
                             what="count jobs"))

    queue = {state: count(state) for state in ACTIVE_STATES}
    head = read_head(db)
    if head is None:
        return queue, None
    for row in head.get("jobs") or []:
        if row.get("state") not in ACTIVE_STATES:
            queue[str(row["state"])] = queue.get(str(row["state"]), 0) + int(row["n"])
    return queue, head.get("built_at")


class CaBudgetArgsSchema(StrictQuery):
    ca = fields.String(load_default=None, validate=validate.Length(max=2000),
                       metadata={"description": "Only this ACME directory URL"})


@blp.route("/ca-budgets")
class CaBudgets(MethodView):
    @scope(READ)
    @blp.arguments(CaBudgetArgsSchema, location="query")
    @blp.response(200, CaBudgetsSchema)
    def get(self, args: dict[str, Any]) -> dict[str, Any]:
        """CA budgets: each shared rate-limit bucket's level (tokens free, next token)."""
        from app.domain import budget

        db = current_db()
        rows = budget.levels(db, ca=args.get("ca"))
        if not principal().is_admin:
            # Accounts, domains and names of every project: for admins only.
            for row in rows:
                if row["subject"] != "*":
                    row["subject"] = None
        return {"server_time": dbm.server_now(db), "buckets": rows}
