"""Prometheus metrics: the shared metric objects, and the ``/metrics`` exposition.

Event metrics (counters, histograms) are defined here, once, so every part of the
code increments the same objects:

- ``ACME_REQUESTS`` / ``ACME_REQUEST_DURATION``: the ACME client counts each request to
  a CA by ``ca`` (directory host), ``endpoint`` (newNonce, newOrder, finalize, ...) and
  ``status`` (HTTP status, or ``error`` when no answer came).
- ``JOBS_COMPLETED`` / ``JOB_DURATION``: the job runner counts each finished attempt by
  ``kind`` and ``state`` (succeeded, retry, dead, lease_lost, ...).
- ``HTTP_REQUESTS`` / ``HTTP_REQUEST_DURATION``: the API counts each request by
  ``method``, ``route`` (the URL rule, not the raw path) and ``status``.

State metrics come from the database, the source of truth, so every api replica reports
the same values. What is cheap is read at scrape time by ``DatabaseCollector`` (the
scheduler lease, queue depth through its partial index, audit sinks); what needs the
whole fleet (certificate gauges, jobs by kind and state) is read once per minute by one
worker into a shared snapshot (``app/metrics_snapshot.py``) and served from there.

Processes: gunicorn forks several workers, so the api runs prometheus_client's
multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``, set by ``app/gunicorn_conf.py`` before
any metric exists). Event metrics incremented in a Celery worker's pool processes are
served by that worker on ``CAP_WORKER_METRICS_PORT`` (``tasks/metrics.py``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

ACME_REQUESTS = Counter(
    "certautopilot_acme_requests_total",
    "ACME requests sent to a CA, by CA, endpoint and HTTP status ('error': no answer).",
    ["ca", "endpoint", "status"],
)
ACME_REQUEST_DURATION = Histogram(
    "certautopilot_acme_request_duration_seconds",
    "Duration of ACME requests, by CA, endpoint and HTTP status.",
    ["ca", "endpoint", "status"],
    buckets=_LATENCY_BUCKETS,
)
JOBS_COMPLETED = Counter(
    "certautopilot_jobs_completed_total",
    "Finished job attempts, by job kind and resulting state.",
    ["kind", "state"],
)
JOB_DURATION = Histogram(
    "certautopilot_job_duration_seconds",
    "Duration of job attempts, by job kind and resulting state.",
    ["kind", "state"],
    buckets=(0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0),
)
HTTP_REQUESTS = Counter(
    "certautopilot_http_requests_total",
    "API requests, by method, URL rule and status.",
    ["method", "route", "status"],
)
HTTP_REQUEST_DURATION = Histogram(
    "certautopilot_http_request_duration_seconds",
    "API request duration, by method and URL rule.",
    ["method", "route"],
    buckets=_LATENCY_BUCKETS,
)

# A scrape-time collector of another package (called with the database, must yield
# Metric objects and not raise for a missing collection); the /metrics view lists them.
ScrapeFn = Callable[[Any], Iterable[Metric]]


def scheduler_metrics(db: Any) -> Iterator[Metric]:
    """The scheduler's leader lease: who leads (1 while the lease is held), its term."""
    from app.db.schedule import lease_status

    status = lease_status(db)
    leader = GaugeMetricFamily(
        "certautopilot_scheduler_leader",
        "1 while a scheduler holds the leader lease (label: the holder), else 0.",
        labels=["holder"])
    held = status.get("state") == "held"
    leader.add_metric([str(status.get("holder") or "") if held else ""], 1.0 if held else 0.0)
    term = GaugeMetricFamily("certautopilot_scheduler_term",
                             "Term of the scheduler lease (rises at every change of holder).")
    term.add_metric([], float(status.get("term") or 0))
    expires = GaugeMetricFamily("certautopilot_scheduler_lease_expires_in_seconds",
                                "Seconds until the held lease lapses unless renewed.")
    expires.add_metric([], float(status.get("expires_in_s") or 0.0))
    yield leader
    yield term
    yield expires


class DatabaseCollector(Collector):
    """Reads state metrics from MongoDB at scrape time (the fleet's from the snapshot's
    head; ``head`` is called once per scrape and may keep what it read for the caller)."""

    def __init__(self, get_db: Callable[[], Any], scrapes: Iterable[ScrapeFn] = (),
                 head: Callable[[Any], Any] | None = None) -> None:
        self._get_db = get_db
        self._scrapes = (scheduler_metrics, *scrapes)
        self._head = head

    def collect(self) -> Iterator[Metric]:
        from app import metrics_snapshot as fleet_metrics

        up = GaugeMetricFamily("certautopilot_database_up",
                               "1 when this scrape could read the database.")
        try:
            db = self._get_db()
            head = (self._head or fleet_metrics.read_head)(db)
            families: list[Metric] = list(fleet_metrics.aggregate_metrics(head))
            for fn in self._scrapes:
                families.extend(fn(db))
        except Exception as exc:  # noqa: BLE001 - a scrape reports, never fails
            log.warning("metrics scrape could not read the database",
                        extra={"error": f"{exc.__class__.__name__}: {exc}"[:200]})
            up.add_metric([], 0.0)
            yield up
            return
        up.add_metric([], 1.0)
        yield up
        yield from families

    def describe(self) -> Iterator[Metric]:
        return iter(())  # no scrape at registration time


class _Delegate(Collector):
    def __init__(self, inner: CollectorRegistry) -> None:
        self._inner = inner

    def collect(self) -> Iterator[Metric]:
        yield from self._inner.collect()


def multiprocess_enabled() -> bool:
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    return bool(path) and os.path.isdir(str(path))


def build_registry(get_db: Callable[[], Any] | None,
                   scrapes: Iterable[ScrapeFn] = (),
                   head: Callable[[Any], Any] | None = None) -> CollectorRegistry:
    """The registry ``/metrics`` renders: process metrics (merged across gunicorn
    workers in multiprocess mode) plus the database collector (with ``scrapes``)."""
    from prometheus_client import REGISTRY

    if multiprocess_enabled():
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = CollectorRegistry()
        registry.register(_Delegate(REGISTRY))
    if get_db is not None:
        registry.register(DatabaseCollector(get_db, scrapes, head))
    return registry


def render(registry: CollectorRegistry) -> tuple[bytes, str]:
    return generate_latest(registry), CONTENT_TYPE_LATEST


def mark_process_dead(pid: int) -> None:
    """gunicorn child_exit hook: drop a dead worker's live gauges (multiprocess mode)."""
    if multiprocess_enabled():
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)
