"""``certautopilot health``: what an operator checks before sleeping.

The readiness checks of ``/readyz`` (``app.health.CHECKS``: database, KEK, audit sinks)
and, on top, what only makes sense cluster-wide: a scheduler leader holds the lease, at
least one worker heartbeats, the oldest due job is not older than a bound, and every ACME
directory in use answers. Each check returns ``(ok, detail)`` and never raises.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from typing import Any

from pymongo.database import Database

from app import db as dbm
from app.acme.client import AcmeClient
from app.config import Settings
from app.db import Doc
from app.db.schedule import lease_status
from app.health import CHECKS as READINESS_CHECKS
from app.jobs.stats import queue_depth
from app.jobs.workers import list_workers

CheckResult = tuple[bool, dict[str, Any]]
# A worker whose heartbeat is older than this is not counted as live.
WORKER_STALE_SECONDS = 120.0
# A due job waiting longer than this means the workers do not keep up (or none runs).
MAX_QUEUED_AGE_SECONDS = 300.0


def _guarded(check: Callable[[], CheckResult]) -> CheckResult:
    try:
        return check()
    except Exception as exc:  # noqa: BLE001 - a health check reports, never raises
        return False, {"error": f"{exc.__class__.__name__}: {exc}"[:300]}


def scheduler_leader(db: Database[Doc]) -> CheckResult:
    lease = lease_status(db)
    detail = {"state": lease["state"], "holder": lease["holder"], "term": lease["term"],
              "expires_in_s": lease["expires_in_s"]}
    if lease["state"] != "held":
        return False, {**detail, "error": "no scheduler holds the lease: renewals are not "
                                          "being scheduled"}
    return True, detail


def live_workers(db: Database[Doc]) -> CheckResult:
    rows = list_workers(db)
    live = [w for w in rows if w.get("age_seconds") is not None
            and w["age_seconds"] <= WORKER_STALE_SECONDS and w.get("state") != "stopped"]
    detail = {"live": len(live), "seen_last_day": len(rows)}
    if not live:
        return False, {**detail, "error": f"no worker heartbeat in the last "
                                          f"{WORKER_STALE_SECONDS:.0f}s: no job runs"}
    return True, detail


def queue_age(db: Database[Doc], bound: float = MAX_QUEUED_AGE_SECONDS) -> CheckResult:
    depth = queue_depth(db)
    age = float(depth["oldest_queued_age_seconds"])
    detail = {"queued": depth["queued"], "due": depth["due"],
              "oldest_due_age_s": round(age, 1), "bound_s": bound}
    if age > bound:
        return False, {**detail, "error": f"the oldest due job has waited {age:.0f}s "
                                          f"(bound {bound:.0f}s)"}
    return True, detail


def ca_directories(db: Database[Doc], settings: Settings) -> CheckResult:
    urls = {settings.acme_directory_url}
    urls.update(str(u) for u in dbm.retry(
        lambda: db[dbm.ACME_ACCOUNTS].distinct("directory_url", {"status": {"$ne":
                                                                          "deactivated"}}),
        what="list ACME directories") if u)
    bundle = str(settings.acme_ca_bundle) if settings.acme_ca_bundle else None
    detail: dict[str, Any] = {}
    ok = True
    for url in sorted(urls):
        started = time.monotonic()
        client = AcmeClient(url, ca_bundle=bundle, timeout=10)
        try:
            client.directory  # noqa: B018 - fetching it is the check
            detail[url] = {"ok": True,
                           "latency_ms": round((time.monotonic() - started) * 1000, 1)}
        except Exception as exc:  # noqa: BLE001 - reported per directory
            ok = False
            detail[url] = {"ok": False, "error": f"{exc.__class__.__name__}: {exc}"[:200]}
        finally:
            client.close()
    result: dict[str, Any] = {"directories": detail}
    if not ok:
        result["error"] = "unreachable: " + ", ".join(u for u, d in detail.items()
                                                      if not d["ok"])
    return ok, result


def operator_health(db: Database[Doc], settings: Settings, *,
                    max_queued_age: float = MAX_QUEUED_AGE_SECONDS
                    ) -> tuple[bool, dict[str, Any]]:
    """Every check, in order: ``(all ok, {name: {ok, ...}})``."""
    checks: dict[str, Callable[[], CheckResult]] = {
        name: partial(check, db) for name, check in READINESS_CHECKS.items()}
    checks.update({
        "scheduler_leader": lambda: scheduler_leader(db),
        "workers": lambda: live_workers(db),
        "queue_age": lambda: queue_age(db, max_queued_age),
        "ca_directories": lambda: ca_directories(db, settings),
    })
    detail: dict[str, Any] = {}
    healthy = True
    for name, check in checks.items():
        ok, info = _guarded(check)
        detail[name] = {"ok": ok, **info}
        healthy = healthy and ok
    return healthy, detail
