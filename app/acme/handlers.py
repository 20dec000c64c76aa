"""Job handlers of certificate issuance and the renewal scan.

- ``certificates.issue`` (payload ``{certificate_id, reason}``, dedupe key per
  certificate): runs ``app.acme.issuance.run_issuance`` under the job's lease. Outcomes:
  issued (the job completes in the same transaction that stores the certificate);
  ``rateLimited`` or any ``Retry-After`` → ``RetryLater`` at that time; a failed
  validation or refused request → recorded on the certificate with the CA's problem and
  backed off (1 h → 32 h), the job fails permanently with the problem as its error; a
  missing KEK → ``RetryLater``; anything else (CA unreachable, timeouts, 5xx) → the job's
  own retry with backoff.
- ``certificates.renewal_scan`` (every 60 s from the scheduler leader): enqueues an
  issuance for each certificate whose ``next_renewal_at`` has come, in batches.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

from pymongo.client_session import ClientSession

from app import audit
from app.acme.errors import AcmeProblem, Decision, classify
from app.acme.issuance import AccountReset, IssuanceFailed, run_issuance
from app.domain import certificates
from app.domain.accounts import AccountNotRegistrable
from app.jobs import JobContext, PermanentFailure, RetryLater, register_handler
from app.keys import KeyUnavailable

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_RATE_LIMIT_DELAY = 3600.0
REASONS = ("initial", "renewal", "manual", "reissue")


class _JobFence:
    """The job context as the issuance's fence (lease check, fenced transactions)."""

    def __init__(self, ctx: JobContext) -> None:
        self.ctx = ctx

    @property
    def job_id(self) -> str | None:
        return self.ctx.job_id

    @property
    def lease_token(self) -> str | None:
        return self.ctx.lease_token

    def check_lease(self) -> None:
        self.ctx.check_lease()

    def transaction(self, fn: Callable[[ClientSession], T], *, complete: bool = False) -> T:
        return self.ctx.transaction(fn, complete=complete)


def _validate_issue(payload: dict[str, Any]) -> None:
    certificate_id = payload.get("certificate_id")
    if not isinstance(certificate_id, str) or not certificate_id or len(certificate_id) > 100:
        raise ValueError("certificate_id must be a certificate id")
    if payload.get("reason", "manual") not in REASONS:
        raise ValueError(f"reason must be one of {', '.join(REASONS)}")


@register_handler(certificates.ISSUE_JOB_KIND, max_attempts=10, backoff_base_seconds=15,
                  backoff_max_seconds=1800, validate=_validate_issue)
def issue_certificate(ctx: JobContext) -> dict[str, Any] | None:
    """Issue or renew one certificate, resuming this job's order if it has one."""
    payload = ctx.payload
    try:
        return run_issuance(ctx.db, _JobFence(ctx), payload["certificate_id"],
                            reason=str(payload.get("reason", "manual")),
                            settings=ctx.settings, actor=audit.system_actor("worker"))
    except IssuanceFailed as exc:
        raise PermanentFailure(str(exc)) from None
    except AccountReset as exc:
        raise RetryLater(1, str(exc)) from None
    except AccountNotRegistrable as exc:
        raise PermanentFailure(str(exc)) from None
    except KeyUnavailable as exc:
        raise RetryLater(exc.retry_after or 30, f"key unavailable: {exc}") from None
    except AcmeProblem as problem:
        if classify(problem) is Decision.RETRY_AFTER:
            delay = problem.retry_after if problem.retry_after is not None else \
                DEFAULT_RATE_LIMIT_DELAY
            raise RetryLater(max(1.0, delay), str(problem)) from None
        raise


@register_handler(certificates.SCAN_JOB_KIND, max_attempts=3, backoff_base_seconds=5,
                  backoff_max_seconds=30)
def renewal_scan(ctx: JobContext) -> dict[str, Any] | None:
    """Enqueue due renewals (dedupe key per certificate), in batches."""
    # One scan at a time. Each slot is its own job, so on a loaded database a slow scan
    # overlaps the next slots' scans; they then fight over the same due certificates
    # (WriteConflict on every batch, leases lapsing) and held every worker in the HA
    # drills. A skipped slot is harmless: the running scan enqueues what is due.
    if _another_scan_running(ctx):
        return {"enqueued": 0, "batches": 0, "skipped": "another renewal scan is running"}
    return certificates.renewal_scan(ctx.db, fence=_JobFence(ctx))


def _another_scan_running(ctx: JobContext) -> bool:
    from app import db as dbm

    return ctx.db[dbm.JOBS].count_documents({
        "kind": certificates.SCAN_JOB_KIND, "state": "running", "_id": {"$ne": ctx.job_id},
        "lease.expires_at": {"$gt": dbm.server_now(ctx.db)}}, limit=1) > 0
