"""``Idempotency-Key`` for every POST of the API.

The first POST with a key reserves ``{_id: "<token id>:<sha256(key)>"}`` in
``api_idempotency`` (a unique insert, so of two concurrent first requests only one runs)
together with a fingerprint of the request (method, path, query and canonical JSON
body). When the view has answered, the answer (status, body, a few headers) is stored in
that record for 24 hours (TTL index). Then:

- the same key and the same request: the stored answer is returned, with
  ``Idempotent-Replayed: true``; nothing runs again (no second enqueue, no second audit);
- the same key and another request: 409 (the key's stored request conflicts with this
  one; not a 422: the request itself is well formed, and only the server's state makes
  it wrong, so clients and fuzzers reading the schema agree with the server);
- the same key while the first request is still running: 409 with ``Retry-After``;
- a first request that ended in a 5xx releases its key, so the client can retry it.

An answer that holds a secret shown once (a new token) is stored with that field
replaced by a placeholder (views set ``g.idempotency_redact``): a replay tells the
client the token's id, never its plaintext.

A process that dies after the mutation and before storing the answer leaves the key
reserved; after ``LEASE_SECONDS`` a retry with that key runs again (job dedupe keys in
the domain code keep that from enqueueing twice).
"""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta
from functools import partial
from typing import Any

from flask import Response, g, request
from pymongo.database import Database
from pymongo.errors import DuplicateKeyError

from app import db as dbm
from app.api.common import BadRequest
from app.db.names import IDEMPOTENCY
from app.domain.projects import now_ms
from app.errors import Conflict

HEADER = "Idempotency-Key"
TTL = timedelta(hours=24)
LEASE_SECONDS = 120
_KEPT_HEADERS = ("Content-Type", "Location", "ETag", "Cache-Control")

HEADER_PARAM = {
    "in": "header", "name": HEADER, "required": False,
    "schema": {"type": "string", "minLength": 1, "maxLength": 255,
               "pattern": "^[\\x21-\\x7e]+$"},
    "description": "Makes the POST safe to retry: a repeat with the same key returns "
                   "the first answer (24 h); the same key with another request is 409.",
}


class IdempotencyKeyReused(Conflict):
    code = "idempotency_key_reused"


def fingerprint() -> str:
    body = request.get_data(cache=True)
    try:
        canonical = json.dumps(json.loads(body), sort_keys=True, separators=(",", ":"))
        body_repr = canonical.encode()
    except (ValueError, UnicodeDecodeError):
        body_repr = body
    digest = hashlib.sha256()
    for part in (request.method.encode(), request.path.encode(),
                 request.query_string, body_repr):
        digest.update(hashlib.sha256(part).digest())
    return digest.hexdigest()


def _replay(doc: dict[str, Any]) -> Response:
    response = Response(doc["body"], status=int(doc["status"]))
    for key, value in (doc.get("headers") or {}).items():
        response.headers[key] = value
    response.headers["Idempotent-Replayed"] = "true"
    return response


def begin(db: Database[dict[str, Any]], token_id: str) -> Response | None:
    """before_request for POSTs with the header: a replayed answer, or None to run the
    view (the key is then reserved and ``finish`` stores the answer)."""
    key = request.headers.get(HEADER)
    if key is None:
        return None
    if not 1 <= len(key) <= 255 or not all(0x21 <= ord(c) <= 0x7E for c in key):
        raise BadRequest(f"{HEADER} must be 1-255 visible ASCII characters",
                         errors={"headers": {HEADER: ["invalid"]}})
    record_id = f"{token_id}:{hashlib.sha256(key.encode()).hexdigest()}"
    wanted = fingerprint()
    collection = db[IDEMPOTENCY]
    for _ in range(3):
        now = now_ms()
        reservation = {
            "_id": record_id, "fingerprint": wanted, "state": "running",
            "created_at": now, "lease_until": now + timedelta(seconds=LEASE_SECONDS),
            "expires_at": now + TTL}
        try:
            dbm.retry(partial(collection.insert_one, reservation),
                      what="reserve idempotency key")
            g.idempotency_id = record_id
            return None
        except DuplicateKeyError:
            pass
        doc = dbm.retry(lambda: collection.find_one({"_id": record_id}),
                        what="read idempotency key")
        if doc is None:
            continue  # expired between our insert and read: try again
        if doc.get("fingerprint") != wanted:
            raise IdempotencyKeyReused(
                f"this {HEADER} was already used with a different request; use a new key",
                errors={"headers": {HEADER: ["reused with a different request"]}})
        if doc.get("state") == "done":
            return _replay(doc)
        server_now = dbm.server_now(db)
        if doc.get("lease_until") and doc["lease_until"] < server_now:
            taken = dbm.retry(partial(
                collection.update_one,
                {"_id": record_id, "state": "running", "lease_until": doc["lease_until"]},
                {"$set": {"lease_until": server_now + timedelta(seconds=LEASE_SECONDS)}}),
                what="take over idempotency key")
            if taken.modified_count == 1:
                g.idempotency_id = record_id
                return None
        raise Conflict(f"a request with this {HEADER} is still running; retry shortly",
                       retry_after=1)
    raise Conflict(f"could not reserve this {HEADER}; retry", retry_after=1)


def finish(db: Database[dict[str, Any]], response: Response) -> None:
    """after_request: store the answer, or release the key after a server error."""
    record_id = g.pop("idempotency_id", None)
    if record_id is None:
        return
    collection = db[IDEMPOTENCY]
    if response.status_code >= 500:
        dbm.retry(lambda: collection.delete_one({"_id": record_id, "state": "running"}),
                  what="release idempotency key")
        return
    headers = {k: response.headers[k] for k in _KEPT_HEADERS if k in response.headers}
    body = response.get_data(as_text=True)
    redact: dict[str, str] = g.pop("idempotency_redact", None) or {}
    if redact:  # a secret shown once (a new token's plaintext) is never stored
        try:
            data = json.loads(body)
            data.update({k: v for k, v in redact.items() if k in data})
            body = json.dumps(data)
        except (ValueError, AttributeError):
            body = json.dumps({"redacted": True})
    dbm.retry(lambda: collection.update_one(
        {"_id": record_id, "state": "running"},
        {"$set": {"state": "done", "status": response.status_code, "body": body,
                  "headers": headers}}), what="store idempotent answer")
