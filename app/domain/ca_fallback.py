"""CA fallback by policy: an ordered list of ACME accounts (on different directories) per
certificate, used in turn when the current one keeps failing.

A certificate's ``account_id`` is its primary CA; ``ca_fallback`` lists the accounts to
use after it, in order. The certificate's ``ca_state`` says which one is in use
(``active``: 0 is the primary) and how many consecutive attempts failed there. The next
account is used after CAP_CA_FALLBACK_AFTER_FAILURES consecutive failures (default 3),
at once when the directory is unreachable, or when a ``rateLimited`` answer's
Retry-After falls after the certificate's expiry (waiting would let it lapse). Each
switch is audited (``certificate.ca_switch``) and recorded on the certificate
(``ca_state.switched_at/reason/from/to``); the certificate's ``issued_by`` says which
account and directory issued the current certificate, and whether by fallback. After an
issuance the state goes back to the primary: it is tried again at the next renewal.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from pymongo.client_session import ClientSession
from pymongo.database import Database

from app import audit
from app import db as dbm
from app.acme.errors import AcmeNetworkError, AcmeProblem
from app.db import Doc
from app.domain import accounts
from app.errors import NotFound, ValidationFailed

log = logging.getLogger(__name__)

MAX_FALLBACKS = 5


def validate_list(value: Any) -> list[str]:
    """The shape of ``ca_fallback``: a list of distinct account ids."""
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > MAX_FALLBACKS or not all(
            isinstance(v, str) and 0 < len(v) <= 100 for v in value):
        raise ValidationFailed(f"ca_fallback: a list of at most {MAX_FALLBACKS} ACME account "
                               "ids", errors={"ca_fallback": ["a list of account ids"]})
    if len(set(value)) != len(value):
        raise ValidationFailed("ca_fallback: an account is listed twice",
                               errors={"ca_fallback": ["duplicate account"]})
    return list(value)


def resolve_list(db: Database[Doc], project_id: str, primary_id: str,
                 fallback: list[str]) -> list[str]:
    """Check every fallback account: it exists, it is of the certificate's project (a
    list may not mix projects), and it is not the primary."""
    errors: dict[str, list[str]] = {}
    for account_id in fallback:
        if account_id == primary_id:
            errors[account_id] = ["is the primary account (account_id)"]
            continue
        try:
            accounts.get_account(db, account_id, project_id=project_id)
        except NotFound:
            try:
                accounts.get_account(db, account_id)
            except NotFound:
                errors[account_id] = ["unknown ACME account"]
            else:
                errors[account_id] = ["belongs to another project: a fallback list cannot "
                                      "mix projects"]
    if errors:
        first = next(iter(errors))
        raise ValidationFailed(f"ca_fallback: account {first:.64} {errors[first][0]}",
                               errors={"ca_fallback": [f"{k}: {v[0]}"
                                                       for k, v in errors.items()]})
    return fallback


def chain(cert: Doc) -> list[str]:
    """The primary, then the certificate's own fallback list, else its project's default
    (copied onto the certificate as ``project_ca_fallback`` when the issuance reads it)."""
    primary = str(cert["account_id"])
    listed = cert.get("ca_fallback") or [a for a in cert.get("project_ca_fallback") or []
                                         if a != primary]
    return [primary, *[str(a) for a in listed]]


def with_project_default(db: Database[Doc], cert: Doc) -> Doc:
    """``cert`` with its project's default fallback list (``project_ca_fallback``), read
    now: a certificate without a list of its own follows its project's."""
    if cert.get("ca_fallback"):
        return cert
    project = dbm.retry(lambda: db[dbm.PROJECTS].find_one({"_id": cert.get("project_id")},
                                                          {"ca_fallback": 1}),
                        what="read the project's CA fallback") or {}
    return {**cert, "project_ca_fallback": list(project.get("ca_fallback") or [])}


def set_project_default(db: Database[Doc], project_id: str, account_ids: Any,
                        actor: audit.Actor) -> list[str]:
    """Set (or, with an empty list, clear) a project's default fallback list: accounts of
    that project, used in order after a certificate's own account; audited."""
    listed = validate_list(account_ids)
    if db[dbm.PROJECTS].find_one({"_id": project_id}, {"_id": 1}) is None:
        raise NotFound(f"project {project_id:.64} not found")
    resolve_list(db, project_id, "", listed)

    def save(session: ClientSession) -> None:
        db[dbm.PROJECTS].update_one({"_id": project_id}, {"$set": {"ca_fallback": listed}},
                                    session=session)
        audit.record(db, session, actor=actor, action="project.ca_fallback_set",
                     target=f"project:{project_id}", project_id=project_id,
                     details={"ca_fallback": listed})

    dbm.transaction(db, save, what="set the project's CA fallback")
    return listed


def active_index(cert: Doc) -> int:
    index = int((cert.get("ca_state") or {}).get("active") or 0)
    return index if 0 <= index < len(chain(cert)) else 0


def active_account_id(cert: Doc) -> str:
    return chain(cert)[active_index(cert)]


def switch_reason(exc: BaseException, cert: Doc, now: Any, failures: int,
                  threshold: int) -> str | None:
    """Why this failure moves the certificate to its next CA, or None."""
    if isinstance(exc, AcmeNetworkError):
        return "directory unreachable"
    if isinstance(exc, AcmeProblem) and exc.problem_code == "rateLimited" \
            and exc.retry_after is not None and cert.get("not_after") is not None \
            and now + timedelta(seconds=exc.retry_after) >= cert["not_after"]:
        return "rate limited past the certificate's expiry"
    if failures >= threshold:
        return f"{failures} consecutive failures"
    return None


def note_failure(db: Database[Doc], cert_id: str, account_id: str, exc: BaseException,
                 *, threshold: int, actor: audit.Actor) -> str | None:
    """Count a failed attempt at ``account_id``; switch to the next CA when the policy
    says so (audited). Returns the account now in use when it switched."""
    cert = db[dbm.CERTIFICATES].find_one({"_id": cert_id})
    if cert is not None:
        cert = with_project_default(db, cert)
    if cert is None or len(chain(cert)) < 2:
        return None
    index = active_index(cert)
    if chain(cert)[index] != account_id:
        return None  # a peer switched already
    state = cert.get("ca_state") or {}
    failures = int(state.get("failures") or 0) + 1
    now = dbm.server_now(db)
    reason = switch_reason(exc, cert, now, failures, threshold)
    nxt = index + 1
    if reason is None or nxt >= len(chain(cert)):
        db[dbm.CERTIFICATES].update_one(
            {"_id": cert_id, "ca_state.active": state.get("active")},
            {"$set": {"ca_state.failures": failures, "ca_state.active": index,
                      "ca_state.last_error": f"{exc.__class__.__name__}: {exc}"[:300]}})
        return None
    to = chain(cert)[nxt]

    def save(session: ClientSession) -> bool:
        moved = db[dbm.CERTIFICATES].update_one(
            {"_id": cert_id, "ca_state.active": state.get("active")},
            {"$set": {"ca_state": {"active": nxt, "failures": 0, "switched_at": now,
                                   "reason": reason, "from": account_id, "to": to},
                      "next_renewal_at": now, "renewal_source": "ca_fallback"}},
            session=session)
        if not moved.modified_count:
            return False
        audit.record(db, session, actor=actor, action="certificate.ca_switch",
                     target=f"certificate:{cert_id}", project_id=cert["project_id"],
                     details={"from_account": account_id, "to_account": to,
                              "reason": reason, "error": str(exc)[:300]})
        return True

    if dbm.transaction(db, save, what="switch CA"):
        log.warning("switching the certificate to its next CA", extra={
            "certificate_id": cert_id, "from_account": account_id, "to_account": to,
            "reason": reason, "event": "certificate.ca_switch"})
        return to
    return None


def issued_fields(cert: Doc, account: Doc) -> Doc:
    """Stored with an issued certificate: who issued it; back to the primary next time."""
    index = chain(cert).index(account["_id"]) if account["_id"] in chain(cert) else 0
    state = cert.get("ca_state") or {}
    return {"issued_by": {"account_id": account["_id"],
                          "directory_url": account.get("directory_url"),
                          "fallback": index > 0,
                          "reason": state.get("reason") if index > 0 else None},
            "ca_state": {"active": 0, "failures": 0}}
