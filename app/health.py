"""Readiness checks, listed in one place (``CHECKS``): the database, the audit sinks
(never fails: reports ``degraded``) and the KEK (keyring, canaries, no key sealed under a
missing version).

``readiness(db)`` runs each check and returns ``(ready, detail)``; ``/readyz`` and
``certautopilot health`` both use it, so they can never disagree.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from pymongo.database import Database

from app import db as dbm
from app.audit.status import readiness_check as audit_sinks_check
from app.db import Doc
from app.errors import CertAutoPilotError
from app.keys.health import kek_check

# A check returns (ok, detail) and should not raise.
CheckResult = tuple[bool, dict[str, Any]]
Check = Callable[[Database[Doc]], CheckResult]


def _database(db: Database[Doc]) -> CheckResult:
    started = time.monotonic()
    try:
        dbm.ping(db)
    except CertAutoPilotError as exc:
        return False, {"error": exc.message}
    except Exception as exc:  # noqa: BLE001 - a readiness probe reports, never raises
        return False, {"error": f"{exc.__class__.__name__}: {exc}"[:300]}
    return True, {"latency_ms": round((time.monotonic() - started) * 1000, 1)}


CHECKS: dict[str, Check] = {
    "database": _database,
    "audit_sinks": audit_sinks_check,
    "kek": kek_check,
}


def readiness(db: Database[Doc]) -> tuple[bool, dict[str, Any]]:
    detail: dict[str, Any] = {}
    ready = True
    for name, check in CHECKS.items():
        try:
            ok, info = check(db)
        except Exception as exc:  # noqa: BLE001
            ok, info = False, {"error": f"{exc.__class__.__name__}: {exc}"[:300]}
        detail[name] = {"ok": ok, **info}
        ready = ready and ok
    return ready, detail

