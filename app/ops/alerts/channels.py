"""Alert channels: where alerts go (``alert_channels``).

A channel belongs to a project, or is global (admins only; it receives every alert,
including those about the service itself). It is defined by a URL:

- ``https://...``: a webhook. The body is JSON: ``format=generic`` (default; also carries
  Slack's ``text`` field) or ``format=slack`` (a Slack incoming-webhook message). With a
  signing secret (``secret``, sealed under the KEK like a private key, or ``secret_env``,
  the name of a ``CAP_ALERT_*`` variable holding it) every request carries
  ``X-CertAutoPilot-Signature: sha256=<hex HMAC-SHA256 of "<timestamp>.<body>">`` and
  ``X-CertAutoPilot-Timestamp``. ``http://`` only with ``allow_http: true``.
- ``smtp://[user@]host[:587]`` (STARTTLS, required) or ``smtps://[user@]host[:465]``
  (TLS from the first byte): email to ``to`` from ``from``; the password comes from the
  ``CAP_ALERT_*`` variable named by ``password_env`` (never stored).

The webhook URL itself is a secret (a Slack URL is a credential): the URL and secret are
sealed together in ``keys``; the channel shows only ``scheme://host[:port]/…``. Optional:
``ca_file`` (PEM to trust instead of the system store), ``rules`` (only these rules).

A bad definition is refused with one clear error and nothing is stored: an unknown
scheme, a password in the URL, a non-https webhook without ``allow_http``, a named
variable that is not set in this process, a missing recipient.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pymongo import DESCENDING
from pymongo.client_session import ClientSession
from pymongo.database import Database
from pymongo.errors import DuplicateKeyError

from app import audit
from app import db as dbm
from app.db import Doc
from app.errors import Conflict, NotFound, ValidationFailed

GLOBAL = "global"  # the scope of channels that belong to no project
KEY_PROJECT = "_global_alerts"  # the project a global channel's sealed secret is bound to
WEBHOOK, SMTP = "webhook", "smtp"
FORMATS = ("generic", "slack")
FIELDS = {"name", "url", "format", "secret", "secret_env", "password_env", "from", "to",
          "allow_http", "ca_file", "rules", "enabled"}
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
ENV_PATTERN = r"^CAP_ALERT_[A-Z0-9_]{1,100}$"
# ASCII only, and no \s: JSON Schema (ECMA) and Python disagree on which characters
# \s covers, and the schema's patterns must mean the same to clients and to the server.
EMAIL_PATTERN = r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]{1,64}@[A-Za-z0-9.-]{1,253}$"
# The URL forms a channel takes, one pattern each: the API's schema states them (one
# ``oneOf`` branch each) and ``validate`` refuses any other, so both say the same. A host
# is a DNS name or an IPv4 address (no IPv6 literal); a port 1-65535; the rest printable
# ASCII (percent-encode anything else).
_HOST = (r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
         r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")
_PORT = (r"(?::(?:6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}"
         r"|[1-9][0-9]{0,3}))?")
HTTPS_URL_PATTERN = rf"^[Hh][Tt][Tt][Pp][Ss]://{_HOST}{_PORT}(?:[/?#][!-~]*)?$"
HTTP_URL_PATTERN = rf"^[Hh][Tt][Tt][Pp]://{_HOST}{_PORT}(?:[/?#][!-~]*)?$"
SMTP_URL_PATTERN = rf"^[Ss][Mm][Tt][Pp][Ss]?://{_HOST}{_PORT}/?$"
SMTP_USER_URL_PATTERN = rf"^[Ss][Mm][Tt][Pp][Ss]?://[A-Za-z0-9._~%!$&'*+=-]+@{_HOST}{_PORT}/?$"
_NAME = re.compile(NAME_PATTERN)
_ENV = re.compile(ENV_PATTERN)
_EMAIL = re.compile(EMAIL_PATTERN)
_URLS = {name: re.compile(pattern) for name, pattern in (
    ("https", HTTPS_URL_PATTERN), ("http", HTTP_URL_PATTERN), ("smtp", SMTP_URL_PATTERN),
    ("smtp_user", SMTP_USER_URL_PATTERN))}
WEBHOOK_ONLY = ("secret", "secret_env", "format")
SMTP_ONLY = ("password_env", "from", "to")


def _fail(field: str, message: str) -> ValidationFailed:
    return ValidationFailed(f"alert channel {field}: {message}", errors={field: [message]})


def _unavailable(field: str, message: str) -> Conflict:
    """What the request names exists nowhere on this server (an unset variable, a
    missing file): a conflict with the server's state, not a malformed request."""
    return Conflict(f"alert channel {field}: {message}", errors={field: [message]})


def _matches(pattern: re.Pattern[str], value: Any) -> bool:
    # The whole value: Python's '$' would also let a final newline through (an email
    # header injection), which the schema's '$' (ECMA) does not.
    return isinstance(value, str) and pattern.fullmatch(value) is not None


def _env_name(field: str, value: Any) -> str:
    if not _matches(_ENV, value):
        raise _fail(field, "the name of a CAP_ALERT_* environment variable (e.g. "
                           "CAP_ALERT_SMTP_PASSWORD), never the secret itself")
    if not os.environ.get(value):
        raise _unavailable(field, f"environment variable {value} is not set in this process "
                                  "(set it on every api and worker pod)")
    return str(value)


def url_form(url: Any) -> str | None:
    """Which form of channel URL ``url`` is (https, http, smtp, smtp_user), if any."""
    for form, pattern in _URLS.items():
        if _matches(pattern, url):
            return form
    return None


def validate(spec: Any, *, rule_names: tuple[str, ...]) -> tuple[Doc, bytes | None]:
    """The stored fields of a channel, and the bytes to seal (webhook URL + secret).
    ValidationFailed names the first bad field (Conflict: a named variable or file that
    this server lacks); nothing is stored then."""
    if not isinstance(spec, dict):
        raise ValidationFailed("an alert channel is an object with name and url")
    unknown = sorted(set(spec) - FIELDS)
    if unknown:
        raise ValidationFailed(f"unknown alert channel fields: {', '.join(unknown)}",
                               errors={k: ["unknown field"] for k in unknown})
    name = spec.get("name")
    if not _matches(_NAME, name):
        raise _fail("name", "1-64 letters, digits, '.', '_' or '-'")
    name = str(name)
    url = spec.get("url")
    form = url_form(url) if isinstance(url, str) and len(url) <= 2000 else None
    if form is None:
        scheme = urlsplit(url).scheme.lower() if isinstance(url, str) and ":" in url else ""
        if scheme not in ("https", "http", "smtp", "smtps"):
            raise _fail("url", f"unknown scheme {scheme + '://' if scheme else '(none)'}: "
                               "use https:// (webhook), http:// with allow_http, smtp:// "
                               "(STARTTLS) or smtps:// (TLS)")
        netloc = url.split("/")[2] if isinstance(url, str) and url.count("/") >= 2 else ""
        if "@" in netloc and scheme in ("https", "http"):
            raise _fail("url", "no user or password in a webhook URL; use secret or "
                               "secret_env for signing")
        if ":" in netloc.rpartition("@")[0]:
            raise _fail("url", "no password in the URL; name a CAP_ALERT_* variable in "
                               "password_env")
        raise _fail("url", "https://host[:port][/path] (webhook), or smtp[s]://[user@]"
                           "host[:port] (no password: name it in password_env); a host is a "
                           "DNS name or an IPv4 address, the rest printable ASCII")
    url = str(url)
    parts = urlsplit(url)
    port = parts.port
    scheme = parts.scheme.lower()
    assert parts.hostname
    allow_http = spec.get("allow_http", False)
    if not isinstance(allow_http, bool):
        raise _fail("allow_http", "true or false")
    rules = spec.get("rules")
    if rules is not None and (not isinstance(rules, list) or not rules
                              or any(r not in rule_names for r in rules)):
        raise _fail("rules", f"a non-empty list of: {', '.join(rule_names)}")
    enabled = spec.get("enabled", True)
    if not isinstance(enabled, bool):
        raise _fail("enabled", "true or false")
    webhook = form in ("https", "http")
    for field in SMTP_ONLY if webhook else WEBHOOK_ONLY:
        if spec.get(field) is not None:
            raise _fail(field, "only for smtp:// and smtps:// channels" if webhook
                        else "only for webhook channels")
    ca_file = spec.get("ca_file")
    if ca_file is not None and not isinstance(ca_file, str):
        raise _fail("ca_file", "the path of a readable PEM file of CAs to trust")
    doc: Doc = {"name": name, "allow_http": allow_http, "ca_file": ca_file, "rules": rules,
                "enabled": enabled}
    if webhook:
        if form == "http" and not allow_http:
            raise _fail("url", "a webhook must use https:// (set allow_http: true to "
                               "allow plain http, e.g. inside the cluster)")
        fmt = spec.get("format", "generic")
        if fmt not in FORMATS:
            raise _fail("format", f"one of {', '.join(FORMATS)}")
        secret, secret_env = spec.get("secret"), spec.get("secret_env")
        if secret is not None and secret_env is not None:
            raise _fail("secret", "give secret or secret_env, not both")
        if secret is not None and (not isinstance(secret, str) or not 16 <= len(secret) <= 512):
            raise _fail("secret", "16-512 characters")
        _check_ca_file(ca_file)
        if secret_env is not None:
            secret_env = _env_name("secret_env", secret_env)
        hostport = parts.hostname + (f":{port}" if port else "")
        doc.update(type=WEBHOOK, format=fmt, secret_env=secret_env,
                   signed=bool(secret or secret_env),
                   target=f"{scheme}://{hostport}/…")
        sealed = json.dumps({"url": url, "secret": secret}).encode()
        return doc, sealed
    password_env = spec.get("password_env")
    username = parts.username
    if username and password_env is None:
        raise _fail("password_env", f"required with a user in the URL ({username}@...)")
    if password_env is not None and not username:
        raise _fail("password_env", "needs a user in the URL (smtp://user@host)")
    to = spec.get("to")
    if isinstance(to, str):
        to = [to]
    if not isinstance(to, list) or not 1 <= len(to) <= 20 or not all(
            _matches(_EMAIL, a) for a in to):
        raise _fail("to", "1-20 email addresses")
    sender = spec.get("from", "certautopilot@localhost")
    if not _matches(_EMAIL, sender):
        raise _fail("from", "an email address")
    _check_ca_file(ca_file)
    if password_env is not None:
        password_env = _env_name("password_env", password_env)
    tls = "starttls" if scheme == "smtp" else "tls"
    port = port or (587 if tls == "starttls" else 465)
    doc.update(type=SMTP, tls=tls, host=parts.hostname, port=port, username=username,
               password_env=password_env, to=to, sender=sender,
               target=f"{scheme}://{username + '@' if username else ''}"
                      f"{parts.hostname}:{port}")
    return doc, None


def _check_ca_file(ca_file: str | None) -> None:
    if ca_file is not None and not Path(ca_file).is_file():
        raise _unavailable("ca_file", f"no readable file {ca_file[:200]!r} on this server "
                                      "(a PEM of CAs to trust, on the api and worker pods)")


def public_view(doc: Doc) -> Doc:
    """A channel as shown to users (no sealed reference, no secret)."""
    hidden = {"_id", "sealed_id", "scope", "request_key"}
    view = {k: v for k, v in doc.items() if k not in hidden}
    view["id"] = doc["_id"]
    view["global"] = doc.get("project_id") is None
    return view


def create_channel(db: Database[Doc], project_id: str | None, spec: Any,
                   actor: audit.Actor, *, rule_names: tuple[str, ...],
                   request_key: str | None = None) -> Doc:
    """Validate and store a channel (``project_id`` None: a global channel). A taken
    name is a Conflict, except for the channel this ``request_key`` (an API request's
    idempotency reservation) already created: a retry that took over the key of a
    request whose process died after its commit gets that channel."""
    from app import keys

    fields, to_seal = validate(spec, rule_names=rule_names)
    scope = project_id or GLOBAL
    if project_id is not None:
        if db[dbm.PROJECTS].find_one({"_id": project_id}, {"_id": 1}) is None:
            raise NotFound(f"project {project_id:.64} not found")

    existing = dbm.primary(db)[dbm.ALERT_CHANNELS].find_one(
        {"scope": scope, "name": fields["name"]})
    if existing is not None:
        if request_key is not None and existing.get("request_key") == request_key:
            return existing
        raise Conflict(f"an alert channel named {fields['name']!r} exists in this scope")
    now = dbm.server_now(db)
    doc: Doc = {"_id": "chn_" + secrets.token_hex(8), "project_id": project_id,
                "scope": scope, **fields, "sealed_id": None, "next_seq": 0,
                "created_at": now, "updated_at": now, "failure": None,
                "last_success_at": None}
    if request_key is not None:
        doc["request_key"] = request_key

    def insert(session: ClientSession) -> None:
        if to_seal is not None:
            doc["sealed_id"] = keys.seal_secret(db, to_seal, project_id=project_id or
                                                KEY_PROJECT, purpose="alert.webhook",
                                                session=session, actor=actor)
        db[dbm.ALERT_CHANNELS].insert_one(doc, session=session)
        audit.record(db, session, actor=actor, action="alert_channel.create",
                     target=f"alert_channel:{doc['_id']}", project_id=project_id,
                     details={"name": fields["name"], "type": fields["type"],
                              "target": fields["target"], "signed": fields.get("signed"),
                              "rules": fields.get("rules")})

    try:
        dbm.transaction(db, insert, what="create alert channel")
    except DuplicateKeyError:  # the same name, created since the check above
        raise Conflict(f"an alert channel named {fields['name']!r} exists in this "
                       "scope") from None
    return doc


def get_channel(db: Database[Doc], ident: str, *, project_id: str | None = None,
                admin: bool = True) -> Doc:
    """A channel by id, or by name (a project's own first, then a global one)."""
    if not isinstance(ident, str) or not ident or len(ident) > 100:
        raise NotFound("alert channel not found")
    coll = dbm.primary(db)[dbm.ALERT_CHANNELS]
    doc = coll.find_one({"_id": ident})
    if doc is None:
        scopes = [project_id] if project_id else []
        for scope in [*scopes, GLOBAL]:
            doc = coll.find_one({"scope": scope, "name": ident})
            if doc is not None:
                break
        if doc is None and admin and project_id is None:
            doc = coll.find_one({"name": ident}, sort=[("created_at", 1)])
    if doc is None or (not admin and doc.get("project_id") != project_id):
        raise NotFound(f"alert channel {ident!r} not found")
    return doc


def list_channels(db: Database[Doc], project_id: str | None = None, *,
                  include_global: bool = True) -> list[Doc]:
    query: Doc = {}
    if project_id is not None:
        query = {"scope": {"$in": [project_id, GLOBAL]}} if include_global \
            else {"project_id": project_id}
    return list(db[dbm.ALERT_CHANNELS].find(query).sort("created_at", DESCENDING))


def delete_channel(db: Database[Doc], channel: Doc, actor: audit.Actor) -> None:
    """Remove a channel, its sealed secret and its undelivered messages."""

    def remove(session: ClientSession) -> None:
        db[dbm.ALERT_CHANNELS].delete_one({"_id": channel["_id"]}, session=session)
        if channel.get("sealed_id"):
            db[dbm.KEYS].delete_one({"_id": channel["sealed_id"]}, session=session)
        dropped = db[dbm.ALERT_DELIVERIES].delete_many(
            {"channel_id": channel["_id"], "state": "pending"}, session=session).deleted_count
        audit.record(db, session, actor=actor, action="alert_channel.delete",
                     target=f"alert_channel:{channel['_id']}",
                     project_id=channel.get("project_id"),
                     details={"name": channel.get("name"), "dropped_pending": dropped})

    dbm.transaction(db, remove, what="delete alert channel")


def open_webhook(db: Database[Doc], channel: Doc) -> tuple[str, bytes | None]:
    """The webhook URL and signing secret (in memory only, while sending)."""
    from app.keys import open_private_key

    raw = json.loads(open_private_key(db, channel["sealed_id"],
                                      project_id=channel.get("project_id") or KEY_PROJECT))
    secret: str | None = raw.get("secret")
    if channel.get("secret_env"):
        secret = os.environ.get(channel["secret_env"])
        if not secret:
            from app.errors import Unavailable

            raise Unavailable(f"{channel['secret_env']} is not set in this process (the "
                              f"signing secret of alert channel {channel['name']})")
    return str(raw["url"]), secret.encode() if secret else None
