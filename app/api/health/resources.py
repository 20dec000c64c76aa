"""Liveness and readiness probes."""

from typing import Any

from flask.views import MethodView

from app.api.common import Blueprint, current_db
from app.api.health.schemas import HealthSchema, ReadinessSchema
from app.health import readiness

blp = Blueprint("health", __name__, description="Liveness and readiness probes")


@blp.route("/healthz")
class Healthz(MethodView):
    @blp.response(200, HealthSchema)
    def get(self) -> dict[str, Any]:
        """Process is up (cheap; touches no dependency)."""
        return {"status": "ok"}


@blp.route("/readyz")
class Readyz(MethodView):
    @blp.response(200, ReadinessSchema)
    @blp.alt_response(503, schema=ReadinessSchema, description="A dependency is not ready")
    def get(self) -> tuple[dict[str, Any], int]:
        """Database reachable and every registered check (KEK canary, ...) passing."""
        ready, detail = readiness(current_db())
        return {"ready": ready, "checks": detail}, 200 if ready else 503
