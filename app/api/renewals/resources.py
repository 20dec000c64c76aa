"""Emergency and bulk renewals (``app.domain.renewal_batches``): thin views. A project
token renews within its project; an admin token across projects (or one, by
``project_id``)."""

from __future__ import annotations

from typing import Any

from flask.views import MethodView

from app.api import idempotency
from app.api.auth import READ, WRITE, scope
from app.api.common import API_PREFIX, Blueprint, current_db, principal
from app.api.renewals.schemas import RenewalBatchCreateSchema, RenewalBatchSchema
from app.domain import renewal_batches

blp = Blueprint("renewals", __name__, url_prefix=f"{API_PREFIX}/renewals",
                description="Emergency and bulk renewal batches, through the CA budget.")


def _scope() -> str | None:
    caller = principal()
    return None if caller.is_admin else caller.project_id


@blp.route("")
class Renewals(MethodView):
    @scope(WRITE)
    @blp.arguments(RenewalBatchCreateSchema)
    @blp.response(201, RenewalBatchSchema)
    def post(self, data: dict[str, Any]) -> dict[str, Any]:
        """Renew the selected certificates now, as one tracked batch."""
        db = current_db()
        retaken = idempotency.retaken_key()
        if retaken is not None:
            made = renewal_batches.made_under(db, retaken, project_id=_scope())
            if made is not None:
                return made
        return renewal_batches.start_batch(db, data, principal().actor, project_id=_scope(),
                                           request_key=idempotency.current_key())


@blp.route("/<string:batch_id>")
class RenewalById(MethodView):
    @scope(READ)
    @blp.response(200, RenewalBatchSchema)
    def get(self, batch_id: str) -> dict[str, Any]:
        """A batch's progress: queued, done, failed, cancelled."""
        return renewal_batches.get_batch(current_db(), batch_id, project_id=_scope())


@blp.route("/<string:batch_id>/cancel")
class CancelRenewals(MethodView):
    @scope(WRITE)
    @blp.response(200, RenewalBatchSchema)
    def post(self, batch_id: str) -> dict[str, Any]:
        """Cancel a batch: its jobs still queued are cancelled; running ones finish."""
        return renewal_batches.cancel_batch(current_db(), batch_id, principal().actor,
                                            project_id=_scope())
