"""ACME accounts: one per project, directory and name (the ``acme_accounts`` collection).

An account document holds the directory URL, contact emails, whether the CA's terms were
agreed, the External Account Binding key id (``eab_kid``), the account URL once the CA
returned it, and ``key_id``: the account's EC P-256 private key, sealed by ``app.keys``.

The EAB HMAC key is a secret used once, when the account is registered: it is passed to
``create_account`` / ``register_account`` and never stored. Registration is idempotent:
the document (with its sealed key) is saved first, then the CA is asked; an account URL
that was lost (a crash between the CA's answer and the save, a restored backup) is
recovered with ``onlyReturnExisting`` before any new registration.
"""

from __future__ import annotations

import re
import secrets
from typing import Any

from pymongo.client_session import ClientSession
from pymongo.database import Database
from pymongo.errors import DuplicateKeyError

from app import audit
from app import db as dbm
from app.acme import client as acme_client
from app.acme.errors import AcmeError, AcmeProblem
from app.config import Settings, load_settings
from app.db import Doc
from app.domain.projects import now_ms
from app.errors import Conflict, NotFound, ValidationFailed

ACCOUNT_KEY_TYPE = "ec256"
ACCOUNT_KEY_PURPOSE = "acme_account"

STATUS_NEW = "new"                # stored, not yet known to the CA
STATUS_REGISTERED = "registered"  # account URL known
STATUS_DEACTIVATED = "deactivated"

# The API schema publishes these patterns (app/api/accounts/schemas.py).
EMAIL_PATTERN = (r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}"
                 r"[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+$")
ACCOUNT_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
_EMAIL = re.compile(EMAIL_PATTERN)
_NAME = re.compile(ACCOUNT_NAME_PATTERN)
SPEC_FIELDS = {"name", "directory_url", "contact", "terms_agreed", "eab"}


class AccountNotRegistrable(AcmeError):
    """The account cannot be registered without the operator (terms, EAB key)."""

    status, code = 409, "account_needs_registration"



def _settings(settings: Settings | None) -> Settings:
    return settings or load_settings()


def validate_spec(spec: Any, settings: Settings) -> Doc:
    """Check an account spec; return the normalised fields (the HMAC key kept apart)."""
    if not isinstance(spec, dict):
        raise ValidationFailed("an account spec must be an object")
    unknown = sorted(set(spec) - SPEC_FIELDS)
    if unknown:
        raise ValidationFailed(f"unknown account fields: {', '.join(unknown)}",
                               errors={k: ["unknown field"] for k in unknown})
    errors: dict[str, list[str]] = {}
    name = spec.get("name", "default")
    if not isinstance(name, str) or not _NAME.match(name):
        errors["name"] = ["1-63 letters, digits, '.', '_' or '-'"]
    directory_url = spec.get("directory_url") or settings.acme_directory_url
    if not isinstance(directory_url, str) or not directory_url.startswith("https://") \
            or len(directory_url) > 2000 or any(c.isspace() for c in directory_url):
        errors["directory_url"] = ["the https:// URL of an ACME directory"]
    contact = spec.get("contact", [])
    if isinstance(contact, str):
        contact = [contact]
    emails: list[str] = []
    if not isinstance(contact, list) or len(contact) > 10:
        errors["contact"] = ["a list of at most 10 email addresses"]
    else:
        for item in contact:
            value = item[len("mailto:"):] if isinstance(item, str) and \
                item.startswith("mailto:") else item
            if not isinstance(value, str) or len(value) > 254 or not _EMAIL.match(value):
                errors.setdefault("contact", []).append(f"{str(item)[:100]!r} is not an "
                                                        "email address")
            else:
                emails.append(value)
    terms = spec.get("terms_agreed", False)
    if not isinstance(terms, bool):
        errors["terms_agreed"] = ["true or false"]
    eab = spec.get("eab")
    eab_kid = eab_hmac = None
    if eab is not None:
        if not isinstance(eab, dict) or set(eab) - {"kid", "hmac_key"}:
            errors["eab"] = ["an object {kid, hmac_key}"]
        else:
            eab_kid, eab_hmac = eab.get("kid"), eab.get("hmac_key")
            if not isinstance(eab_kid, str) or not 0 < len(eab_kid) <= 500:
                errors.setdefault("eab", []).append("kid must be a non-empty string")
            if eab_hmac is not None and not _valid_hmac(eab_hmac):
                errors.setdefault("eab", []).append("hmac_key must be base64url")
    if errors:
        raise ValidationFailed("invalid account: " + "; ".join(
            f"{k}: {', '.join(v)}" for k, v in errors.items()), errors=errors)
    return {"name": name, "directory_url": directory_url, "contact": emails,
            "terms_agreed": terms, "eab_kid": eab_kid, "_eab_hmac_key": eab_hmac}


def _valid_hmac(value: object) -> bool:
    return isinstance(value, str) and 16 <= len(value) <= 1024 and bool(
        re.fullmatch(r"[A-Za-z0-9_\-+/=]+", value))


def public_view(account: Doc) -> Doc:
    view = {k: v for k, v in account.items() if k != "_id"}
    view["id"] = account["_id"]
    return view


def create_account(db: Database[Doc], project_id: str, spec: Any, actor: audit.Actor, *,
                   register: bool = True, settings: Settings | None = None,
                   request_key: str | None = None) -> Doc:
    """Create an account (new P-256 key, sealed); with ``register`` also register it at
    the CA now. A failed registration leaves the stored account as ``new`` (the worker or
    ``register_account`` retries it). A taken name is a Conflict, except for the account
    this ``request_key`` (an API request's idempotency reservation) already created: a
    retry that took over the key of a request whose process died after its commit gets
    that account (registered now if it was not yet), not a second key at the CA."""
    from app.keys import generate_private_key, seal_private_key

    settings = _settings(settings)
    fields = validate_spec(spec, settings)
    hmac_key = fields.pop("_eab_hmac_key")
    if not isinstance(project_id, str) or not project_id:
        raise ValidationFailed("project_id is required")
    account_id = "acc_" + secrets.token_hex(8)
    key_pem = generate_private_key(ACCOUNT_KEY_TYPE)
    now = now_ms()

    def insert(session: ClientSession) -> Doc:
        key_id = seal_private_key(db, key_pem, project_id=project_id,
                                  purpose=ACCOUNT_KEY_PURPOSE, session=session)
        doc: Doc = {"_id": account_id, "project_id": project_id, **fields,
                    "key_id": key_id, "key_type": ACCOUNT_KEY_TYPE, "account_url": None,
                    "status": STATUS_NEW, "created_at": now, "updated_at": now,
                    "registered_at": None, "last_error": None}
        if request_key is not None:
            doc["request_key"] = request_key
        db[dbm.ACME_ACCOUNTS].insert_one(doc, session=session)
        audit.record(db, session, actor=actor, action="acme_account.create",
                     target=f"acme_account:{account_id}", project_id=project_id,
                     details={"name": fields["name"], "directory_url": fields["directory_url"],
                              "contact": fields["contact"],
                              "terms_agreed": fields["terms_agreed"],
                              "eab_kid": fields["eab_kid"]})
        return doc

    try:
        doc = dbm.transaction(db, insert, what="create ACME account")
    except DuplicateKeyError:
        made = None if request_key is None else dbm.retry(
            lambda: dbm.primary(db)[dbm.ACME_ACCOUNTS].find_one({
                "project_id": project_id, "directory_url": fields["directory_url"],
                "name": fields["name"], "request_key": request_key}),
            what="read ACME account")
        if made is None:
            raise Conflict(f"project already has an account named {fields['name']!r} "
                           f"for {fields['directory_url']}") from None
        doc, account_id = made, made["_id"]
    if register and doc.get("status") == STATUS_NEW:
        doc = register_account(db, account_id, actor, eab_hmac_key=hmac_key,
                               settings=settings, project_id=project_id)
    return doc


def get_account(db: Database[Doc], account_id: str, *, project_id: str | None = None) -> Doc:
    query: Doc = {"_id": account_id}
    if project_id is not None:
        query["project_id"] = project_id
    doc = dbm.retry(lambda: dbm.primary(db)[dbm.ACME_ACCOUNTS].find_one(query),
                    what="read ACME account")
    if doc is None:
        raise NotFound(f"ACME account {account_id!s:.64} not found")
    return doc


def list_accounts(db: Database[Doc], project_id: str | None) -> list[Doc]:
    """A project's accounts (``None``: every project's), oldest first."""
    query: Doc = {} if project_id is None else {"project_id": project_id}
    return dbm.retry(lambda: list(db[dbm.ACME_ACCOUNTS].find(
        query, sort=[("created_at", 1)])), what="list ACME accounts")


def client_for(db: Database[Doc], account: Doc, settings: Settings) -> acme_client.AcmeClient:
    """An ACME client signing with this account's key (cached per thread)."""
    from app.keys import open_private_key

    bundle = str(settings.acme_ca_bundle) if settings.acme_ca_bundle else None
    cache_key = str(account["key_id"])
    cached = acme_client.get_cached(account["directory_url"], cache_key, bundle)
    if cached is not None:
        if cached.account_url != account.get("account_url"):
            cached.set_account_url(account.get("account_url"))
        return cached
    key_pem = open_private_key(db, account["key_id"], project_id=account["project_id"])
    return acme_client.get_client(account["directory_url"], key_pem, cache_key=cache_key,
                                  account_url=account.get("account_url"), ca_bundle=bundle)


def _save_registration(db: Database[Doc], account: Doc, url: str, actor: audit.Actor,
                       how: str, fence: Any = None) -> Doc:
    now = now_ms()

    def save(session: ClientSession) -> None:
        db[dbm.ACME_ACCOUNTS].update_one(
            {"_id": account["_id"]},
            {"$set": {"account_url": url, "status": STATUS_REGISTERED, "registered_at": now,
                      "updated_at": now, "last_error": None}}, session=session)
        audit.record(db, session, actor=actor, action=f"acme_account.{how}",
                     target=f"acme_account:{account['_id']}",
                     project_id=account["project_id"],
                     details={"account_url": url, "directory_url": account["directory_url"]})

    if fence is not None:
        fence.transaction(save)
    else:
        dbm.transaction(db, save, what="save ACME account URL")
    account.update({"account_url": url, "status": STATUS_REGISTERED, "registered_at": now,
                    "updated_at": now, "last_error": None})
    return account


def _record_error(db: Database[Doc], account: Doc, problem: AcmeProblem) -> None:
    dbm.retry(lambda: db[dbm.ACME_ACCOUNTS].update_one(
        {"_id": account["_id"]}, {"$set": {"last_error": problem.as_doc(),
                                           "updated_at": now_ms()}}),
        what="record ACME account error")


def ensure_registered(db: Database[Doc], account: Doc, client: acme_client.AcmeClient,
                      actor: audit.Actor, *, eab_hmac_key: str | None = None,
                      fence: Any = None) -> Doc:
    """Make sure the CA knows the account and its URL is stored.

    Order: a stored URL is used as is; else ``onlyReturnExisting`` recovers a lost URL;
    else a new registration (needs the terms agreed, and the EAB HMAC key when the CA
    requires external account binding).
    """
    if account.get("account_url"):
        return account
    url = client.find_existing_account()
    if url:
        return _save_registration(db, account, url, actor, "recover", fence)
    if client.external_account_required() and not (account.get("eab_kid") and eab_hmac_key):
        raise AccountNotRegistrable(
            f"ACME account {account['_id']} is not registered and the CA requires external "
            "account binding: register it with the EAB kid and HMAC key")
    if not account.get("terms_agreed") and client.terms_of_service():
        raise AccountNotRegistrable(
            f"ACME account {account['_id']} is not registered: the CA's terms of service "
            f"({client.terms_of_service()}) must be agreed first")
    try:
        url = client.register(contacts=list(account.get("contact") or []),
                              terms_agreed=bool(account.get("terms_agreed")),
                              eab_kid=account.get("eab_kid") if eab_hmac_key else None,
                              eab_hmac_key=eab_hmac_key)
    except AcmeProblem as problem:
        _record_error(db, account, problem)
        raise
    return _save_registration(db, account, url, actor, "register", fence)


def register_account(db: Database[Doc], account_id: str, actor: audit.Actor, *,
                     eab_hmac_key: str | None = None, settings: Settings | None = None,
                     project_id: str | None = None) -> Doc:
    """Register the account at its CA now (or recover its lost URL); return it."""
    settings = _settings(settings)
    if eab_hmac_key is not None and not _valid_hmac(eab_hmac_key):
        raise ValidationFailed("hmac_key must be base64url", errors={"eab": ["bad hmac_key"]})
    account = get_account(db, account_id, project_id=project_id)
    if account.get("status") == STATUS_DEACTIVATED:
        raise Conflict(f"ACME account {account_id} is deactivated")
    client = client_for(db, account, settings)
    return ensure_registered(db, account, client, actor, eab_hmac_key=eab_hmac_key)


def forget_account_url(db: Database[Doc], account: Doc, actor: audit.Actor,
                       fence: Any = None) -> None:
    """The CA says the account does not exist: clear the URL so the next attempt
    recovers or re-registers it."""
    def save(session: ClientSession) -> None:
        db[dbm.ACME_ACCOUNTS].update_one(
            {"_id": account["_id"], "account_url": account.get("account_url")},
            {"$set": {"account_url": None, "status": STATUS_NEW, "updated_at": now_ms()}},
            session=session)
        audit.record(db, session, actor=actor, action="acme_account.forget_url",
                     target=f"acme_account:{account['_id']}",
                     project_id=account["project_id"],
                     details={"account_url": account.get("account_url"),
                              "why": "the CA answered accountDoesNotExist"})

    if fence is not None:
        fence.transaction(save)
    else:
        dbm.transaction(db, save, what="forget ACME account URL")
    account["account_url"] = None
    account["status"] = STATUS_NEW


def update_account(db: Database[Doc], account_id: str, changes: Any, actor: audit.Actor, *,
                   project_id: str | None = None, settings: Settings | None = None) -> Doc:
    """Change contact emails or agree to the terms (contacts are updated at the CA too)."""
    settings = _settings(settings)
    if not isinstance(changes, dict) or not changes or set(changes) - {"contact",
                                                                       "terms_agreed"}:
        raise ValidationFailed("only contact and terms_agreed can be changed",
                               errors={k: ["cannot be changed"] for k in (
                                   set(changes) - {"contact", "terms_agreed"}
                                   if isinstance(changes, dict) else {"body"})})
    account = get_account(db, account_id, project_id=project_id)
    merged = validate_spec({"name": account["name"], "directory_url": account["directory_url"],
                            "contact": changes.get("contact", account.get("contact") or []),
                            "terms_agreed": changes.get("terms_agreed",
                                                        account.get("terms_agreed", False))},
                           settings)
    if account.get("terms_agreed") and merged["terms_agreed"] is False:
        raise ValidationFailed("terms, once agreed, cannot be withdrawn",
                               errors={"terms_agreed": ["cannot be withdrawn"]})
    if "contact" in changes and account.get("account_url"):
        client = client_for(db, account, settings)
        client.update_contacts(merged["contact"])
    now = now_ms()
    new_fields = {"contact": merged["contact"], "terms_agreed": merged["terms_agreed"],
                  "updated_at": now}

    def save(session: ClientSession) -> None:
        db[dbm.ACME_ACCOUNTS].update_one({"_id": account_id}, {"$set": new_fields},
                                         session=session)
        audit.record(db, session, actor=actor, action="acme_account.update",
                     target=f"acme_account:{account_id}", project_id=account["project_id"],
                     details={"contact": merged["contact"],
                              "terms_agreed": merged["terms_agreed"]})

    dbm.transaction(db, save, what="update ACME account")
    account.update(new_fields)
    return account


def delete_account(db: Database[Doc], account_id: str, actor: audit.Actor, *,
                   project_id: str | None = None) -> None:
    """Delete an account that no live certificate uses (the CA keeps its own record)."""
    account = get_account(db, account_id, project_id=project_id)

    def delete(session: ClientSession) -> None:
        in_use = db[dbm.CERTIFICATES].count_documents(
            {"account_id": account_id, "deleted_at": None}, session=session, limit=1)
        if in_use:
            raise Conflict(f"ACME account {account_id} is used by certificates; move or "
                           "delete them first")
        db[dbm.ACME_ACCOUNTS].delete_one({"_id": account_id}, session=session)
        audit.record(db, session, actor=actor, action="acme_account.delete",
                     target=f"acme_account:{account_id}", project_id=account["project_id"],
                     details={"name": account.get("name"),
                              "directory_url": account.get("directory_url")})

    dbm.transaction(db, delete, what="delete ACME account")
