"""Revocation: ask the certificate's CA to revoke it, then stop renewing it.

Renewals stay stopped until a new issuance is requested (``reason`` manual or reissue).
"""

from __future__ import annotations

from datetime import UTC, datetime

from pymongo.client_session import ClientSession
from pymongo.database import Database

from app import audit
from app import db as dbm
from app.config import Settings, load_settings
from app.db import Doc
from app.domain import accounts
from app.domain.certificates import STATUS_REVOKED, get_certificate
from app.errors import Conflict, ValidationFailed


def _now() -> datetime:
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


REVOCATION_REASONS = {0, 1, 3, 4, 5, 9}  # RFC 5280 codes a subscriber may use


def revoke_certificate(db: Database[Doc], certificate_id: str, actor: audit.Actor,
                       reason_code: int = 0, *, project_id: str | None = None,
                       settings: Settings | None = None) -> Doc:
    """Revoke the current certificate at its CA; renewals stop until a new issuance is
    requested."""
    settings = settings or load_settings()
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
