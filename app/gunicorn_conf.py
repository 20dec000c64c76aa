"""gunicorn settings for the api role (``gunicorn -c python:app.gunicorn_conf 'app:create_app()'``).

- Workers follow the CPUs this container may use (cgroup quota, affinity), 2 per CPU + 1,
  at most 8 (``CAP_API_WORKERS`` overrides), each with ``CAP_API_THREADS`` threads
  (gthread: MongoDB waits do not hold a worker).
- Rollouts: Kubernetes sends SIGTERM and waits ``terminationGracePeriodSeconds`` (Helm:
  45 s) before SIGKILL. gunicorn stops accepting, lets in-flight requests finish for
  ``graceful_timeout`` (30 s, below 45 s so nothing is cut), then exits; with the PDB's
  maxUnavailable 1, the other replicas serve meanwhile. Requests are short (no request
  waits on a CA: issuance runs in workers), so 30 s is ample.
- Access log: one JSON object per line (method, path, status, duration, request id,
  ...), built with json.dumps so a quote in a user agent cannot break the line. The
  request id is the ``X-Request-ID`` the app set on the answer (the caller's or a new
  one); the same id is in the app's own log records and in audit entries.
- TLS-ALPN-01: with ``CAP_TLS_ALPN_PORT`` set, every worker starts the responder
  (``post_worker_init``).
- Prometheus multiprocess mode: metrics of all workers are merged by ``/metrics``.
  ``PROMETHEUS_MULTIPROC_DIR`` must be set before any metric is created, i.e. here, in
  the master, before the app is imported; a fresh directory per start (or the one the
  operator set, emptied at start).
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any


def cpu_limit() -> int:
    """CPUs this process may use: cgroup v2 quota, else affinity, else the count."""
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        count = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            count = min(count, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, count)


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    if not raw:
        return default
    if not raw.isdigit() or int(raw) <= 0:
        raise SystemExit(f"certautopilot: configuration error: {name}={raw!r} is invalid: "
                         "expected a positive integer")
    return int(raw)


bind = os.environ.get("CAP_API_BIND", "127.0.0.1:8000")
workers = _env_int("CAP_API_WORKERS", min(8, cpu_limit() * 2 + 1))
threads = _env_int("CAP_API_THREADS", 4)
worker_class = "gthread"
graceful_timeout = 30
timeout = 60
keepalive = 5
# The longest request line / header gunicorn accepts (its maximum). Longer ones get
# gunicorn's own 414/431 before the app; every documented parameter fits well within.
limit_request_line = 8190
limit_request_field_size = 8190
accesslog = "-"
errorlog = "-"
# Behind a load balancer / ingress: trust X-Forwarded-* from it only.
forwarded_allow_ips = os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1")
logger_class = "app.gunicorn_logging.JsonLogger"

_own_multiproc_dir: str | None = None
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    _own_multiproc_dir = tempfile.mkdtemp(prefix="cap-prometheus-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = _own_multiproc_dir


def on_starting(server: Any) -> None:
    """Start with an empty metrics directory (stale files would add old counts)."""
    directory = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    directory.mkdir(parents=True, exist_ok=True)
    for path in directory.glob("*.db"):
        path.unlink(missing_ok=True)


def post_worker_init(worker: Any) -> None:
    """Each worker also answers TLS-ALPN-01 when CAP_TLS_ALPN_PORT is set (SO_REUSEPORT:
    all workers share the port), after the fork so no MongoDB client crosses it."""
    from app import start_tls_alpn_responder
    from app.config import load_or_exit

    start_tls_alpn_responder(load_or_exit())


def child_exit(server: Any, worker: Any) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server: Any) -> None:
    if _own_multiproc_dir:
        shutil.rmtree(_own_multiproc_dir, ignore_errors=True)
