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

The reservation is held by the api process that runs the request (``owner``) under a
short lease (``LEASE_SECONDS``) that a thread of that process renews while the request
runs. A request that finds the key held by a running first request waits for it (up
to ``WAIT_SECONDS``): when the first one finishes, its answer is replayed; when its
process died (kill -9, an OOM; a load balancer then re-sends the request to another
replica), its lease lapses within ``LEASE_SECONDS`` and the waiting request takes the
key over and runs. Only a first request still running after the wait gets the 409 with
``Retry-After``. A process that died after the mutation committed and before storing
the answer makes the takeover run the view again (job dedupe keys and unique names in
the domain keep that from creating twice; the answer may then be a 409 conflict). A
create whose object records the reservation it was made under (``current_key()``, as
projects and certificates do) answers such a takeover (``taken_over()``) with the object
the dead request created, as the first answer would have.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from datetime import timedelta
from functools import partial
from typing import Any

from flask import Response, g, request
from pymongo.database import Database
from pymongo.errors import DuplicateKeyError

from app import db as dbm
from app.api.common import BadRequest
from app.db.lease import process_identity
from app.db.names import IDEMPOTENCY
from app.errors import Conflict

log = logging.getLogger(__name__)

HEADER = "Idempotency-Key"
TTL = timedelta(hours=24)
# The owner's lease on a running reservation, renewed every RENEW_SECONDS while the
# request runs: what a dead owner's retry waits at most. Generous against a slow
# database (a renewal late by more than LEASE - RENEW lets a retry run concurrently).
LEASE_SECONDS = 15.0
RENEW_SECONDS = 3.0
# How long a request waits for a running first request with its key before the 409.
WAIT_SECONDS = 20.0
POLL_SECONDS = 0.25
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


class _Keeper:
    """This process's running reservations, their leases renewed by one thread."""

    def __init__(self) -> None:
        self.owner = process_identity()
        self.held: dict[str, Database[dict[str, Any]]] = {}
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name="idempotency-leases",
                                       daemon=True)
        self.thread.start()

    def hold(self, db: Database[dict[str, Any]], record_id: str) -> None:
        with self.lock:
            self.held[record_id] = db

    def drop(self, record_id: str) -> None:
        with self.lock:
            self.held.pop(record_id, None)

    def _run(self) -> None:
        while True:
            time.sleep(RENEW_SECONDS)
            with self.lock:
                held = list(self.held.items())
            by_db: dict[tuple[int, str], tuple[Database[dict[str, Any]], list[str]]] = {}
            for record_id, db in held:
                by_db.setdefault((id(db.client), db.name), (db, []))[1].append(record_id)
            for db, ids in by_db.values():
                try:
                    until = dbm.server_now(db) + timedelta(seconds=LEASE_SECONDS)
                    db[IDEMPOTENCY].update_many(
                        {"_id": {"$in": ids}, "owner": self.owner, "state": "running"},
                        {"$set": {"lease_until": until}})
                except Exception as exc:  # noqa: BLE001 - the next round tries again
                    log.warning("could not renew idempotency key leases",
                                extra={"error": f"{exc.__class__.__name__}: {exc}"[:200]})


_keepers: dict[int, _Keeper] = {}
_keepers_lock = threading.Lock()


def _keeper() -> _Keeper:
    """One per process (gunicorn forks its workers after the app is built)."""
    with _keepers_lock:
        keeper = _keepers.get(os.getpid())
        if keeper is None:
            keeper = _keepers[os.getpid()] = _Keeper()
        return keeper


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
    keeper = _keeper()
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        now = dbm.server_now(db)
        lease_until = now + timedelta(seconds=LEASE_SECONDS)
        reservation = {
            "_id": record_id, "fingerprint": wanted, "state": "running",
            "owner": keeper.owner, "created_at": now, "lease_until": lease_until,
            "expires_at": now + TTL}
        try:
            dbm.retry(partial(collection.insert_one, reservation),
                      what="reserve idempotency key")
            _running(keeper, db, record_id)
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
        if doc.get("lease_until") and doc["lease_until"] < now:
            # The first request's process died: take the key over and run.
            taken = dbm.retry(partial(
                collection.update_one,
                {"_id": record_id, "state": "running", "lease_until": doc["lease_until"]},
                {"$set": {"owner": keeper.owner, "lease_until": lease_until}}),
                what="take over idempotency key")
            if taken.modified_count == 1:
                log.info("took over an idempotency key whose first request's process "
                         "stopped", extra={"previous_owner": doc.get("owner")})
                _running(keeper, db, record_id)
                g.idempotency_taken_over = True
                return None
        if time.monotonic() >= deadline:
            raise Conflict(f"a request with this {HEADER} is still running; retry shortly",
                           retry_after=1)
        time.sleep(POLL_SECONDS)  # the first request is running: wait for its answer


def current_key() -> str | None:
    """The reservation this request runs under (None without an ``Idempotency-Key``): a
    create stores it on its object, so a takeover after its process died finds the
    object that request committed instead of failing on its unique name."""
    value = g.get("idempotency_id")
    return value if isinstance(value, str) else None


def taken_over() -> bool:
    """Whether this request took its key over from a first request whose process died
    (which may have committed its create before it could store the answer): a create
    that records ``current_key()`` on its object then looks for that object first."""
    return bool(g.get("idempotency_taken_over"))


def retaken_key() -> str | None:
    """``current_key()`` when this request took the key over from a first request whose
    process died (see ``taken_over``), else None: a create that has no unique name to
    meet looks up what that first request made under the key with it."""
    key = current_key()
    return key if key is not None and taken_over() else None


def _running(keeper: _Keeper, db: Database[dict[str, Any]], record_id: str) -> None:
    g.idempotency_id = record_id
    keeper.hold(db, record_id)


def finish(db: Database[dict[str, Any]], response: Response) -> None:
    """after_request: store the answer, or release the key after a server error."""
    record_id = g.pop("idempotency_id", None)
    if record_id is None:
        return
    _keeper().drop(record_id)
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
