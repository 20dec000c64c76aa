"""ACME orders, read only (the worker writes them)."""

from __future__ import annotations

from typing import Any

from flask.views import MethodView

from app import db as dbm
from app.api.auth import READ, scope
from app.api.common import API_PREFIX, Blueprint, current_db, ensure_visible, paginate, scoped_query
from app.api.orders.schemas import OrderListArgsSchema, OrderPageSchema, OrderSchema
from app.domain import orders
from app.errors import NotFound

blp = Blueprint("orders", __name__, url_prefix=f"{API_PREFIX}/orders",
                description="ACME orders: one per issuance attempt (read only).")

# Never shown: the CSR and the issued PEM live on the certificate.
_HIDDEN = {"csr_pem": 0, "fullchain_pem": 0}


@blp.route("")
class Orders(MethodView):
    @scope(READ)
    @blp.arguments(OrderListArgsSchema, location="query")
    @blp.response(200, OrderPageSchema)
    def get(self, args: dict[str, Any]) -> dict[str, Any]:
        """List orders (newest first), e.g. of one certificate."""
        query = scoped_query(args, "certificate_id", "state")
        return paginate(current_db()[dbm.ORDERS], query, limit=args["limit"],
                        cursor=args["cursor"], projection=_HIDDEN, descending=True)


@blp.route("/<string:order_id>")
class OrderById(MethodView):
    @scope(READ)
    @blp.response(200, OrderSchema)
    def get(self, order_id: str) -> dict[str, Any]:
        """Read an order."""
        try:
            doc = orders.get(current_db(), order_id) if len(order_id) <= 100 else None
        except NotFound:
            doc = None
        return ensure_visible(doc, "order", order_id)
