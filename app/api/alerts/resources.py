"""Alert channels (per project; global ones by admins) and alerts: thin views over
``app.ops.alerts``. A project token sees its own project's channels and alerts; the
webhook URL and secret are never answered (only ``target``: ``scheme://host/…``)."""

from __future__ import annotations

from typing import Any

from flask.views import MethodView

from app import db as dbm
from app.api import idempotency
from app.api.alerts.schemas import (
    AlertListArgsSchema,
    AlertPageSchema,
    ChannelCreateSchema,
    ChannelListArgsSchema,
    ChannelPageSchema,
    ChannelSchema,
    TestSentSchema,
)
from app.api.auth import READ, WRITE, scope
from app.api.common import (
    API_PREFIX,
    Blueprint,
    current_db,
    ensure_visible,
    paginate,
    principal,
    project_scope,
    required_project,
)
from app.errors import Forbidden, NotFound, ValidationFailed
from app.ops.alerts import channels, engine

blp = Blueprint("alerts", __name__, url_prefix=API_PREFIX,
                description="Alert channels (webhook, email) and the alerts sent to them.")


def _load_channel(channel_id: str) -> dict[str, Any]:
    if len(channel_id) > 100:
        raise NotFound("alert channel not found")
    doc = dbm.primary(current_db())[dbm.ALERT_CHANNELS].find_one({"_id": channel_id})
    return ensure_visible(doc, "alert channel", channel_id)


@blp.route("/alert-channels")
class Channels(MethodView):
    @scope(READ)
    @blp.arguments(ChannelListArgsSchema, location="query")
    @blp.response(200, ChannelPageSchema)
    def get(self, args: dict[str, Any]) -> dict[str, Any]:
        """List alert channels (admins: every channel, or one project's)."""
        project_id = project_scope(args.get("project_id"))
        query = {} if project_id is None else {"project_id": project_id}
        page = paginate(current_db()[dbm.ALERT_CHANNELS], query, limit=args["limit"],
                        cursor=args["cursor"])
        page["items"] = [channels.public_view(d) for d in page["items"]]
        return page

    @scope(WRITE)
    @blp.arguments(ChannelCreateSchema)
    @blp.response(201, ChannelSchema)
    def post(self, data: dict[str, Any]) -> dict[str, Any]:
        """Add an alert channel (a bad definition is refused with the reason)."""
        caller = principal()
        is_global = data.pop("global_", False)
        requested = data.pop("project_id", None)
        if is_global:
            if not caller.is_admin:
                raise Forbidden("only an admin token may add a global alert channel")
            if requested:
                raise ValidationFailed("a global channel belongs to no project: drop "
                                       "project_id", errors={"project_id": ["not with global"]})
            project_id = None
        else:
            project_id = required_project(requested)
        if "from_" in data:
            data["from"] = data.pop("from_")
        doc = channels.create_channel(current_db(), project_id, data, caller.actor,
                                      rule_names=engine.RULES,
                                      request_key=idempotency.current_key())
        return channels.public_view(doc)


@blp.route("/alert-channels/<string:channel_id>")
class ChannelById(MethodView):
    @scope(READ)
    @blp.response(200, ChannelSchema)
    def get(self, channel_id: str) -> dict[str, Any]:
        """Read an alert channel (its delivery health included)."""
        return channels.public_view(_load_channel(channel_id))

    @scope(WRITE)
    @blp.response(204)
    def delete(self, channel_id: str) -> None:
        """Remove an alert channel (its undelivered messages are dropped)."""
        doc = _load_channel(channel_id)
        channels.delete_channel(current_db(), doc, principal().actor)


@blp.route("/alert-channels/<string:channel_id>/test")
class ChannelTest(MethodView):
    @scope(WRITE)
    @blp.response(200, TestSentSchema)
    @blp.alt_response(502, response="BadGateway")
    def post(self, channel_id: str) -> dict[str, Any]:
        """Send a test message now (502 with the reason when the channel refuses it)."""
        from app.config import load_settings

        doc = _load_channel(channel_id)
        return engine.send_test(current_db(), doc, principal().actor,
                                settings=load_settings())


@blp.route("/alerts")
class Alerts(MethodView):
    @scope(READ)
    @blp.arguments(AlertListArgsSchema, location="query")
    @blp.response(200, AlertPageSchema)
    def get(self, args: dict[str, Any]) -> dict[str, Any]:
        """List alerts, newest first (open ones by default)."""
        project_id = project_scope(args.get("project_id"))
        query: dict[str, Any] = {} if project_id is None else {"project_id": project_id}
        if args["state"] != "all":
            query["state"] = args["state"]
        if args.get("rule"):
            query["rule"] = args["rule"]
        return paginate(current_db()[dbm.ALERTS], query, limit=args["limit"],
                        cursor=args["cursor"], keys=("opened_at", "_id"), descending=True)
