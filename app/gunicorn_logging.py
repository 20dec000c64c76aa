"""gunicorn's logger with a JSON-lines access log (``logger_class`` in gunicorn_conf).

Kept apart from ``app/gunicorn_conf.py`` because importing that module configures the
process for gunicorn (it sets PROMETHEUS_MULTIPROC_DIR)."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from typing import Any

from gunicorn import glogging


class JsonLogger(glogging.Logger):
    """gunicorn's logger with a JSON-lines access log."""

    def access(self, resp: Any, req: Any, environ: dict[str, Any], request_time: Any) -> None:
        if not self.access_log_enabled:
            return
        headers = {str(k).lower(): v for k, v in (getattr(resp, "headers", None) or [])}
        status = resp.status.split(None, 1)[0] if isinstance(resp.status, str) \
            else resp.status
        entry = {
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "level": "INFO",
            "logger": "gunicorn.access",
            "remote": environ.get("REMOTE_ADDR", "-"),
            "method": environ.get("REQUEST_METHOD"),
            "path": environ.get("PATH_INFO"),
            "query": environ.get("QUERY_STRING") or None,
            "status": int(status) if str(status).isdigit() else status,
            "bytes": getattr(resp, "sent", None),
            "duration_ms": round(request_time.total_seconds() * 1000, 2),
            "request_id": headers.get("x-request-id"),
            "user_agent": environ.get("HTTP_USER_AGENT"),
            "pid": os.getpid(),
        }
        try:
            self.access_log.info(json.dumps(entry, default=str))
        except Exception:  # noqa: BLE001 - a log line must never fail a request
            self.error("could not write the access log line")
