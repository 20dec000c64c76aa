"""The audit log, read only: a project token sees its project's entries; an admin sees
every entry (also those of no project)."""

from __future__ import annotations

import re
from typing import Any

from flask.views import MethodView

from app import db as dbm
from app.api.audit.schemas import AuditPageSchema, AuditQueryArgsSchema
from app.api.auth import READ, scope
from app.api.common import API_PREFIX, Blueprint, current_db, paginate, scoped_query

blp = Blueprint("audit", __name__, url_prefix=f"{API_PREFIX}/audit",
                description="The tamper-evident audit log (read only).")


@blp.route("")
class AuditEntries(MethodView):
    @scope(READ)
    @blp.arguments(AuditQueryArgsSchema, location="query")
    @blp.response(200, AuditPageSchema)
    def get(self, args: dict[str, Any]) -> dict[str, Any]:
        """Query audit entries by time, actor, action and target."""
        query = scoped_query(args)
        window: dict[str, Any] = {}
        if args.get("since"):
            window["$gte"] = args["since"]
        if args.get("until"):
            window["$lt"] = args["until"]
        if window:
            query["time"] = window
        if args.get("actor"):
            query["actor.id"] = args["actor"]
        action = args.get("action")
        if action:
            query["action"] = ({"$regex": "^" + re.escape(action)} if action.endswith(".")
                               else action)
        if args.get("target"):
            query["target"] = args["target"]
        return paginate(current_db()[dbm.AUDIT], query, keys=("seq",), limit=args["limit"],
                        cursor=args["cursor"], descending=args["order"] == "desc",
                        projection={"_id": 0})
