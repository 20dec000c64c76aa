"""``/metrics``: Prometheus text exposition (unauthenticated, like the probes).

Process metrics (HTTP, and ACME/job counters when they run in this process) are merged
across gunicorn workers in multiprocess mode; scheduler and queue state is read from the
database at scrape time; fleet-wide gauges come from the shared snapshot one worker
refreshes (see ``app/metrics.py`` and ``app/metrics_snapshot.py``). The per-certificate
series are streamed one stored chunk at a time, so a scrape's memory does not grow with
the fleet.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from flask import Response, current_app, stream_with_context
from flask.views import MethodView

from app.api.common import Blueprint, current_db
from app.audit.status import audit_metrics
from app.domain.budget import budget_metrics
from app.domain.drift import endpoint_metrics
from app.jobs.metrics import queue_depth_metrics
from app.metrics import ScrapeFn, build_registry, render
from app.ops.alerts.engine import alert_metrics

log = logging.getLogger(__name__)

blp = Blueprint("metrics", __name__, description="Prometheus metrics")

# State read from the database at scrape time besides the fleet snapshot's aggregates
# (app.metrics adds the scheduler lease): queue depth, audit sinks, the CA budgets, what
# each endpoint served at its last drift scan, open alerts.
SCRAPES: tuple[ScrapeFn, ...] = (queue_depth_metrics, audit_metrics, budget_metrics,
                                 endpoint_metrics, alert_metrics)


@blp.route("/metrics")
class Metrics(MethodView):
    @blp.response(200, content_type="text/plain; version=0.0.4; charset=utf-8",
                  description="Prometheus text exposition format 0.0.4")
    def get(self) -> Response:
        """Prometheus metrics: certificates, ACME requests, jobs, scheduler, HTTP."""
        from app import metrics_snapshot as fleet_metrics

        settings = current_app.extensions["cap_settings"]
        heads: list[Any] = []

        def head(db: Any) -> Any:
            heads.append(fleet_metrics.read_head(db))
            return heads[-1]

        body, content_type = render(build_registry(current_db, SCRAPES, head))

        def stream() -> Iterator[bytes]:
            yield body
            if not heads:
                return
            try:
                yield from fleet_metrics.stream_certificate_series(current_db(), heads[-1],
                                                                   settings)
            except Exception as exc:  # noqa: BLE001 - headers are sent: end the body
                log.warning("metrics: could not stream the certificate series",
                            extra={"error": f"{exc.__class__.__name__}: {exc}"[:200]})

        response = Response(stream_with_context(stream()), mimetype=None)
        response.headers["Content-Type"] = content_type
        response.headers["Cache-Control"] = "no-store"
        return response
