"""Renewal policy: when a certificate renews, and the scan that starts its renewal.

When, after each issuance (``schedule_after_issue``):

- ``renewal.renew_before_days`` set: that many days before expiry (``override_renewal_time``);
- else the CA's ARI window (RFC 9773) when its directory offers ``renewalInfo`` and
  ``renewal.use_ari`` is on: a uniformly random point inside the window, asked again
  after the CA's ``Retry-After`` (``decide_ari``);
- else 2/3 of the lifetime (1/2 when the lifetime is under 10 days), with jitter
  (``default_renewal_time``).

A scheduled renewal asks renewalInfo again before ordering (``ari_postpones``): when the
window moved later, the renewal is rescheduled instead. After a failed attempt the next
waits ``CAP_RENEWAL_BACKOFF_SECONDS * 2^(failures-1)``, capped at
``CAP_RENEWAL_BACKOFF_MAX_SECONDS`` (1 h → 32 h; ``backoff_delay``).

The ``certificates.renewal_scan`` job (every 60 s from the scheduler leader,
``scan_handler``) enqueues an issuance for each certificate whose ``next_renewal_at`` has
come (``renewal_scan``).
"""

from __future__ import annotations

import datetime as dt
import logging
import random
from dataclasses import dataclass
from typing import Any

from pymongo.client_session import ClientSession
from pymongo.database import Database

from app import audit, jobs
from app import db as dbm
from app.acme import ari
from app.acme.client import AcmeClient
from app.acme.errors import AcmeError
from app.config import Settings
from app.db import Doc
from app.domain import certificates
from app.domain.certificates import STATUS_FAILED, STATUS_PENDING

log = logging.getLogger(__name__)

SCAN_JOB_KIND = "certificates.renewal_scan"

SHORT_LIFETIME = dt.timedelta(days=10)
# A due certificate whose newest issuance job was created when it was already due and
# ended without success or a recorded failure (either sets the real next time: a job
# that died) is not enqueued again until this long after that job, so a job that dies
# does not make the scan re-enqueue every minute. A due time set after that job (a
# revocation, a changed spec) enqueues at once.
SCAN_GUARD = dt.timedelta(hours=1)
SCAN_BATCH = 50
# Due certificates one scan reads at most (most overdue first). More than this many all
# in hand at once means that many renewals wait for workers: the rest follow as they end.
SCAN_READ_LIMIT = 20_000
# ARI: a renewal time this close counts as due now.
ARI_DUE_SLACK = dt.timedelta(minutes=1)
# When to ask renewalInfo again: the CA's Retry-After, clamped; six hours when absent.
DEFAULT_RETRY_AFTER = dt.timedelta(hours=6)
MIN_RETRY_AFTER = dt.timedelta(minutes=1)
MAX_RETRY_AFTER = dt.timedelta(days=1)


# ------------------------------------------------------------------ when
def default_renewal_time(not_before: dt.datetime, not_after: dt.datetime,
                         rng: random.Random | None = None) -> dt.datetime:
    """2/3 of the lifetime (1/2 under 10 days), ± jitter of up to 1/30 of the lifetime
    (at most 12 h), so certificates issued together do not all renew together."""
    rng = rng or random.Random()
    lifetime = not_after - not_before
    fraction = 0.5 if lifetime < SHORT_LIFETIME else 2 / 3
    jitter = min(lifetime / 30, dt.timedelta(hours=12)).total_seconds()
    return not_before + lifetime * fraction + dt.timedelta(seconds=rng.uniform(-jitter, jitter))


def override_renewal_time(not_after: dt.datetime, renew_before_days: float,
                          rng: random.Random | None = None) -> dt.datetime:
    """``renew_before_days`` before expiry, up to 1 % of that span earlier (jitter)."""
    rng = rng or random.Random()
    before = dt.timedelta(days=renew_before_days)
    return not_after - before - before * rng.uniform(0, 0.01)


def backoff_delay(failures: int, settings: Settings) -> dt.timedelta:
    """Wait after the n-th consecutive failed attempt (1 h, 2 h, 4 h ... 32 h)."""
    exponent = max(0, failures - 1)
    seconds = settings.renewal_backoff_seconds * (2 ** min(exponent, 30))
    return dt.timedelta(seconds=min(seconds, settings.renewal_backoff_max_seconds))


@dataclass(frozen=True)
class AriDecision:
    renew_at: dt.datetime
    next_check_at: dt.datetime
    window: ari.RenewalWindow

    @property
    def next_renewal_at(self) -> dt.datetime:
        """When the scan should look at the certificate again: at the renewal time, or
        earlier to ask the CA whether the window moved."""
        return min(self.renew_at, self.next_check_at)

    def as_doc(self, checked_at: dt.datetime) -> dict[str, Any]:
        return {"window_start": self.window.start, "window_end": self.window.end,
                "explanation_url": self.window.explanation_url,
                "renew_at": self.renew_at, "next_check_at": self.next_check_at,
                "checked_at": checked_at}


def next_ari_check(now: dt.datetime, retry_after_seconds: float | None) -> dt.datetime:
    if retry_after_seconds is None:
        delay = DEFAULT_RETRY_AFTER
    else:
        delay = min(MAX_RETRY_AFTER, max(MIN_RETRY_AFTER,
                                         dt.timedelta(seconds=retry_after_seconds)))
    return now + delay


def decide_ari(body: dict[str, Any], retry_after_seconds: float | None, now: dt.datetime,
               rng: random.Random | None = None) -> AriDecision:
    """When to renew, and when to look at renewalInfo again."""
    rng = rng or random.Random()
    window = ari.parse_renewal_info(body)
    # RFC 9773 section 4.2: a uniformly random time inside the window; if that time has
    # passed already, renew at once.
    span = (window.end - window.start).total_seconds()
    renew_at = max(now, window.start + dt.timedelta(seconds=rng.uniform(0, span)))
    return AriDecision(renew_at, next_ari_check(now, retry_after_seconds), window)


def _ari_decision(client: AcmeClient, ari_cert_id: str, now: dt.datetime) -> AriDecision:
    body, retry_after = client.renewal_info(ari_cert_id)
    return decide_ari(body, retry_after, now)


def ari_postpones(cert: Doc, client: AcmeClient, now: dt.datetime) -> AriDecision | None:
    """Before a scheduled renewal orders: the CA's current window when it says to renew
    later than now; None to renew now (no ARI, ARI off, or renewalInfo unavailable)."""
    renewal = cert.get("renewal") or {}
    if not (cert.get("certificate_pem") and cert.get("ari_cert_id")
            and renewal.get("use_ari", True) and client.has_renewal_info()):
        return None
    try:
        decision = _ari_decision(client, cert["ari_cert_id"], now)
    except AcmeError as exc:
        log.warning("renewalInfo unavailable; renewing as scheduled",
                    extra={"certificate_id": cert["_id"], "error": str(exc)[:200]})
        return None
    if decision.renew_at <= now + ARI_DUE_SLACK:
        return None
    return decision


def record_postponement(db: Database[Doc], session: ClientSession, cert: Doc,
                        decision: AriDecision, now: dt.datetime, actor: audit.Actor) -> None:
    """Store the later renewal time ARI gave (audited), in the caller's transaction."""
    next_at = decision.next_renewal_at
    certificates.store_schedule(db, session, cert["_id"], {
        "ari": decision.as_doc(now), "next_renewal_at": next_at, "renewal_source": "ari",
        "updated_at": now})
    audit.record(db, session, actor=actor, action="certificate.renewal_rescheduled",
                 target=f"certificate:{cert['_id']}", project_id=cert["project_id"],
                 details={"source": "ari", "next_renewal_at": next_at,
                          "window_start": decision.window.start,
                          "window_end": decision.window.end})


def schedule_after_issue(cert: Doc, issued: Doc, client: AcmeClient,
                         now: dt.datetime) -> Doc:
    """The renewal fields to store with a newly issued certificate: ``ari_cert_id``,
    ``ari``, ``next_renewal_at`` and ``renewal_source`` (override, ari or lifetime)."""
    renewal = cert.get("renewal") or {}
    ari_cert_id = None
    try:
        ari_cert_id = ari.cert_id_from_pem(issued["certificate_pem"])
    except AcmeError:
        ari_cert_id = None
    schedule: Doc = {"ari_cert_id": ari_cert_id, "ari": None}
    if renewal.get("renew_before_days"):
        schedule["next_renewal_at"] = override_renewal_time(
            issued["not_after"], float(renewal["renew_before_days"]))
        schedule["renewal_source"] = "override"
        return schedule
    if renewal.get("use_ari", True) and ari_cert_id:
        try:
            if client.has_renewal_info():
                decision = _ari_decision(client, ari_cert_id, now)
                schedule["ari"] = decision.as_doc(now)
                schedule["next_renewal_at"] = decision.next_renewal_at
                schedule["renewal_source"] = "ari"
                return schedule
        except AcmeError as exc:
            log.warning("renewalInfo unavailable after issuance; using the lifetime",
                        extra={"certificate_id": cert["_id"], "error": str(exc)[:200]})
    schedule["next_renewal_at"] = default_renewal_time(issued["not_before"],
                                                       issued["not_after"])
    schedule["renewal_source"] = "lifetime"
    return schedule


# ------------------------------------------------------------------ the scan
def in_hand(cert: Doc, key_jobs: jobs.KeyJobs | None, now: dt.datetime) -> bool:
    """Whether a due certificate's renewal is already in hand: an issuance job of it is
    queued or running, or the newest one was made for this due time (created at or
    after ``next_renewal_at``) less than ``SCAN_GUARD`` ago and ended without success
    (dead or cancelled: had it recorded a failure, ``next_renewal_at`` would have moved
    past its creation). A certificate still due after a successful job was made due
    again (by hand, a revocation): never held."""
    if key_jobs is None:
        return False
    if key_jobs.active:
        return True
    made = key_jobs.last_created_at
    return (made is not None and key_jobs.last_state != "succeeded"
            and made >= cert["next_renewal_at"] and now - made < SCAN_GUARD)


def renewal_scan(db: Database[Doc], *, batch_size: int = SCAN_BATCH,
                 max_batches: int = 50, fence: jobs.JobContext | None = None) -> Doc:
    """Enqueue an issuance job for every certificate whose ``next_renewal_at`` has come
    and whose renewal is not already in hand (``in_hand``; dedupe key per certificate),
    at most ``max_batches`` transactions of ``batch_size`` (fenced by the scan job's
    lease when run as one).

    The scan writes nothing but the jobs: it reads the due certificates (on the
    ``next_renewal_at`` index) and their issuance jobs (on the ``dedupe_key`` index),
    and in each batch's transaction reads both again and inserts the jobs. It used to
    move each batch's ``next_renewal_at`` forward as the guard against re-enqueueing;
    on the embedded server that rewrote every index entry of every due certificate
    (15 indexes), more than half the scan's time, and made the batches conflict with
    every write to those certificates.

    Enqueueing is internal scheduling, like the leader's timed work: it writes no audit
    entry (the jobs record what was enqueued, and each issuance it leads to is audited).
    Keeping the batch transactions free of the audit chain's head also keeps them from
    conflicting with every issuance that commits meanwhile."""
    now = dbm.server_now(db)
    due = certificates.due_for_renewal(db, now, SCAN_READ_LIMIT)
    enqueued = batches = handled = 0
    for start in range(0, len(due), batch_size):
        if batches >= max_batches:
            break
        chunk = due[start:start + batch_size]
        known = jobs.jobs_by_dedupe_key(
            db, [certificates.dedupe_key(cert["_id"]) for cert in chunk])
        todo = [cert["_id"] for cert in chunk
                if not in_hand(cert, known.get(certificates.dedupe_key(cert["_id"])), now)]
        handled += len(chunk) - len(todo)
        if not todo:
            continue

        def enqueue_batch(session: ClientSession, todo: list[str] = todo) -> list[str]:
            # Decided again in the transaction's snapshot, three commands whatever the
            # batch's size: the certificates still due, their jobs, the new jobs. A
            # concurrent enqueue of the same key aborts the transaction (unique index),
            # which is retried.
            fresh = certificates.still_due(db, session, todo, now)
            held = jobs.jobs_by_dedupe_key(
                db, [certificates.dedupe_key(cert["_id"]) for cert in fresh], session=session)
            created = jobs.enqueue_many(db, certificates.ISSUE_JOB_KIND, [
                ({"certificate_id": cert["_id"],
                  "reason": "initial" if cert.get("status") in (STATUS_PENDING, STATUS_FAILED)
                  else "renewal"}, certificates.dedupe_key(cert["_id"]), cert.get("project_id"))
                for cert in fresh
                if not in_hand(cert, held.get(certificates.dedupe_key(cert["_id"])), now)],
                session=session)
            return [str(job["_id"]) for job in created]

        if fence is not None:
            job_ids = fence.transaction(enqueue_batch)
        else:
            job_ids = dbm.transaction(db, enqueue_batch, what="enqueue renewals")
        # After the commit, in one broker write (one message per job was most of the scan's
        # time); a wake-up lost here is re-published by the reaper.
        jobs.publish_wakeups(job_ids)
        enqueued += len(job_ids)
        batches += 1
    return {"enqueued": enqueued, "batches": batches, "in_hand": handled}


def scan_handler(ctx: jobs.JobContext) -> dict[str, Any] | None:
    """The ``certificates.renewal_scan`` job: enqueue due renewals (dedupe key per
    certificate), in batches.

    One scan at a time. Each slot is its own job, so on a loaded database a slow scan
    overlaps the next slots' scans; they then fight over the same due certificates
    (WriteConflict on every batch, leases lapsing) and held every worker in the HA drills.
    A skipped slot is harmless: the running scan enqueues what is due."""
    if jobs.running_under_live_lease(ctx.db, SCAN_JOB_KIND, exclude_id=ctx.job_id):
        return {"enqueued": 0, "batches": 0, "skipped": "another renewal scan is running"}
    return renewal_scan(ctx.db, fence=ctx)
