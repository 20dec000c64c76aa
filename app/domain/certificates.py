"""Managed certificates (the ``certificates`` collection): spec, issued result, renewal.

A certificate document is a spec (names, key type, challenge, issuer account, optional
ACME profile, renewal policy) plus the certificate currently issued for it (leaf, chain
and full chain PEM, serial, validity, SHA-256 fingerprint, issuer, the sealed key's id,
the order it came from) and ``next_renewal_at`` (indexed), the time the leader's renewal
scan enqueues its next issuance.

Every mutation writes one audit entry in its transaction. Private keys never appear here:
only ``key_id``, a reference to the sealed record in ``keys``.

Renewal time: the CA's ARI window when its directory offers ``renewalInfo`` (see
``app.acme.ari``); else 2/3 of the lifetime (1/2 when the lifetime is under 10 days)
with jitter; ``renewal.renew_before_days`` overrides both. After a failed validation
the next attempt waits ``CAP_RENEWAL_BACKOFF_SECONDS * 2^(failures-1)``, capped at
``CAP_RENEWAL_BACKOFF_MAX_SECONDS`` (1 h → 32 h).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import random
import re
import secrets
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from pymongo.client_session import ClientSession
from pymongo.database import Database

from app import audit
from app import db as dbm
from app.acme.identifiers import normalize_names
from app.config import Settings, load_settings
from app.errors import Conflict, NotFound, PreconditionFailed, ValidationFailed
from app.ops import drift

log = logging.getLogger(__name__)

Doc = dict[str, Any]

KEY_TYPES = ("ec256", "ec384", "rsa2048", "rsa3072", "rsa4096")
CHALLENGE_TYPES = ("http-01", "dns-01")
SPEC_FIELDS = {"name", "names", "key_type", "challenge", "account_id", "profile", "renewal",
               "endpoints"}
RENEWAL_FIELDS = {"renew_before_days", "use_ari", "reuse_key"}

ISSUE_JOB_KIND = "certificates.issue"
SCAN_JOB_KIND = "certificates.renewal_scan"

STATUS_PENDING = "pending"    # never issued yet
STATUS_ISSUED = "issued"      # a certificate is stored (a renewal may be in flight)
STATUS_FAILED = "failed"      # never issued; the last attempt failed
STATUS_REVOKED = "revoked"
STATUS_DELETED = "deleted"

SHORT_LIFETIME = timedelta(days=10)
# Renewals the scan hands to a job are not due again for this long, so a job that dies
# does not make the scan re-enqueue every minute; success or a recorded failure sets the
# real next time.
SCAN_GUARD = timedelta(hours=1)
SCAN_BATCH = 50

_LABEL = re.compile(r"^[\w .:@/-]{1,200}$")
_PROFILE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def _now() -> datetime:
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def _settings(settings: Settings | None) -> Settings:
    return settings or load_settings()


def dedupe_key(certificate_id: str) -> str:
    """One active issuance job per certificate."""
    return f"certificate:{certificate_id}:issue"


# ------------------------------------------------------------------ validation
def _validate_challenge(value: Any, errors: dict[str, list[str]]) -> Doc:
    if value is None:
        return {"type": "http-01"}
    if isinstance(value, str):
        value = {"type": value}
    if not isinstance(value, dict) or value.get("type") not in CHALLENGE_TYPES:
        errors["challenge"] = [f"an object with type one of {', '.join(CHALLENGE_TYPES)}"]
        return {}
    if value["type"] == "http-01":
        if set(value) - {"type"}:
            errors["challenge"] = ["http-01 takes no options"]
        return {"type": "http-01"}
    from app.acme import solvers

    try:
        return solvers.validate_dns01_config(value)
    except ValidationFailed as exc:
        errors["challenge"] = [exc.message]
        return {}


def _validate_renewal(value: Any, errors: dict[str, list[str]]) -> Doc:
    policy: Doc = {"renew_before_days": None, "use_ari": True, "reuse_key": False}
    if value is None:
        return policy
    if not isinstance(value, dict) or set(value) - RENEWAL_FIELDS:
        errors["renewal"] = [f"an object with only {', '.join(sorted(RENEWAL_FIELDS))}"]
        return policy
    days = value.get("renew_before_days")
    if days is not None and (isinstance(days, bool) or not isinstance(days, (int, float))
                             or not 0 < days <= 365):
        errors.setdefault("renewal", []).append("renew_before_days: a number in (0, 365]")
    else:
        policy["renew_before_days"] = float(days) if days is not None else None
    for flag in ("use_ari", "reuse_key"):
        if flag in value:
            if not isinstance(value[flag], bool):
                errors.setdefault("renewal", []).append(f"{flag}: true or false")
            else:
                policy[flag] = value[flag]
    return policy


def validate_spec(spec: Any, *, current: Doc | None = None) -> Doc:
    """Check a certificate spec (or, with ``current``, a partial change of one) and
    return the normalised fields. Raises ValidationFailed naming every bad field."""
    if not isinstance(spec, dict):
        raise ValidationFailed("a certificate spec must be an object")
    unknown = sorted(set(spec) - SPEC_FIELDS)
    if unknown:
        raise ValidationFailed(f"unknown certificate fields: {', '.join(unknown)}",
                               errors={k: ["unknown field"] for k in unknown})
    merged = dict(current or {})
    merged.update(spec)
    errors: dict[str, list[str]] = {}
    key_type = merged.get("key_type", "ec256")
    if key_type not in KEY_TYPES:
        errors["key_type"] = [f"one of {', '.join(KEY_TYPES)}"]
    challenge = _validate_challenge(merged.get("challenge"), errors)
    identifiers: list[Doc] = []
    if "names" not in merged:
        errors["names"] = ["required"]
    elif challenge:
        try:
            identifiers = [i.as_doc() for i in normalize_names(merged["names"],
                                                               challenge["type"])]
        except ValidationFailed as exc:
            errors["names"] = exc.errors.get("names") or [exc.message]
    profile = merged.get("profile")
    if profile is not None and (not isinstance(profile, str) or not _PROFILE.match(profile)):
        errors["profile"] = ["1-64 letters, digits, '.', '_' or '-'"]
    account_id = merged.get("account_id")
    if account_id is not None and (not isinstance(account_id, str) or not account_id
                                   or len(account_id) > 100):
        errors["account_id"] = ["an account id"]
    label = merged.get("name")
    if label is not None and (not isinstance(label, str) or not _LABEL.match(label)):
        errors["name"] = ["1-200 printable characters"]
    renewal = _validate_renewal(merged.get("renewal"), errors)
    endpoints: list[Doc] = []
    try:  # where the certificate is served, for drift scans (app/ops/drift.py)
        endpoints = drift.validate_endpoints(merged.get("endpoints"))
    except ValidationFailed as exc:
        errors["endpoints"] = exc.errors.get("endpoints") or [exc.message]
    if errors:
        raise ValidationFailed("invalid certificate: " + "; ".join(
            f"{k}: {', '.join(v)}" for k, v in errors.items()), errors=errors)
    return {
        "name": label or identifiers[0]["value"],
        "names": [i["value"] for i in identifiers],
        "identifiers": identifiers,
        "key_type": key_type,
        "challenge": challenge,
        "account_id": account_id,
        "profile": profile,
        "renewal": renewal,
        "endpoints": endpoints,
    }


def _require_project(db: Database[Doc], project_id: str) -> None:
    if not isinstance(project_id, str) or not project_id:
        raise ValidationFailed("project_id is required")
    found = dbm.retry(lambda: db[dbm.PROJECTS].find_one({"_id": project_id}, {"_id": 1}),
                      what="read project")
    if found is None:
        raise NotFound(f"project {project_id:.64} not found")


def _resolve_account(db: Database[Doc], project_id: str, account_id: str | None) -> Doc:
    from app.domain import accounts

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
                       settings: Settings | None = None) -> Doc:
    """Validate and store a managed certificate; it is due for issuance at once (the
    renewal scan or ``request_issuance`` enqueues it)."""
    fields = validate_spec(spec)
    _require_project(db, project_id)
    account = _resolve_account(db, project_id, fields["account_id"])
    fields["account_id"] = account["_id"]
    fields["directory_url"] = account["directory_url"]
    now = _now()
    doc: Doc = {
        "_id": "crt_" + secrets.token_hex(8), "project_id": project_id, **fields,
        "status": STATUS_PENDING, "version": 1, "created_at": now, "updated_at": now,
        "deleted_at": None, "next_renewal_at": now, "renewal_source": "initial",
        "serial": None, "not_before": None, "not_after": None, "fingerprint_sha256": None,
        "issuer": None, "key_id": None, "certificate_pem": None, "chain_pem": None,
        "fullchain_pem": None, "order_id": None, "issued_at": None, "ari_cert_id": None,
        "ari": None, "failure": None, "issue_count": 0,
    }

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


def list_certificates(db: Database[Doc], project_id: str, *, status: str | None = None,
                      name: str | None = None, limit: int = 100, skip: int = 0) -> list[Doc]:
    query: Doc = {"project_id": project_id, "deleted_at": None}
    if status is not None:
        query["status"] = status
    if name is not None:
        query["names"] = name
    return dbm.retry(lambda: list(db[dbm.CERTIFICATES].find(
        query, sort=[("created_at", 1), ("_id", 1)], skip=max(0, skip),
        limit=max(1, min(limit, 1000)))), what="list certificates")


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
    reissue_fields = ("names", "key_type", "challenge", "account_id", "profile")
    needs_reissue = any(fields[k] != current.get(k) for k in reissue_fields)
    now = _now()
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
    now = _now()

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
                     reason: str = "manual", *, project_id: str | None = None) -> Doc:
    """Enqueue an issuance (or renewal) job now; returns the job document (the active one
    when an issuance is already queued or running for this certificate)."""
    from app.jobs import enqueue, publish_wakeup

    if reason not in ("manual", "initial", "renewal", "reissue"):
        raise ValidationFailed("reason must be manual, initial, renewal or reissue")
    current = get_certificate(db, certificate_id, project_id=project_id)

    def save(session: ClientSession) -> Doc:
        job = enqueue(db, ISSUE_JOB_KIND, {"certificate_id": certificate_id, "reason": reason},
                      dedupe_key=dedupe_key(certificate_id),
                      project_id=current["project_id"], session=session, publish=False)
        audit.record(db, session, actor=actor, action="certificate.issue_requested",
                     target=f"certificate:{certificate_id}", project_id=current["project_id"],
                     details={"reason": reason, "job_id": str(job.get("_id"))})
        return job

    job = dbm.transaction(db, save, what="request issuance")
    publish_wakeup(str(job["_id"]))
    return job


REVOCATION_REASONS = {0, 1, 3, 4, 5, 9}  # RFC 5280 codes a subscriber may use


def revoke_certificate(db: Database[Doc], certificate_id: str, actor: audit.Actor,
                       reason_code: int = 0, *, project_id: str | None = None,
                       settings: Settings | None = None) -> Doc:
    """Revoke the current certificate at its CA; renewals stop until a new issuance is
    requested."""
    from app.domain import accounts

    settings = _settings(settings)
    if reason_code not in REVOCATION_REASONS:
        raise ValidationFailed(f"reason_code must be one of {sorted(REVOCATION_REASONS)}",
                               errors={"reason_code": ["unsupported revocation reason"]})
    current = get_certificate(db, certificate_id, project_id=project_id)
    if current.get("status") == STATUS_REVOKED:
        raise Conflict(f"certificate {certificate_id} is already revoked")
    if not current.get("certificate_pem"):
        raise Conflict(f"certificate {certificate_id} has not been issued")
    account = accounts.get_account(db, current["account_id"])
    client = accounts.client_for(db, account, settings)
    accounts.ensure_registered(db, account, client, actor)
    client.revoke(current["certificate_pem"].encode(), reason_code)
    now = _now()

    def save(session: ClientSession) -> None:
        db[dbm.CERTIFICATES].update_one(
            {"_id": certificate_id},
            {"$set": {"status": STATUS_REVOKED, "revoked_at": now,
                      "revocation_reason": reason_code, "next_renewal_at": None,
                      "updated_at": now}, "$inc": {"version": 1}}, session=session)
        audit.record(db, session, actor=actor, action="certificate.revoke",
                     target=f"certificate:{certificate_id}", project_id=current["project_id"],
                     details={"serial": current.get("serial"), "reason_code": reason_code})

    dbm.transaction(db, save, what="revoke certificate")
    current.update({"status": STATUS_REVOKED, "revoked_at": now,
                    "revocation_reason": reason_code, "next_renewal_at": None})
    return current


# ------------------------------------------------------------------ issued result
def split_chain(fullchain_pem: str) -> list[str]:
    marker = "-----END CERTIFICATE-----"
    parts = []
    for chunk in fullchain_pem.split(marker):
        start = chunk.find("-----BEGIN CERTIFICATE-----")
        if start >= 0:
            parts.append(chunk[start:] + marker + "\n")
    return parts


def describe_issued(fullchain_pem: str) -> Doc:
    """The stored fields of an issued chain: leaf, chain, serial, validity, fingerprint."""
    parts = split_chain(fullchain_pem)
    if not parts:
        raise ValidationFailed("the CA returned no certificate")
    leaf = x509.load_pem_x509_certificate(parts[0].encode())
    der = leaf.public_bytes(serialization.Encoding.DER)
    return {
        "certificate_pem": parts[0],
        "chain_pem": "".join(parts[1:]),
        "fullchain_pem": "".join(parts),
        "serial": format(leaf.serial_number, "x"),
        "not_before": leaf.not_valid_before_utc,
        "not_after": leaf.not_valid_after_utc,
        "fingerprint_sha256": hashlib.sha256(der).hexdigest(),
        "issuer": leaf.issuer.rfc4514_string(),
    }


def default_renewal_time(not_before: datetime, not_after: datetime,
                         rng: random.Random | None = None) -> datetime:
    """2/3 of the lifetime (1/2 under 10 days), ± jitter of up to 1/30 of the lifetime
    (at most 12 h), so certificates issued together do not all renew together."""
    rng = rng or random.Random()
    lifetime = not_after - not_before
    fraction = 0.5 if lifetime < SHORT_LIFETIME else 2 / 3
    jitter = min(lifetime / 30, timedelta(hours=12)).total_seconds()
    return not_before + lifetime * fraction + timedelta(seconds=rng.uniform(-jitter, jitter))


def override_renewal_time(not_after: datetime, renew_before_days: float,
                          rng: random.Random | None = None) -> datetime:
    """``renew_before_days`` before expiry, up to 1 % of that span earlier (jitter)."""
    rng = rng or random.Random()
    before = timedelta(days=renew_before_days)
    return not_after - before - before * rng.uniform(0, 0.01)


def backoff_delay(failures: int, settings: Settings) -> timedelta:
    """Wait after the n-th consecutive failed attempt (1 h, 2 h, 4 h ... 32 h)."""
    exponent = max(0, failures - 1)
    seconds = settings.renewal_backoff_seconds * (2 ** min(exponent, 30))
    return timedelta(seconds=min(seconds, settings.renewal_backoff_max_seconds))


# ------------------------------------------------------------------ renewal scan
def _due(db: Database[Doc], now: datetime, limit: int) -> list[Doc]:
    return list(dbm.primary(db)[dbm.CERTIFICATES].find(
        {"next_renewal_at": {"$lte": now}, "deleted_at": None},
        {"_id": 1, "project_id": 1, "next_renewal_at": 1, "status": 1},
        sort=[("next_renewal_at", 1)], limit=limit))


def renewal_scan(db: Database[Doc], *, batch_size: int = SCAN_BATCH,
                 max_batches: int = 50, fence: Any = None) -> Doc:
    """Enqueue an issuance job for every certificate whose ``next_renewal_at`` has come
    (dedupe key per certificate), in batches; each batch moves its certificates'
    ``next_renewal_at`` forward by ``SCAN_GUARD`` in the same transaction. Touches only
    due documents (the query is on the ``next_renewal_at`` index).

    Enqueueing is internal scheduling, like the leader's timed work: it writes no audit
    entry (the jobs record what was enqueued, and each issuance it leads to is audited).
    Keeping the batch transactions free of the audit chain's head also keeps them from
    conflicting with every issuance that commits meanwhile."""
    from app.jobs import ACTIVE_STATES, enqueue, publish_wakeup

    enqueued = 0
    batches = 0
    for _ in range(max_batches):
        now = dbm.server_now(db)
        due = dbm.retry(functools.partial(_due, db, now, batch_size),
                        what="find due renewals")
        if not due:
            break
        guard_until = now + SCAN_GUARD

        def enqueue_batch(session: ClientSession, due: list[Doc] = due,
                          now: datetime = now, guard_until: datetime = guard_until
                          ) -> list[str]:
            job_ids = []
            keys = [dedupe_key(cert["_id"]) for cert in due]
            active = {job["dedupe_key"] for job in db[dbm.JOBS].find(
                {"dedupe_key": {"$in": keys}, "state": {"$in": list(ACTIVE_STATES)}},
                {"dedupe_key": 1}, session=session)}
            for cert in due:
                moved = db[dbm.CERTIFICATES].update_one(
                    {"_id": cert["_id"], "next_renewal_at": {"$lte": now}},
                    {"$set": {"next_renewal_at": guard_until}}, session=session)
                if not moved.modified_count or dedupe_key(cert["_id"]) in active:
                    continue  # an issuance of it is already queued or running
                reason = "initial" if cert.get("status") in (STATUS_PENDING, STATUS_FAILED) \
                    else "renewal"
                job = enqueue(db, ISSUE_JOB_KIND,
                              {"certificate_id": cert["_id"], "reason": reason},
                              dedupe_key=dedupe_key(cert["_id"]),
                              project_id=cert.get("project_id"), session=session,
                              publish=False)
                job_ids.append(str(job["_id"]))
            return job_ids

        if fence is not None:
            job_ids = fence.transaction(enqueue_batch)
        else:
            job_ids = dbm.transaction(db, enqueue_batch, what="enqueue renewals")
        for job_id in job_ids:
            publish_wakeup(job_id)
        enqueued += len(job_ids)
        batches += 1
        if len(due) < batch_size:
            break
    return {"enqueued": enqueued, "batches": batches}
