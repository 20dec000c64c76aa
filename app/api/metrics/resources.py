"""``/metrics``: Prometheus text exposition (unauthenticated, like the probes).

Process metrics (HTTP, and ACME/job counters when they run in this process) are merged
across gunicorn workers in multiprocess mode; certificate, job and scheduler state is
read from the database at scrape time (see ``app/metrics.py``).
"""

from flask import Response, current_app
from flask.views import MethodView

from app.api.common import Blueprint
from app.metrics import build_registry, render

blp = Blueprint("metrics", __name__, description="Prometheus metrics")


def _db() -> object:
    from app import db as dbm

    return dbm.get_db(current_app.extensions["cap_settings"])


@blp.route("/metrics")
class Metrics(MethodView):
    @blp.response(200, content_type="text/plain; version=0.0.4; charset=utf-8",
                  description="Prometheus text exposition format 0.0.4")
    def get(self) -> Response:
        """Prometheus metrics: certificates, ACME requests, jobs, scheduler, HTTP."""
        import app.jobs  # noqa: F401 - registers the queue-depth gauges on import
        body, content_type = render(build_registry(_db))
        response = Response(body, mimetype=None)
        response.headers["Content-Type"] = content_type
        response.headers["Cache-Control"] = "no-store"
        return response
