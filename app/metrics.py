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

State metrics (certificate expiry and readiness, job queue depth, the scheduler lease)
are read from MongoDB at scrape time by ``DatabaseCollector``: the database is the
source of truth, so every api replica reports the same values.

Processes: gunicorn forks several workers, so the api runs prometheus_client's
multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``, set by ``app/gunicorn_conf.py`` before
any metric exists). Event metrics incremented in a Celery worker's pool processes are
served by that worker on ``CAP_WORKER_METRICS_PORT`` (``tasks/metrics.py``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
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

# Extra scrape-time collectors other parts may add (called with the database, must
# yield Metric objects and not raise for a missing collection).
ScrapeFn = Callable[[Any], Iterable[Metric]]
_scrape_extensions: dict[str, ScrapeFn] = {}


def register_scrape(name: str, fn: ScrapeFn) -> None:
    """Add a scrape-time collector (e.g. the jobs package's queue-depth gauges)."""
    _scrape_extensions[name] = fn


def _ts(value: Any) -> float | None:
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.timestamp()
    return None


def certificate_metrics(db: Any) -> Iterator[Metric]:
    """cert-manager-like per-certificate gauges, read from ``certificates``."""
    from app import db as dbm

    labels = ["id", "name", "project", "issuer"]
    expiry = GaugeMetricFamily(
        "certautopilot_certificate_expiration_timestamp_seconds",
        "Expiry (notAfter) of the certificate currently issued, as a Unix timestamp.",
        labels=labels)
    renewal = GaugeMetricFamily(
        "certautopilot_certificate_renewal_timestamp_seconds",
        "When the certificate is next due for renewal, as a Unix timestamp.",
        labels=labels)
    ready = GaugeMetricFamily(
        "certautopilot_certificate_ready_status",
        "Whether the certificate is ready (issued and valid): one series per condition.",
        labels=[*labels, "condition"])
    projection = {"_id": 1, "name": 1, "names": 1, "project_id": 1, "status": 1,
                  "not_after": 1, "next_renewal_at": 1, "account_id": 1, "directory_url": 1,
                  "deleted_at": 1}
    now = datetime.now(UTC).timestamp()
    for doc in db[dbm.CERTIFICATES].find({"deleted_at": None}, projection):
        name = doc.get("name") or ",".join(doc.get("names") or [])
        issuer = str(doc.get("directory_url") or doc.get("account_id") or "")
        values = [str(doc["_id"]), str(name), str(doc.get("project_id") or ""), issuer]
        not_after = _ts(doc.get("not_after"))
        if not_after is not None:
            expiry.add_metric(values, not_after)
        next_renewal = _ts(doc.get("next_renewal_at"))
        if next_renewal is not None:
            renewal.add_metric(values, next_renewal)
        is_ready = doc.get("status") in ("issued", "valid", "ready") and (
            not_after is None or not_after > now)
        for condition in ("True", "False"):
            ready.add_metric([*values, condition], 1.0 if (condition == "True") == is_ready
                             else 0.0)
    yield expiry
    yield renewal
    yield ready


def job_metrics(db: Any) -> Iterator[Metric]:
    """Jobs by kind and state (queue depth: certautopilot_jobs_queued, app/jobs/metrics.py)."""
    from app import db as dbm

    jobs = GaugeMetricFamily("certautopilot_jobs", "Jobs currently stored, by kind and state.",
                             labels=["kind", "state"])
    pipeline = [{"$group": {"_id": {"kind": "$kind", "state": "$state"}, "n": {"$sum": 1}}}]
    for row in db[dbm.JOBS].aggregate(pipeline):
        key = row["_id"] or {}
        state = str(key.get("state"))
        jobs.add_metric([str(key.get("kind")), state], float(row["n"]))
    yield jobs


def scheduler_metrics(db: Any) -> Iterator[Metric]:
    """The scheduler's leader lease: who leads (1 while the lease is held), its term."""
    from app.scheduling_status import lease_status

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


def watch_metrics(db: Any) -> Iterator[Metric]:
    """Drift scans (per endpoint) and open alerts (app/ops/)."""
    from app.ops import drift
    from app.ops.alerts import engine

    yield from drift.endpoint_metrics(db)
    yield from engine.alert_metrics(db)


class DatabaseCollector(Collector):
    """Reads state metrics from MongoDB at scrape time."""

    def __init__(self, get_db: Callable[[], Any]) -> None:
        self._get_db = get_db

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("certautopilot_database_up",
                               "1 when this scrape could read the database.")
        try:
            db = self._get_db()
            families: list[Metric] = []
            for fn in (certificate_metrics, job_metrics, scheduler_metrics, watch_metrics,
                       *_scrape_extensions.values()):
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


def build_registry(get_db: Callable[[], Any] | None) -> CollectorRegistry:
    """The registry ``/metrics`` renders: process metrics (merged across gunicorn
    workers in multiprocess mode) plus the database collector."""
    from prometheus_client import REGISTRY

    if multiprocess_enabled():
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = CollectorRegistry()
        registry.register(_Delegate(REGISTRY))
    if get_db is not None:
        registry.register(DatabaseCollector(get_db))
    return registry


def render(registry: CollectorRegistry) -> tuple[bytes, str]:
    return generate_latest(registry), CONTENT_TYPE_LATEST


def mark_process_dead(pid: int) -> None:
    """gunicorn child_exit hook: drop a dead worker's live gauges (multiprocess mode)."""
    if multiprocess_enabled():
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)
