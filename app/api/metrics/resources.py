"""``/metrics``: Prometheus text exposition (unauthenticated, like the probes).

Process metrics (HTTP, and ACME/job counters when they run in this process) are merged
across gunicorn workers in multiprocess mode; certificate, job and scheduler state is
read from the database at scrape time (see ``app/metrics.py``).
"""

from flask import Response
from flask.views import MethodView

from app.api.common import Blueprint, current_db
from app.audit.status import audit_metrics
from app.domain.budget import budget_metrics
from app.jobs.metrics import queue_depth_metrics
from app.metrics import ScrapeFn, build_registry, render

blp = Blueprint("metrics", __name__, description="Prometheus metrics")

# State read from the database at scrape time, besides app.metrics' own (certificates,
# jobs by state, the scheduler lease).
SCRAPES: tuple[ScrapeFn, ...] = (queue_depth_metrics, audit_metrics, budget_metrics)


@blp.route("/metrics")
class Metrics(MethodView):
    @blp.response(200, content_type="text/plain; version=0.0.4; charset=utf-8",
                  description="Prometheus text exposition format 0.0.4")
    def get(self) -> Response:
        """Prometheus metrics: certificates, ACME requests, jobs, scheduler, HTTP."""
        body, content_type = render(build_registry(current_db, SCRAPES))
        response = Response(body, mimetype=None)
        response.headers["Content-Type"] = content_type
        response.headers["Cache-Control"] = "no-store"
        return response
