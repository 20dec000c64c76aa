"""Readiness checks: the database, plus checks other modules register (the KEK canary).

``readiness(db)`` runs each check and returns ``(ready, detail)``; ``/readyz`` and
``certautopilot health`` both use it, so they can never disagree.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from pymongo.database import Database

from app import db as dbm
from app.errors import CertAutoPilotError

CheckResult = tuple[bool, dict[str, Any]]
Check = Callable[[Database[dict[str, Any]]], CheckResult]

_checks: dict[str, Check] = {}


def register_check(name: str, check: Check) -> None:
    """Add a readiness check; it returns (ok, detail) and should not raise."""
    _checks[name] = check


def _database(db: Database[dict[str, Any]]) -> CheckResult:
    started = time.monotonic()
    try:
        dbm.ping(db)
    except CertAutoPilotError as exc:
        return False, {"error": exc.message}
    except Exception as exc:  # noqa: BLE001 - a readiness probe reports, never raises
        return False, {"error": f"{exc.__class__.__name__}: {exc}"[:300]}
    return True, {"latency_ms": round((time.monotonic() - started) * 1000, 1)}


register_check("database", _database)


def readiness(db: Database[dict[str, Any]]) -> tuple[bool, dict[str, Any]]:
    detail: dict[str, Any] = {}
    ready = True
    for name, check in _checks.items():
        try:
            ok, info = check(db)
        except Exception as exc:  # noqa: BLE001
            ok, info = False, {"error": f"{exc.__class__.__name__}: {exc}"[:300]}
        detail[name] = {"ok": ok, **info}
        ready = ready and ok
    return ready, detail


# Checks other modules register, imported here so every process that asks for readiness
# (/readyz, `certautopilot health`) has them. The cycle is safe: register_check is defined.
import app.audit.status  # noqa: E402,F401
import app.keys.health  # noqa: E402,F401
