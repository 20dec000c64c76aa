"""Job handlers of drift scans and alerts (listed, with their attempts, in app/handlers.py).

- ``certificates.drift_scan`` (leader, every 60 s): probe the endpoints that are due.
- ``certificates.verify_served`` (after a renewal): one verification attempt; another
  after ``CAP_DRIFT_VERIFY_DELAY_SECONDS`` while endpoints lag (``RetryLater``).
- ``alerts.evaluate`` (leader, every 30 s): open and resolve alerts, wake deliveries.
- ``alerts.deliver`` (one active per channel): send its messages in order; a channel that
  is down is retried with backoff (``RetryLater``: no attempt spent, nothing lost).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pymongo.client_session import ClientSession

from app.domain import drift
from app.jobs import JobContext, RetryLater
from app.ops.alerts import engine


def _run_txn(ctx: JobContext) -> Callable[[Callable[[ClientSession], Any]], Any]:
    return lambda fn: ctx.transaction(fn)


def drift_scan(ctx: JobContext) -> dict[str, Any]:
    """Probe the endpoints whose next scan has come."""
    return drift.scan_due(ctx.db, settings=ctx.settings, check_lease=ctx.check_lease,
                          budget_seconds=max(5.0, ctx.lease_seconds * 0.6))


def validate_certificate(payload: dict[str, Any]) -> None:
    value = payload.get("certificate_id")
    if not isinstance(value, str) or not value or len(value) > 100:
        raise ValueError("certificate_id must be a certificate id")


def verify_served(ctx: JobContext) -> dict[str, Any]:
    """Check that every endpoint serves the certificate's latest renewal."""
    outcome = drift.verify(ctx.db, ctx.payload["certificate_id"], settings=ctx.settings,
                           run_txn=_run_txn(ctx), check_lease=ctx.check_lease)
    if outcome["outcome"] == "retry":
        raise RetryLater(float(outcome["delay"]),
                         f"attempt {outcome['attempts']}: {len(outcome['failing'])} "
                         "endpoint(s) do not serve the new certificate yet")
    return outcome


def evaluate_alerts(ctx: JobContext) -> dict[str, Any]:
    """Open and resolve alerts; wake the channels with messages waiting."""
    return engine.evaluate(ctx.db, settings=ctx.settings, check_lease=ctx.check_lease)


def validate_channel(payload: dict[str, Any]) -> None:
    value = payload.get("channel_id")
    if not isinstance(value, str) or not value.startswith("chn_"):
        raise ValueError("channel_id must be an alert channel id")


def deliver_alerts(ctx: JobContext) -> dict[str, Any]:
    """Send a channel's waiting alert messages, in order."""
    try:
        return engine.deliver(ctx.db, ctx.payload["channel_id"], settings=ctx.settings,
                              run_txn=_run_txn(ctx), check_lease=ctx.check_lease)
    except engine.RetryChannel as exc:
        raise RetryLater(exc.delay, exc.reason) from None
