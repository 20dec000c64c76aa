"""The one registration point for time-driven work.

Each ``TimedWork`` makes the scheduler leader enqueue a job of ``kind`` every
``every_seconds`` (dedupe key ``"<name>@<slot>"``, fenced by the lease term). The job's
handler lives in ``app/`` and is listed in ``app/handlers.py`` (``HANDLERS``).
To add timed work: append one ``TimedWork`` line below.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class TimedWork:
    name: str
    every_seconds: float
    kind: str
    payload: dict[str, Any] = field(default_factory=dict)


TIMED_WORK: list[TimedWork] = [
    # Enqueue an issuance for every certificate whose next_renewal_at has come.
    TimedWork("certificates.renewal_scan", 60, "certificates.renewal_scan"),
    # Ask each current certificate's OCSP responder whether its CA revoked it; renew the
    # revoked ones at once (app.domain.revocation_check).
    TimedWork("certificates.revocation_check", 86400, "certificates.revocation_check"),
    # Re-claim jobs whose lease lapsed, re-publish queued jobs whose message was lost.
    TimedWork("jobs.reap", 15, "jobs.reap"),
    # Re-wrap the next batches of DEKs of a running KEK rotation (idle otherwise).
    TimedWork("kek.rotation_step", 10, "kek.rotation_step"),
    # Forward new audit entries to the CAP_AUDIT_SINKS (SIEM): at least once, in order.
    TimedWork("audit.forward", 10, "audit.forward"),
    # Rebuild the fleet-metrics snapshot every api replica serves (app/metrics_snapshot.py).
    TimedWork("metrics.snapshot", 60, "metrics.snapshot"),
    # Probe the endpoints due for a drift scan (each once per CAP_DRIFT_SCAN_INTERVAL_SECONDS).
    TimedWork("certificates.drift_scan", 60, "certificates.drift_scan"),
    # Open and resolve alerts, wake the delivery of channels with messages waiting.
    TimedWork("alerts.evaluate", 30, "alerts.evaluate"),
]
