"""Every job kind of the application and its handler, listed in one place.

``load_handlers`` adds them to the job registry (``app.jobs.registry``) and then imports
the ``CAP_EXTRA_HANDLER_MODULES``; the worker calls it at start (``tasks/worker.py``), as
does any process that runs jobs itself. Nothing registers a kind by being imported.
Add a kind here: its handler, attempts and backoff between attempts (see
``app.jobs.registry.register_handler`` for what each setting means).
"""

from __future__ import annotations

from app.audit import jobs as audit_jobs
from app.domain import drift, issuance, renewal, revocation_check
from app.domain.certificates import ISSUE_JOB_KIND
from app.jobs import handlers as job_handlers
from app.jobs import registry
from app.jobs.registry import HandlerSpec
from app.keys import handlers as key_handlers
from app.keys.rotation import STEP_KIND
from app.metrics_snapshot import SNAPSHOT_KIND
from app.ops import handlers as ops_handlers
from app.ops import snapshot_job
from app.ops.alerts import engine as alerts

HANDLERS: tuple[HandlerSpec, ...] = (
    HandlerSpec("jobs.reap", job_handlers.reap_job, max_attempts=1),
    HandlerSpec(ISSUE_JOB_KIND, issuance.issue_handler, max_attempts=10,
                backoff_base_seconds=15, backoff_max_seconds=1800,
                validate=issuance.validate_issue_payload),
    HandlerSpec(renewal.SCAN_JOB_KIND, renewal.scan_handler, max_attempts=3,
                backoff_base_seconds=5, backoff_max_seconds=30),
    HandlerSpec(revocation_check.JOB_KIND, revocation_check.check_handler, max_attempts=3,
                backoff_base_seconds=60, backoff_max_seconds=600),
    HandlerSpec(STEP_KIND, key_handlers.rotation_step, max_attempts=3),
    HandlerSpec(audit_jobs.KIND, audit_jobs.forward, max_attempts=3,
                backoff_base_seconds=2.0, backoff_max_seconds=10.0),
    HandlerSpec(SNAPSHOT_KIND, snapshot_job.refresh_snapshot, max_attempts=2,
                backoff_base_seconds=5, backoff_max_seconds=30),
    # Drift scans and alerts (app/ops/handlers.py). The timed ones get 5 attempts: a worker
    # killed twice mid-run must not leave a dead job, itself an alert.
    HandlerSpec(drift.SCAN_JOB_KIND, ops_handlers.drift_scan, max_attempts=5,
                backoff_base_seconds=5, backoff_max_seconds=30),
    HandlerSpec(drift.VERIFY_JOB_KIND, ops_handlers.verify_served, max_attempts=5,
                validate=ops_handlers.validate_certificate),
    HandlerSpec(alerts.EVALUATE_JOB_KIND, ops_handlers.evaluate_alerts, max_attempts=5,
                backoff_base_seconds=5, backoff_max_seconds=30),
    HandlerSpec(alerts.DELIVER_JOB_KIND, ops_handlers.deliver_alerts, max_attempts=10,
                validate=ops_handlers.validate_channel),
)


def load_handlers(extra: tuple[str, ...] | list[str] = ()) -> list[str]:
    """Register ``HANDLERS``, then import the ``extra`` modules (which register their own
    kinds); return every kind registered."""
    for spec in HANDLERS:
        registry.add(spec)
    return registry.load_modules(extra)
