"""Managed certificates (the ``certificates`` collection): the document and its changes.

A certificate document is a spec (``app.domain.certspec``) plus the certificate currently
issued for it (``app.domain.issued``: leaf, chain and full chain PEM, serial, validity,
SHA-256 fingerprint, issuer, the sealed key's id, the order it came from) and
``next_renewal_at`` (indexed), the time the leader's renewal scan enqueues its next
issuance (``app.domain.renewal`` decides it).

Every mutation writes one audit entry in its transaction. Private keys never appear here:
only ``key_id``, a reference to the sealed record in ``keys``. The issuance
(``app.domain.issuance``) stores its results through the ``store_*`` functions below,
inside its own fenced transactions.
"""

from __future__ import annotations

import secrets
from datetime import datetime
from typing import Any

from pymongo.client_session import ClientSession
from pymongo.database import Database

from app import audit
from app import db as dbm
from app.config import Settings
from app.db import Doc
from app.domain import accounts, ca_fallback, drift
from app.domain.certspec import SPEC_FIELDS, validate_spec
from app.domain.projects import now_ms
from app.errors import Conflict, NotFound, PreconditionFailed, ValidationFailed

ISSUE_JOB_KIND = "certificates.issue"
# "renewal" is the scheduled one (the scan): it asks the CA's ARI window first and may be
# postponed. "renew_now" is an operator's (API/CLI): a new certificate now, no ARI gate.
# "emergency": a bulk or emergency renewal (app.domain.renewal_batches), also of a
# certificate the CA revoked.
ISSUE_REASONS = ("initial", "renewal", "renew_now", "manual", "reissue", "emergency")

STATUS_PENDING = "pending"    # never issued yet
STATUS_ISSUED = "issued"      # a certificate is stored (a renewal may be in flight)
STATUS_FAILED = "failed"      # never issued; the last attempt failed
STATUS_REVOKED = "revoked"
STATUS_DELETED = "deleted"


def dedupe_key(certificate_id: str) -> str:
    """One active issuance job per certificate."""
    return f"certificate:{certificate_id}:issue"



def _require_project(db: Database[Doc], project_id: str) -> None:
    if not isinstance(project_id, str) or not project_id:
        raise ValidationFailed("project_id is required")
    found = dbm.retry(lambda: db[dbm.PROJECTS].find_one({"_id": project_id}, {"_id": 1}),
                      what="read project")
    if found is None:
        raise NotFound(f"project {project_id:.64} not found")


def _resolve_account(db: Database[Doc], project_id: str, account_id: str | None) -> Doc:
    if account_id is not None:
        try:
            return accounts.get_account(db, account_id, project_id=project_id)
        except NotFound:
            raise ValidationFailed(f"ACME account {account_id:.64} does not exist in this "
                                   "project", errors={"account_id": ["unknown account"]}
                                   ) from None
    candidates = accounts.list_accounts(db, project_id)
    if len(candidates) != 1:
        raise ValidationFailed("account_id is required (the project has "
                               f"{len(candidates)} ACME accounts)",
                               errors={"account_id": ["required"]})
    return candidates[0]


# ------------------------------------------------------------------ CRUD
def public_view(doc: Doc) -> Doc:
    """The certificate as shown to users: every field but the internal ones."""
    view = {k: v for k, v in doc.items() if k not in ("_id",)}
    view["id"] = doc["_id"]
    return view


def create_certificate(db: Database[Doc], project_id: str, spec: Any, actor: audit.Actor, *,
                       settings: Settings | None = None, request_key: str | None = None
                       ) -> Doc:
    """Validate and store a managed certificate; it is due for issuance at once (the
    renewal scan or ``request_issuance`` enqueues it). ``request_key`` (an API request's
    idempotency reservation) is stored on it for ``made_under``."""
    fields = validate_spec(spec)
    _require_project(db, project_id)
    account = _resolve_account(db, project_id, fields["account_id"])
    fields["account_id"] = account["_id"]
    fields["directory_url"] = account["directory_url"]
    fields["ca_fallback"] = ca_fallback.resolve_list(db, project_id, account["_id"],
                                                     fields["ca_fallback"])
    now = now_ms()
    doc: Doc = {
        "_id": "crt_" + secrets.token_hex(8), "project_id": project_id, **fields,
        "status": STATUS_PENDING, "version": 1, "created_at": now, "updated_at": now,
        "deleted_at": None, "next_renewal_at": now, "renewal_source": "initial",
        "serial": None, "not_before": None, "not_after": None, "fingerprint_sha256": None,
        "issuer": None, "key_id": None, "certificate_pem": None, "chain_pem": None,
        "fullchain_pem": None, "order_id": None, "issued_at": None, "ari_cert_id": None,
        "ari": None, "failure": None, "issue_count": 0,
    }
    if request_key is not None:
        doc["request_key"] = request_key

    def insert(session: ClientSession) -> None:
        db[dbm.CERTIFICATES].insert_one(doc, session=session)
        drift.sync_endpoints(db, session, doc["_id"], project_id, fields["endpoints"])
        audit.record(db, session, actor=actor, action="certificate.create",
                     target=f"certificate:{doc['_id']}", project_id=project_id,
                     details={"names": fields["names"], "key_type": fields["key_type"],
                              "challenge": fields["challenge"]["type"],
                              "account_id": account["_id"], "profile": fields["profile"]})

    dbm.transaction(db, insert, what="create certificate")
    return doc


def made_under(db: Database[Doc], project_id: str, spec: Any, request_key: str) -> Doc | None:
    """The certificate of ``project_id`` for ``spec``'s names that a request with this
    idempotency reservation already created (a retry that took over the key of a request
    whose process died after its commit), or None. One read on the project-names index."""
    fields = validate_spec(spec)
    return dbm.retry(lambda: dbm.primary(db)[dbm.CERTIFICATES].find_one({
        "project_id": project_id, "names": fields["names"][0], "request_key": request_key,
        "deleted_at": None}), what="read certificate")


def get_certificate(db: Database[Doc], certificate_id: str, *, project_id: str | None = None,
                    include_deleted: bool = False) -> Doc:
    query: Doc = {"_id": certificate_id}
    if project_id is not None:
        query["project_id"] = project_id
    if not include_deleted:
        query["deleted_at"] = None
    doc = dbm.retry(lambda: dbm.primary(db)[dbm.CERTIFICATES].find_one(query),
                    what="read certificate")
    if doc is None:
        raise NotFound(f"certificate {certificate_id!s:.64} not found")
    return doc


def list_certificates(db: Database[Doc], project_id: str | None, *,
                      status: str | None = None, name: str | None = None,
                      expiring_before: datetime | None = None, limit: int = 100,
                      skip: int = 0) -> list[Doc]:
    """Managed certificates in creation order; ``project_id=None``: every project."""
    query: Doc = {"deleted_at": None}
    if project_id is not None:
        query["project_id"] = project_id
    if status is not None:
        query["status"] = status
    if name is not None:
        query["names"] = name
    if expiring_before is not None:
        query["not_after"] = {"$lt": expiring_before}
    return dbm.retry(lambda: list(db[dbm.CERTIFICATES].find(
        query, sort=[("created_at", 1), ("_id", 1)], skip=max(0, skip),
        limit=max(1, min(limit, 1000)))), what="list certificates")


def export_private_key(db: Database[Doc], certificate_id: str, actor: audit.Actor, *,
                       project_id: str | None = None) -> bytes:
    """The certificate's private key (PKCS#8 PEM), audited as
    ``certificate.private_key_export``: the one path the API and the CLI export by."""
    from app.keys import open_private_key

    doc = get_certificate(db, certificate_id, project_id=project_id)
    key_id = doc.get("key_id")
    if not key_id:
        raise Conflict(f"certificate {certificate_id} has no private key yet")
    pem = open_private_key(db, key_id, project_id=doc["project_id"])

    def record(session: ClientSession) -> None:
        audit.record(db, session, actor=actor, action="certificate.private_key_export",
                     target=f"certificate:{certificate_id}", project_id=doc["project_id"],
                     details={"key_id": key_id, "serial": doc.get("serial")})

    dbm.transaction(db, record, what="audit private key export")
    return pem


def update_certificate(db: Database[Doc], certificate_id: str, changes: Any,
                       actor: audit.Actor, *, project_id: str | None = None,
                       expected_version: int | None = None) -> Doc:
    """Change the spec. A change of names, key type, challenge, account or profile makes
    the certificate due for re-issuance at once."""
    current = get_certificate(db, certificate_id, project_id=project_id)
    if expected_version is not None and current.get("version") != expected_version:
        raise PreconditionFailed(f"certificate {certificate_id} is at version "
                                 f"{current.get('version')}, not {expected_version}")
    if not isinstance(changes, dict) or not changes:
        raise ValidationFailed("nothing to change")
    spec_now = {k: current.get(k) for k in SPEC_FIELDS}
    fields = validate_spec(changes, current=spec_now)
    account = _resolve_account(db, current["project_id"], fields["account_id"])
    fields["account_id"] = account["_id"]
    fields["directory_url"] = account["directory_url"]
    fields["ca_fallback"] = ca_fallback.resolve_list(db, current["project_id"],
                                                     account["_id"], fields["ca_fallback"])
    reissue_fields = ("names", "key_type", "challenge", "account_id", "profile")
    needs_reissue = any(fields[k] != current.get(k) for k in reissue_fields)
    now = now_ms()
    updates: Doc = {**fields, "updated_at": now}
    if needs_reissue and current.get("status") != STATUS_REVOKED:
        updates["next_renewal_at"] = now
        updates["renewal_source"] = "spec_changed"
    changed = {k: fields[k] for k in fields if fields[k] != current.get(k)}

    def save(session: ClientSession) -> None:
        result = db[dbm.CERTIFICATES].update_one(
            {"_id": certificate_id, "version": current["version"], "deleted_at": None},
            {"$set": updates, "$inc": {"version": 1}}, session=session)
        if not result.matched_count:
            raise Conflict(f"certificate {certificate_id} changed meanwhile; retry")
        drift.sync_endpoints(db, session, certificate_id, current["project_id"],
                             fields["endpoints"])
        audit.record(db, session, actor=actor, action="certificate.update",
                     target=f"certificate:{certificate_id}", project_id=current["project_id"],
                     details={"changed": sorted(changed), "reissue": needs_reissue})

    dbm.transaction(db, save, what="update certificate")
    current.update(updates)
    current["version"] += 1
    return current


def delete_certificate(db: Database[Doc], certificate_id: str, actor: audit.Actor, *,
                       project_id: str | None = None) -> None:
    """Stop managing a certificate (soft delete: it leaves lists, scans and metrics; its
    orders and sealed keys stay for the record)."""
    current = get_certificate(db, certificate_id, project_id=project_id)
    now = now_ms()

    def save(session: ClientSession) -> None:
        result = db[dbm.CERTIFICATES].update_one(
            {"_id": certificate_id, "deleted_at": None},
            {"$set": {"deleted_at": now, "status": STATUS_DELETED, "next_renewal_at": None,
                      "updated_at": now}, "$inc": {"version": 1}}, session=session)
        if not result.matched_count:
            raise NotFound(f"certificate {certificate_id} not found")
        drift.sync_endpoints(db, session, certificate_id, current["project_id"], [])
        audit.record(db, session, actor=actor, action="certificate.delete",
                     target=f"certificate:{certificate_id}", project_id=current["project_id"],
                     details={"names": current.get("names")})

    dbm.transaction(db, save, what="delete certificate")


def request_issuance(db: Database[Doc], certificate_id: str, actor: audit.Actor,
                     reason: str = "manual", *, project_id: str | None = None,
                     request_key: str | None = None) -> Doc:
    """Enqueue an issuance (or renewal) job now; returns the job document (the active one
    when an issuance is already queued or running for this certificate). ``request_key``
    (an API request's idempotency reservation) is stored with the job for
    ``job_made_under``."""
    from app.jobs import enqueue, publish_wakeup

    if reason not in ISSUE_REASONS:
        raise ValidationFailed("reason must be one of " + ", ".join(ISSUE_REASONS))
    current = get_certificate(db, certificate_id, project_id=project_id)
    payload: Doc = {"certificate_id": certificate_id, "reason": reason}

    def save(session: ClientSession) -> Doc:
        job = enqueue(db, ISSUE_JOB_KIND, payload,
                      dedupe_key=dedupe_key(certificate_id),
                      project_id=current["project_id"], session=session, publish=False,
                      request_key=request_key)
        audit.record(db, session, actor=actor, action="certificate.issue_requested",
                     target=f"certificate:{certificate_id}", project_id=current["project_id"],
                     details={"reason": reason, "job_id": str(job.get("_id"))})
        return job

    job = dbm.transaction(db, save, what="request issuance")
    publish_wakeup(str(job["_id"]))
    return job


def job_made_under(db: Database[Doc], certificate_id: str, request_key: str) -> Doc | None:
    """The issuance job that a request with this idempotency reservation already
    enqueued for the certificate, whatever its state now, or None: a retry that took
    over the key of a request whose process died after its commit answers with it
    instead of ordering again once that job has finished. One read on the
    ``dedupe_key`` index."""
    return dbm.retry(lambda: dbm.primary(db)[dbm.JOBS].find_one(
        {"dedupe_key": dedupe_key(certificate_id), "request_key": request_key}),
        what="read issuance job")


# ------------------------------------------------------------------ issuance results
# Called inside the issuing job's fenced transactions (``session``), so each write commits
# only while the job holds its lease, together with the order's and the job's changes.
def store_issued(db: Database[Doc], session: ClientSession, current: Doc,
                 updates: Doc) -> bool:
    """Store a newly issued certificate; False (nothing written) when the document is no
    longer at the version the issuance read (a spec update, a deletion meanwhile)."""
    result = db[dbm.CERTIFICATES].update_one(
        {"_id": current["_id"], "version": current.get("version"), "deleted_at": None},
        {"$set": updates, "$inc": {"version": 1, "issue_count": 1}}, session=session)
    return bool(result.matched_count)


def store_failure(db: Database[Doc], session: ClientSession, certificate_id: str, *,
                  failure: Doc, status: str, now: datetime) -> None:
    """Record a failed attempt; the next one waits until ``failure["next_attempt_at"]``."""
    db[dbm.CERTIFICATES].update_one(
        {"_id": certificate_id, "deleted_at": None},
        {"$set": {"failure": failure, "status": status,
                  "next_renewal_at": failure["next_attempt_at"],
                  "renewal_source": "backoff", "updated_at": now},
         "$inc": {"version": 1}}, session=session)


def store_schedule(db: Database[Doc], session: ClientSession, certificate_id: str,
                   fields: Doc) -> None:
    """Move the next renewal (``next_renewal_at``, ``renewal_source``, ``ari``); stamped
    ``updated_at`` so the dashboard's incremental pass sees it (a failing certificate
    shows its next attempt)."""
    db[dbm.CERTIFICATES].update_one(
        {"_id": certificate_id},
        {"$set": {**fields, "updated_at": now_ms()}},
        session=session)


def store_awaiting(db: Database[Doc], certificate_id: str, awaiting: Doc | None) -> None:
    """Show what the running issuance waits for (None once nothing); not a spec change,
    so the version stays."""
    dbm.retry(lambda: db[dbm.CERTIFICATES].update_one(
        {"_id": certificate_id}, {"$set": {"awaiting": awaiting or None}}),
        what="store what the issuance awaits")


# ------------------------------------------------------------------ due renewals
def due_query(now: datetime) -> Doc:
    """The renewal scan's filter: on the (deleted_at, next_renewal_at) index (m0010), so
    the scan reads the due certificates only (from ``EARLIEST``: not through the revoked
    ones, whose renewal time is null)."""
    return {"deleted_at": None, "next_renewal_at": {"$gte": dbm.EARLIEST, "$lte": now}}


DUE_FIELDS = {"_id": 1, "project_id": 1, "next_renewal_at": 1, "status": 1}


def due_for_renewal(db: Database[Doc], now: datetime, limit: int) -> list[Doc]:
    """Live certificates whose ``next_renewal_at`` has come, the most overdue first, at
    most ``limit`` (the scan's fields only). Nothing here writes: a certificate whose
    renewal is already in hand comes back at every scan until its job moves
    ``next_renewal_at``."""
    return dbm.retry(lambda: list(dbm.primary(db)[dbm.CERTIFICATES].find(
        due_query(now), DUE_FIELDS, sort=[("next_renewal_at", 1)], limit=limit)),
        what="find due renewals")


def still_due(db: Database[Doc], session: ClientSession, certificate_ids: list[str],
              now: datetime) -> list[Doc]:
    """Of ``certificate_ids``, those still live and due at ``now``, read in ``session``'s
    transaction (one command whatever the batch's size)."""
    return [c for c in db[dbm.CERTIFICATES].find(
        {"_id": {"$in": certificate_ids}, "deleted_at": None}, DUE_FIELDS, session=session)
        if c.get("next_renewal_at") is not None and c["next_renewal_at"] <= now]
