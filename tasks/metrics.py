"""A Celery worker's own Prometheus endpoint (``CAP_WORKER_METRICS_PORT``).

Event metrics of the work a worker does -- ACME requests by CA, endpoint and status; job
attempts by kind and outcome, with durations -- are counted in its pool processes, not
in the api. With ``CAP_WORKER_METRICS_PORT`` set, the worker runs prometheus_client's
multiprocess mode: every pool process writes its counters to ``PROMETHEUS_MULTIPROC_DIR``
(a fresh temporary directory unless the operator names one, e.g. an ``emptyDir``), and
the main process serves their sum on that port. State metrics (certificate expiry, queue
depth, scheduler lease) stay on the api's ``/metrics``: they come from the database.

``prepare()`` must run before anything imports prometheus_client (it picks its value
class at import), so ``tasks/__init__.py`` calls it first; this module imports nothing
of prometheus_client at module level.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

log = logging.getLogger("certautopilot.worker")

_own_dir: str | None = None


def wanted(environ: Mapping[str, str] | None = None) -> bool:
    raw = ((environ if environ is not None else os.environ).get("CAP_WORKER_METRICS_PORT")
           or "").strip()
    return raw not in ("", "0")


def prepare() -> None:
    """Switch prometheus_client to multiprocess mode, with an empty directory."""
    global _own_dir
    if not wanted():
        return
    configured = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if configured:
        directory = Path(configured)
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob("*.db"):  # counts of a previous run would add up
            stale.unlink(missing_ok=True)
        return
    _own_dir = tempfile.mkdtemp(prefix="cap-worker-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = _own_dir


def serve(port: int, addr: str = "0.0.0.0") -> bool:  # noqa: S104 - the pod's port
    """Serve the pool's merged metrics from this (main) process; False if the port could
    not be bound (the worker keeps running jobs: metrics are not worth a renewal)."""
    from prometheus_client import CollectorRegistry, multiprocess, start_http_server

    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        log.error("worker metrics need PROMETHEUS_MULTIPROC_DIR set before start")
        return False
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    try:
        start_http_server(port, addr, registry=registry)
    except OSError as exc:
        log.error("could not serve worker metrics (CAP_WORKER_METRICS_PORT)",
                  extra={"port": port, "error": str(exc)[:200]})
        return False
    log.info("serving worker metrics", extra={"port": port})
    return True


def cleanup() -> None:
    if _own_dir:
        shutil.rmtree(_own_dir, ignore_errors=True)
