"""The audit log, read only: a project token sees its project's entries; an admin sees
every entry (also those of no project). Pages come in ``seq`` order, or, with ``since``
or ``until`` (and no target or actor), in time order (``app.api.windows``)."""

from __future__ import annotations

import re
from typing import Any

from flask.views import MethodView

from app import db as dbm
from app.api import windows
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
        collection, descending = current_db()[dbm.AUDIT], args["order"] == "desc"
        page = {"limit": args["limit"], "cursor": args["cursor"], "descending": descending,
                "projection": {"_id": 0}}
        # A time range without a target or actor is read in time order through time
        # windows, a selective clause as one index range in seq order, anything else
        # through seq windows (app.api.windows): a page costs about its own entries.
        if "time" in query and "target" not in query and "actor.id" not in query:
            return windows.time_page(collection, query, **page,
                                     earliest=lambda: _first_entry_time(collection))
        if any(k in query for k in ("target", "actor.id", "project_id")) or \
                isinstance(query.get("action"), str):
            return paginate(collection, query, keys=("seq",), **page)
        return windows.seq_page(collection, query, **page)


def _first_entry_time(collection: Any) -> Any:
    """The time of entry 1, where an ascending time range without a start begins (an
    entry's time is close to its seq order: the windows cover the rest regardless)."""
    first = dbm.retry(lambda: collection.find_one({"seq": 1}, {"time": 1}),
                      what="read the first audit entry") or {}
    return first.get("time")
