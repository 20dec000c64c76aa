"""How the audit sinks are doing: the ``audit_sinks`` readiness check and metrics.

A failing SIEM must not take the API out of service (a 503 from every api pod would turn
a SIEM outage into a CertAutoPilot outage), so the check always answers ``ok: true`` and
reports ``degraded: true`` with each sink's status, lag and last error in ``/readyz``'s
detail and in ``certautopilot health``. The metrics (read from MongoDB at scrape time, so
every api replica reports the same) carry the same facts for alerting.

Sink status: ``ok`` (last attempt delivered), ``retrying`` (failing for less than
``FAILING_AFTER_SECONDS``), ``failing`` (longer: needs an operator), ``stalled`` (not
failing, but entries older than ``STALLED_AFTER_SECONDS`` wait: no forwarder runs).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any

from pymongo.database import Database

from app import db as dbm
from app.audit.forward import SINKS
from app.audit.log import CHAIN_ID, oldest_pending, pending_age_seconds
from app.config import ConfigError
from app.config.audit_sinks import SinkSpec, parse_sinks
from app.db import Doc

FAILING_AFTER_SECONDS = 300.0
STALLED_AFTER_SECONDS = 120.0


def _configured() -> tuple[SinkSpec, ...]:
    try:
        return parse_sinks()
    except ConfigError:
        return ()  # the process validated it at start; a changed environment is not ours


def sink_status(db: Database[Doc], sinks: Sequence[SinkSpec] | None = None) -> list[Doc]:
    """One row per configured sink: status, cursor, lag (entries not yet delivered),
    delivered total, last error and since when it fails."""
    sinks = _configured() if sinks is None else sinks
    if not sinks:
        return []
    db = dbm.primary(db)
    head = db[dbm.COUNTERS].find_one({"_id": CHAIN_ID}) or {}
    head_seq = int(head.get("seq", 0))
    states = {d["_id"]: d for d in db[SINKS].find({"_id": {"$in": [s.name for s in sinks]}})}
    now = dbm.server_now(db)
    rows = []
    for spec in sinks:
        state = states.get(spec.name, {})
        cursor = int(state.get("cursor", 0))
        lag = max(0, head_seq - cursor)
        failing_since = state.get("failing_since")
        if isinstance(failing_since, datetime):
            failing_for = (now - failing_since).total_seconds()
            status = "failing" if failing_for >= FAILING_AFTER_SECONDS else "retrying"
        else:
            status = "ok"
            if lag:
                oldest = db[dbm.AUDIT].find_one({"seq": cursor + 1}, {"time": 1}) or {}
                waited = oldest.get("time")
                if isinstance(waited, datetime) and \
                        (now - waited).total_seconds() > STALLED_AFTER_SECONDS:
                    status = "stalled"
        rows.append({
            "name": spec.name, "target": spec.display, "status": status, "cursor": cursor,
            "lag": lag, "delivered": int(state.get("delivered", 0)),
            "consecutive_failures": int(state.get("consecutive_failures") or 0),
            "failing_since": failing_since, "last_error": state.get("last_error"),
            "last_success_at": state.get("last_success_at"),
        })
    return rows


def readiness_check(db: Database[Doc]) -> tuple[bool, Doc]:
    """Registered as ``audit_sinks``: always ok (see the module doc); detail per sink."""
    try:
        rows = sink_status(db)
    except Exception as exc:  # noqa: BLE001 - a probe reports, never raises
        return True, {"degraded": True, "error": f"{exc.__class__.__name__}: {exc}"[:200]}
    detail: Doc = {"degraded": any(r["status"] != "ok" for r in rows), "sinks": {}}
    for row in rows:
        info = {"status": row["status"], "lag": row["lag"]}
        if row["last_error"]:
            info["last_error"] = row["last_error"]
        if row["failing_since"]:
            info["failing_since"] = row["failing_since"].isoformat()
        detail["sinks"][row["name"]] = info
    return True, detail


def audit_metrics(db: Any) -> Iterator[Any]:
    """Scrape-time metrics: chain head, entries waiting for their seal, and per sink: up,
    lag, failures, delivered."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    head = GaugeMetricFamily("certautopilot_audit_head_seq",
                             "Sequence number of the last audit entry (the chain head).")
    row = db[dbm.COUNTERS].find_one({"_id": CHAIN_ID}) or {}
    head.add_metric([], float(row.get("seq", 0)))
    yield head
    pending = GaugeMetricFamily(
        "certautopilot_audit_pending_entries",
        "Audit entries committed and not yet chained (sealed within a moment; a count that "
        "stays up means no seal runs, or entries the sealer refused).")
    oldest = GaugeMetricFamily("certautopilot_audit_oldest_pending_seconds",
                               "Age of the oldest audit entry waiting to be chained (0: none).")
    first = oldest_pending(db)
    pending.add_metric([], float(db[dbm.AUDIT_PENDING].count_documents({})) if first else 0.0)
    oldest.add_metric([], pending_age_seconds(first, dbm.server_now(db)) if first else 0.0)
    yield from (pending, oldest)
    up = GaugeMetricFamily("certautopilot_audit_sink_up",
                           "1 when the sink's last delivery attempt succeeded.",
                           labels=["sink"])
    failing = GaugeMetricFamily(
        "certautopilot_audit_sink_failing",
        "1 when the sink has failed for longer than 5 minutes (needs an operator).",
        labels=["sink"])
    lag = GaugeMetricFamily("certautopilot_audit_sink_lag_entries",
                            "Audit entries not yet delivered to the sink.", labels=["sink"])
    failures = GaugeMetricFamily("certautopilot_audit_sink_consecutive_failures",
                                 "Delivery attempts failed in a row.", labels=["sink"])
    delivered = CounterMetricFamily("certautopilot_audit_sink_delivered",
                                    "Audit entries delivered to the sink (with resends).",
                                    labels=["sink"])
    for sink in sink_status(db):
        name = [sink["name"]]
        up.add_metric(name, 0.0 if sink["consecutive_failures"] else 1.0)
        failing.add_metric(name, 1.0 if sink["status"] == "failing" else 0.0)
        lag.add_metric(name, float(sink["lag"]))
        failures.add_metric(name, float(sink["consecutive_failures"]))
        delivered.add_metric(name, float(sink["delivered"]))
    yield from (up, failing, lag, failures, delivered)

