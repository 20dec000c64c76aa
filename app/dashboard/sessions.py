"""Dashboard sign-in: an API token exchanged for a server-side session.

The browser holds only a random session id in an ``HttpOnly``, ``SameSite=Strict``
cookie (``Secure`` over TLS). The database holds only its SHA-256 (a stolen copy of the
collection signs no one in), the token's id, a CSRF token and ``expires_at``, checked on
every request (the TTL index of m0012 only clears old documents). Each request re-reads
the token, so revoking it, or its expiry, ends its dashboard sessions at once; the
caller is the token's ``Principal``, with the same scopes and project as on the API.
Sign-in and sign-out are audited.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo.client_session import ClientSession
from pymongo.database import Database

from app import db as dbm
from app.audit import record
from app.db import Doc
from app.domain.tokens import Principal, authenticate

COOKIE_NAME = "cap_dashboard"
SESSION_LIFETIME = timedelta(hours=8)


def _now() -> datetime:
    return datetime.now(UTC)


def session_hash(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


def sign_in(db: Database[Doc], presented_token: str) -> tuple[str, Principal]:
    """Verify an API token (Unauthorized when it is not valid) and open a session for
    it; return the new session id (for the cookie only) and the caller."""
    caller = authenticate(db, presented_token.strip())
    session_id = secrets.token_urlsafe(32)
    now = _now()
    expires_at = now + SESSION_LIFETIME
    token = dbm.retry(lambda: db[dbm.API_TOKENS].find_one({"_id": caller.token_id},
                                                          {"expires_at": 1}),
                      what="read token expiry") or {}
    token_expiry = token.get("expires_at")
    if isinstance(token_expiry, datetime):
        expires_at = min(expires_at, token_expiry)
    doc = {"_id": session_hash(session_id), "token_id": caller.token_id,
           "csrf": secrets.token_urlsafe(32), "created_at": now, "expires_at": expires_at}

    def write(session: ClientSession) -> None:
        db[dbm.DASHBOARD_SESSIONS].insert_one(doc, session=session)
        record(db, session, actor=caller.actor, action="dashboard.sign_in",
               target=f"token:{caller.token_id}", project_id=caller.project_id,
               details={"expires_at": expires_at})

    dbm.transaction(db, write, what="open dashboard session")
    return session_id, caller


def sign_out(db: Database[Doc], session_id: str, caller: Principal) -> None:
    def write(session: ClientSession) -> None:
        gone = db[dbm.DASHBOARD_SESSIONS].delete_one({"_id": session_hash(session_id)},
                                                     session=session)
        if gone.deleted_count:
            record(db, session, actor=caller.actor, action="dashboard.sign_out",
                   target=f"token:{caller.token_id}", project_id=caller.project_id)

    dbm.transaction(db, write, what="close dashboard session")


def load(db: Database[Doc], session_id: str | None) -> tuple[Principal, str] | None:
    """The caller and CSRF token of a live session, or None (no cookie, unknown or expired
    session, or its token revoked or expired)."""
    if not session_id or len(session_id) > 100:
        return None
    now = _now()
    doc: dict[str, Any] | None = dbm.retry(
        lambda: db[dbm.DASHBOARD_SESSIONS].find_one(
            {"_id": session_hash(session_id), "expires_at": {"$gt": now}}),
        what="read dashboard session")
    if doc is None:
        return None
    token = dbm.retry(lambda: db[dbm.API_TOKENS].find_one({"_id": doc["token_id"]},
                                                          {"token_hash": 0}),
                      what="read session token")
    if token is None or token.get("revoked_at") is not None:
        return None
    expiry = token.get("expires_at")
    if isinstance(expiry, datetime) and expiry <= now:
        return None
    caller = Principal(token_id=str(token["_id"]), project_id=token.get("project_id"),
                       scopes=frozenset(token.get("scopes") or ()),
                       name=token.get("name", ""))
    return caller, str(doc["csrf"])


def csrf_matches(expected: str, presented: str | None) -> bool:
    return bool(presented) and hmac.compare_digest(expected.encode(),
                                                   str(presented).encode())
