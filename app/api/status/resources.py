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
        queue = {str(row["_id"]): int(row["n"]) for row in dbm.retry(
            lambda: list(db[dbm.JOBS].aggregate(
                [{"$group": {"_id": "$state", "n": {"$sum": 1}}}])), what="count jobs")}
        return {"server_time": now, "alive": sum(1 for w in workers if w["alive"]),
                "workers": workers, "queue": queue}


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
