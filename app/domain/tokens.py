"""API tokens: 256 random bits, stored only as a SHA-256 hash, shown once at creation.

A token belongs to one project and carries scopes among ``read``, ``write`` and
``keys:export``; an admin token (scope ``admin``) belongs to no project and may do
anything in every project. The plaintext (``cap_`` + 43 url-safe characters) is returned
by ``create_token`` and never stored, logged or shown again.

``authenticate`` keeps a short per-process cache of verified tokens
(``app.domain.tokencache``): a revoked token stops working within ``CACHE_SECONDS`` on
every replica (at once on the replica that revoked it).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from pymongo.client_session import ClientSession
from pymongo.database import Database

from app import db as dbm
from app.audit import Actor, record
from app.db import Doc
from app.domain import tokencache
from app.domain.projects import get_project, now_ms
from app.domain.tokencache import CACHE_SECONDS
from app.domain.tokencache import forget_token as forget_cached_token
from app.errors import Forbidden, NotFound, Unauthorized, ValidationFailed

READ, WRITE, KEYS_EXPORT, ADMIN = "read", "write", "keys:export", "admin"
SCOPES = (READ, WRITE, KEYS_EXPORT, ADMIN)
PROJECT_SCOPES = (READ, WRITE, KEYS_EXPORT)

TOKEN_PREFIX = "cap_"
# "cap_" + token_urlsafe(32): 32 random bytes = 256 bits, 43 base64url characters.
TOKEN_RE = re.compile(r"^cap_[A-Za-z0-9_-]{43}$")
ID_RE = re.compile(r"^tok_[0-9a-f]{16}$")
NAME_RE = re.compile(r"^[\w .:@/-]{1,100}$")
MAX_EXPIRY_DAYS = 3650


@dataclass(frozen=True)
class Principal:
    """The verified caller of an API request."""

    token_id: str
    project_id: str | None
    scopes: frozenset[str]
    name: str = ""

    @property
    def is_admin(self) -> bool:
        return ADMIN in self.scopes

    def has(self, scope: str) -> bool:
        return self.is_admin or scope in self.scopes

    @property
    def actor(self) -> Actor:
        return Actor("token", self.token_id)

    def can_see(self, project_id: Any) -> bool:
        """Whether this caller may see objects of ``project_id``."""
        return self.is_admin or (project_id is not None and project_id == self.project_id)


def generate_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token_id() -> str:
    return "tok_" + secrets.token_hex(8)


def normalize_scopes(scopes: Iterable[str], *, admin: bool) -> list[str]:
    wanted = sorted(set(scopes))
    unknown = [s for s in wanted if s not in SCOPES]
    if unknown:
        raise ValidationFailed(f"unknown scope(s) {', '.join(unknown)}: choose among "
                               + ", ".join(SCOPES), errors={"scopes": unknown})
    if admin:
        return [ADMIN]
    if ADMIN in wanted:
        raise ValidationFailed("the admin scope is only for admin tokens, which belong to "
                               "no project", errors={"scopes": ["admin"]})
    if not wanted:
        raise ValidationFailed("a token needs at least one scope",
                               errors={"scopes": ["empty"]})
    return wanted


def create_token(db: Database[Doc], *, project_id: str | None, scopes: Iterable[str],
                 actor: Actor, name: str = "", expires_in_days: int | None = None,
                 request_key: str | None = None) -> tuple[Doc, str]:
    """Create a token; return (document without hash, plaintext token shown once).

    ``project_id=None`` creates an admin token (scope ``admin``). ``request_key`` (an
    API request's idempotency reservation) is stored on it for ``revoke_made_under``."""
    admin = project_id is None
    scope_list = normalize_scopes(scopes, admin=admin)
    if name and not NAME_RE.match(name):
        raise ValidationFailed("token name: 1-100 letters, digits, spaces or . : @ / - _",
                               errors={"name": ["invalid"]})
    if project_id is not None:
        get_project(db, project_id)
    expires_at = None
    if expires_in_days is not None:
        if not 1 <= expires_in_days <= MAX_EXPIRY_DAYS:
            raise ValidationFailed(f"expires_in_days must be 1..{MAX_EXPIRY_DAYS}",
                                   errors={"expires_in_days": ["out of range"]})
        expires_at = dbm.server_now(db) + timedelta(days=expires_in_days)
    plaintext = generate_token()
    doc: Doc = {
        "_id": new_token_id(),
        "token_hash": hash_token(plaintext),
        "hint": plaintext[:8] + "...",  # enough to recognise it, never enough to use it
        "name": name,
        "project_id": project_id,
        "scopes": scope_list,
        "created_at": now_ms(),
        "created_by": actor.as_doc(),
        "expires_at": expires_at,
        "revoked_at": None,
        "last_used_at": None,
    }
    if request_key is not None:
        doc["request_key"] = request_key

    def write(session: ClientSession) -> None:
        if project_id is not None and db[dbm.PROJECTS].find_one(
                {"_id": project_id}, {"_id": 1}, session=session) is None:
            raise NotFound(f"project {project_id!r} not found")
        db[dbm.API_TOKENS].insert_one(doc, session=session)
        record(db, session, actor=actor, action="token.create",
               target=f"token:{doc['_id']}", project_id=project_id,
               details={"scopes": scope_list, "name": name, "admin": admin})

    dbm.transaction(db, write, what="create token")
    public = {k: v for k, v in doc.items() if k not in ("token_hash", "request_key")}
    return public, plaintext


def revoke_made_under(db: Database[Doc], request_key: str, *, project_id: str | None,
                      actor: Actor) -> list[str]:
    """Revoke the live tokens a request with this idempotency reservation created: a
    retry that took over the key of a request whose process died after its commit gets
    a new token, and the first one, whose plaintext died with that process (it is never
    stored), must not stay valid with nobody holding it. Returns the revoked ids."""
    made = dbm.retry(lambda: list(dbm.primary(db)[dbm.API_TOKENS].find(
        {"project_id": project_id, "request_key": request_key, "revoked_at": None},
        {"_id": 1})), what="read tokens")
    for doc in made:
        revoke_token(db, doc["_id"], actor=actor)
    return [doc["_id"] for doc in made]


def get_token(db: Database[Doc], token_id: str) -> Doc:
    if not isinstance(token_id, str) or not ID_RE.match(token_id):
        raise NotFound(f"token {token_id!r} not found")
    doc = dbm.retry(lambda: db[dbm.API_TOKENS].find_one({"_id": token_id},
                                                        {"token_hash": 0, "request_key": 0}),
                    what="read token")
    if doc is None:
        raise NotFound(f"token {token_id!r} not found")
    return doc


def revoke_token(db: Database[Doc], token_id: str, *, actor: Actor) -> Doc:
    """Revoke a token (idempotent: revoking a revoked token changes nothing)."""
    get_token(db, token_id)

    def write(session: ClientSession) -> Doc:
        doc = db[dbm.API_TOKENS].find_one({"_id": token_id}, {"token_hash": 0},
                                          session=session)
        if doc is None:
            raise NotFound(f"token {token_id!r} not found")
        if doc.get("revoked_at") is not None:
            return doc
        now = now_ms()
        db[dbm.API_TOKENS].update_one(
            {"_id": token_id}, {"$set": {"revoked_at": now, "revoked_by": actor.as_doc()}},
            session=session)
        record(db, session, actor=actor, action="token.revoke", target=f"token:{token_id}",
               project_id=doc.get("project_id"), details={})
        doc["revoked_at"] = now
        doc["revoked_by"] = actor.as_doc()
        return doc

    doc = dbm.transaction(db, write, what="revoke token")
    forget_cached_token(token_id)
    return doc


def check_grant(creator: Principal, project_id: str | None, scopes: Iterable[str]) -> None:
    """A caller may create tokens only within what it holds itself."""
    if creator.is_admin:
        return
    if project_id is None or project_id != creator.project_id:
        raise Forbidden("only an admin token can create admin tokens or tokens of another "
                        "project")
    extra = sorted(set(scopes) - creator.scopes)
    if extra:
        raise Forbidden("a token cannot grant scopes it does not hold: " + ", ".join(extra),
                        errors={"scopes": extra})


# -- verification -------------------------------------------------------------------

def clear_cache() -> None:
    """Forget every verified token of this process."""
    tokencache.clear()


def authenticate(db: Database[Doc], presented: str | None) -> Principal:
    """The principal of a presented bearer token; Unauthorized when it is missing,
    malformed, unknown, revoked or expired."""
    if not presented:
        raise Unauthorized("missing bearer token: send 'Authorization: Bearer cap_...'")
    if not TOKEN_RE.match(presented):
        raise Unauthorized("invalid bearer token")
    digest = hash_token(presented)
    now = time.monotonic()
    hit = tokencache.get(digest, now)
    if isinstance(hit, Principal):
        return hit
    doc = dbm.retry(lambda: db[dbm.API_TOKENS].find_one({"token_hash": digest}),
                    what="verify token", attempts=3)
    # Compare in constant time too: the index lookup already matched, this guards
    # against a store that matched by something else than the exact hash.
    if doc is None or not hmac.compare_digest(str(doc.get("token_hash", "")), digest):
        raise Unauthorized("invalid bearer token")
    if doc.get("revoked_at") is not None:
        raise Unauthorized("this token has been revoked")
    ttl = CACHE_SECONDS
    expires_at = doc.get("expires_at")
    if isinstance(expires_at, datetime):
        server_now = dbm.server_now(db)
        if expires_at <= server_now:
            raise Unauthorized("this token has expired")
        ttl = min(ttl, (expires_at - server_now).total_seconds())
    principal = Principal(token_id=str(doc["_id"]), project_id=doc.get("project_id"),
                          scopes=frozenset(doc.get("scopes") or ()), name=doc.get("name", ""))
    _touch(db, doc)
    tokencache.put(digest, principal, now + ttl)
    return principal


def _touch(db: Database[Doc], doc: Doc) -> None:
    """Record last use at most once a minute per token (bookkeeping, not audited)."""
    last = doc.get("last_used_at")
    now = now_ms()
    if isinstance(last, datetime) and (now - last) < timedelta(minutes=1):
        return
    try:
        db[dbm.API_TOKENS].update_one({"_id": doc["_id"]}, {"$set": {"last_used_at": now}})
    except Exception:  # noqa: BLE001 - best effort; never fail a request on bookkeeping
        pass
