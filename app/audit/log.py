"""Writing audit entries: in the mutation's transaction, then chained (gap-free ``seq``,
hash chain) right after it commits.

``record()`` inserts the entry into ``audit_pending`` inside the caller's transaction, so
it commits or aborts with the mutation (invariant 4). ``seal()`` then moves committed
pending entries into ``audit``, giving each the next ``seq``, the previous entry's hash
and its own hash, in one short transaction that advances the chain head (last seq and
hash, one ``counters`` document). The transaction runner calls ``seal()`` after each
commit that recorded an entry (``app.db.txn.after_commit``); the ``audit.forward`` job
calls it every 10 s for entries whose writer died between its commit and its seal.

Why not advance the head inside every mutation's transaction (the first design): every
audited transaction then wrote the one head document, so any two that overlapped in time
conflicted and the loser re-ran all of its work. Renewals that hold a transaction for
a whole certificate store, under worker kills, spent most of their time in those
retries (the HA drills: 2,312 job-transaction retries in 10 minutes at 200
certificates). Only the sealer's short transactions touch the head now. What the chain
promises is unchanged: sealed entries form a gap-free sequence, commit in seq order
(what the forwarders rely on), and an aborted mutation leaves no entry. An entry's seq
follows the order its mutation committed in closely, not strictly (a batch is chained
in ``_id`` order).

Each entry's ``hash`` covers the previous entry's hash and the canonical JSON of the
entry (every field but ``_id`` and ``hash``). With ``CAP_AUDIT_HMAC_KEY`` set it is an
HMAC-SHA256 (``hash_alg: "hmac-sha256"``), so someone who can write to the database but
does not hold the key cannot rewrite the chain consistently; a pending entry then
carries an HMAC too (``mac``), and the sealer refuses one it does not match (forged
into ``audit_pending``): it stays there marked ``refused`` and ``audit verify`` fails on
it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import os
import re
import socket
import uuid
from dataclasses import dataclass
from datetime import UTC, date, datetime
from enum import Enum
from typing import Any

from bson import ObjectId
from pymongo.client_session import ClientSession
from pymongo.database import Database
from pymongo.errors import PyMongoError

from app import db as dbm
from app.logs import request_id_var

log = logging.getLogger("app.audit")

CHAIN_ID = "audit"
GENESIS_HASH = "0" * 64
ALG_SHA256 = "sha256"
ALG_HMAC = "hmac-sha256"

# Detail keys that would hold a secret. A mutation that tries to audit one fails loudly
# (in its tests) rather than writing a secret into a log that is kept forever.
SECRET_KEYS = frozenset({
    "password", "passphrase", "secret", "token", "api_token", "bearer", "authorization",
    "private_key", "private_key_pem", "key_pem", "pem_key", "kek", "dek", "hmac_key",
    "eab_hmac_key", "client_secret", "plaintext",
})
_SECRET_SUFFIXES = ("_secret", "_password", "_private_key", "_hmac_key")
_PEM_PRIVATE = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----")
_ACTION = re.compile(r"^[a-z][a-z0-9_-]*(\.[a-z0-9_-]+)+$")


@dataclass(frozen=True)
class Actor:
    """Who made a change: an API token (kind "token", id = token id) or a system role
    (kind "system", id = "worker@host", "scheduler@host", "cli@host", ...)."""

    kind: str
    id: str

    def as_doc(self) -> dict[str, str]:
        return {"kind": self.kind, "id": self.id}


def system_actor(role: str) -> Actor:
    return Actor("system", f"{role}@{socket.gethostname()}")


def _iso(value: datetime) -> str:
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat(timespec="milliseconds")


def _json_default(value: Any) -> Any:
    """Only for entries stored before details were normalised, and the entry's time."""
    if isinstance(value, datetime):
        return _iso(value)
    if isinstance(value, (ObjectId, uuid.UUID)):
        return str(value)
    raise TypeError(f"{value.__class__.__name__} is not JSON serialisable")


def canonical_json(entry: dict[str, Any]) -> bytes:
    """Canonical form of an entry without its hash: sorted keys, no spaces, UTF-8."""
    body = {k: v for k, v in entry.items() if k != "_id" and k != "hash"}
    time = body.get("time")
    if isinstance(time, datetime):
        body["time"] = _iso(time)
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      default=_json_default, allow_nan=False).encode()


def entry_hash(prev_hash: str, entry: dict[str, Any], key: bytes | None = None) -> str:
    """SHA-256 over the previous hash and the entry's canonical JSON; an HMAC under
    ``key`` when the entry says ``hash_alg: "hmac-sha256"`` (or, for an entry being built,
    when a key is given)."""
    message = prev_hash.encode() + b"\n" + canonical_json(entry)
    alg = entry.get("hash_alg") or (ALG_HMAC if key else ALG_SHA256)
    if alg == ALG_HMAC:
        if not key:
            raise MissingKey("the entry is HMAC-protected and CAP_AUDIT_HMAC_KEY is not set")
        return hmac.new(key, message, hashlib.sha256).hexdigest()
    return hashlib.sha256(message).hexdigest()


class MissingKey(RuntimeError):
    """An HMAC-protected entry cannot be checked without CAP_AUDIT_HMAC_KEY."""


_key_cache: tuple[str | None, bytes | None] = (None, None)


def hmac_key() -> bytes | None:
    """CAP_AUDIT_HMAC_KEY, validated by ``app.config`` (read from the environment each
    call, so a process and its tests see the value they were started with)."""
    global _key_cache
    raw = os.environ.get("CAP_AUDIT_HMAC_KEY") or None
    if raw is None:
        return None
    if _key_cache[0] != raw:
        from app.config import audit_hmac_key

        _key_cache = (raw, audit_hmac_key({"CAP_AUDIT_HMAC_KEY": raw}))
    return _key_cache[1]


def _is_secret_key(key: str) -> bool:
    lowered = key.lower()
    return lowered in SECRET_KEYS or lowered.endswith(_SECRET_SUFFIXES)


def plain_details(value: Any, path: str = "details") -> Any:
    """``value`` as plain JSON (what is stored is exactly what is hashed): datetimes as
    ISO-8601 UTC strings, ObjectIds and UUIDs as strings, tuples as lists. Refuses types
    JSON cannot hold and anything that looks like a secret."""
    if value is None or isinstance(value, (bool, str)):
        if isinstance(value, str) and _PEM_PRIVATE.search(value):
            raise ValueError(f"audit {path} holds a private key")
        return value
    if isinstance(value, int):
        if not -(2**63) <= value < 2**63:
            raise ValueError(f"audit {path} is an integer out of the 64-bit range")
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"audit {path} is not a finite number")
        return value
    if isinstance(value, Enum):
        return plain_details(value.value, path)
    if isinstance(value, datetime):
        return _iso(value)
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, (ObjectId, uuid.UUID)):
        return str(value)
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"audit {path} has a non-string key {key!r}")
            if _is_secret_key(key):
                raise ValueError(f"audit {path}.{key} would store a secret: leave it out")
            out[key] = plain_details(item, f"{path}.{key}")
        return out
    if isinstance(value, (list, tuple)):
        return [plain_details(item, f"{path}[{i}]") for i, item in enumerate(value)]
    raise ValueError(f"audit {path} is a {value.__class__.__name__}, not a JSON value")


def _validated(action: str, target: str) -> None:
    if not _ACTION.match(action) or len(action) > 100:
        raise ValueError(f"audit action {action!r} is not dotted lower case, e.g. "
                         "'certificate.create'")
    if not isinstance(target, str) or not target or len(target) > 500:
        raise ValueError("audit target must be a non-empty string such as 'certificate:<id>'")


def _body(*, time: datetime, actor: Actor, action: str, target: str, project_id: Any,
          details: dict[str, Any] | None, request_id: str | None,
          key: bytes | None) -> dict[str, Any]:
    """An entry's fields before it is chained (no seq, prev_hash or hash)."""
    _validated(action, target)
    time = time.astimezone(UTC)
    return {
        "time": time.replace(microsecond=time.microsecond // 1000 * 1000),  # BSON: ms
        "actor": actor.as_doc(),
        "project_id": str(project_id) if project_id is not None else None,
        "action": action,
        "target": target,
        "details": plain_details(details or {}),
        "request_id": request_id,
        "hash_alg": ALG_HMAC if key else ALG_SHA256,
    }


def _chained(body: dict[str, Any], *, seq: int, prev_hash: str,
             key: bytes | None) -> dict[str, Any]:
    entry: dict[str, Any] = {"seq": seq, **body, "prev_hash": prev_hash}
    entry["hash"] = entry_hash(prev_hash, entry, key)
    return entry


def build_entry(*, seq: int, prev_hash: str, time: datetime, actor: Actor, action: str,
                target: str, project_id: Any, details: dict[str, Any] | None,
                request_id: str | None, key: bytes | None) -> dict[str, Any]:
    """A chained entry as the sealer stores it (for tests and the benchmark, which build
    chains directly): every field, then its hash."""
    body = _body(time=time, actor=actor, action=action, target=target,
                 project_id=project_id, details=details, request_id=request_id, key=key)
    return _chained(body, seq=seq, prev_hash=prev_hash, key=key)


def pending_mac(pending: dict[str, Any], key: bytes) -> str:
    """The HMAC a writer puts on its pending entry (over its ``_id`` and fields), so the
    sealer chains only entries written by a holder of CAP_AUDIT_HMAC_KEY."""
    body = {k: v for k, v in pending.items() if k not in ("_id", "mac", "refused")}
    message = b"pending\n" + str(pending["_id"]).encode() + b"\n" + canonical_json(body)
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def record(db: Database[dict[str, Any]], session: ClientSession, *, actor: Actor,
           action: str, target: str, project_id: Any = None,
           details: dict[str, Any] | None = None, request_id: str | None = None) -> ObjectId:
    """Write one audit entry inside ``session``'s transaction; return its ``_id``.

    The entry commits or aborts with the mutation. It is written to ``audit_pending`` and
    chained into ``audit`` (seq, prev_hash, hash) right after the commit by ``seal()``
    (``app.db.txn.after_commit``; a process that dies in between leaves it to the next
    ``seal()`` anywhere, at the latest the ``audit.forward`` job's, every 10 s).

    ``details`` must hold no secret (keys such as ``token`` or ``private_key`` and PEM
    private keys are refused with ValueError). ``action`` is dotted, e.g.
    "certificate.create"; ``target`` names the object, e.g. "certificate:<id>".
    """
    if not session.in_transaction:
        raise RuntimeError("audit.record must run inside the mutation's transaction")
    key = hmac_key()
    pending: dict[str, Any] = {"_id": ObjectId(), **_body(
        time=datetime.now(UTC), actor=actor, action=action, target=target,
        project_id=project_id, details=details,
        request_id=request_id or request_id_var.get(), key=key)}
    if key:
        pending["mac"] = pending_mac(pending, key)
    db[dbm.AUDIT_PENDING].insert_one(pending, session=session)
    dbm.after_commit(session, "audit.seal", lambda: seal(db))
    return pending["_id"]


SEAL_BATCH = 500


NO_KEY_HERE = "no CAP_AUDIT_HMAC_KEY here"


def _refusal(pending: dict[str, Any], key: bytes | None) -> str | None:
    """Why the sealer will not chain ``pending`` (NO_KEY_HERE: not this sealer, one that
    holds the key will), or None."""
    alg = pending.get("hash_alg")
    if alg == ALG_HMAC:
        if not key:
            return NO_KEY_HERE
        mac = pending.get("mac")
        if not isinstance(mac, str) or not hmac.compare_digest(mac, pending_mac(pending, key)):
            return "its HMAC does not match: not written by a holder of CAP_AUDIT_HMAC_KEY"
        return None
    if alg != ALG_SHA256:
        return f"unknown hash_alg {alg!r}"
    if key:
        return "a plain SHA-256 entry while CAP_AUDIT_HMAC_KEY is set: not written by a key holder"
    return None


def _seal_batch(db: Database[dict[str, Any]], session: ClientSession, key: bytes | None,
                limit: int) -> tuple[int, int]:
    """Chain up to ``limit`` pending entries; return (chained, refused)."""
    pending_coll = db[dbm.AUDIT_PENDING]
    pending = list(pending_coll.find({"refused": {"$exists": False}}, session=session,
                                     sort=[("_id", 1)], limit=limit))
    if not pending:
        return 0, 0
    counters = db[dbm.COUNTERS]
    head = counters.find_one({"_id": CHAIN_ID}, session=session) or {}
    seq, prev = int(head.get("seq", 0)), str(head.get("hash", GENESIS_HASH))
    entries, refused = [], []
    for doc in pending:
        why = _refusal(doc, key)
        if why == NO_KEY_HERE:
            continue
        if why is not None:
            refused.append((doc["_id"], why))
            continue
        body = {k: v for k, v in doc.items() if k not in ("_id", "mac")}
        seq += 1
        entry = {"_id": doc["_id"], **_chained(body, seq=seq, prev_hash=prev, key=key)}
        prev = entry["hash"]
        entries.append(entry)
    if entries:
        # The head first: two sealers that read the same pending entries conflict here.
        counters.update_one({"_id": CHAIN_ID}, {"$set": {"seq": seq, "hash": prev}},
                            upsert=True, session=session)
        db[dbm.AUDIT].insert_many(entries, session=session)
        pending_coll.delete_many({"_id": {"$in": [e["_id"] for e in entries]}},
                                 session=session)
    for _id, why in refused:
        pending_coll.update_one({"_id": _id}, {"$set": {"refused": why}}, session=session)
    return len(entries), len(refused)


WRITE_CONFLICT = 112
SEAL_ROUNDS = 20


def seal(db: Database[dict[str, Any]], *, limit: int = SEAL_BATCH, attempts: int = 30) -> int:
    """Chain every committed pending entry into ``audit``, oldest ``_id`` first: in one
    short transaction per ``limit`` entries, each advancing the chain head (seq and hash in
    ``counters``). An entry is chained once (it moves from ``audit_pending`` to ``audit``
    in the transaction that chains it). An entry the sealer refuses (see ``_refusal``)
    stays in ``audit_pending`` marked ``refused``; ``audit verify`` reports it. Returns
    how many entries this call chained.

    Concurrent sealers conflict on the head, and the loser stops at once: the winner
    seals again after each batch that chained something, until one finds nothing new
    (at most SEAL_ROUNDS batches), and that next batch reads after the loser's
    mutation committed (the loser's seal began after it, and the winner's batch
    committed after that seal's snapshot or held the head then). So under load one
    process ends up sealing for all, in batches, and the others do not retry. Other
    transient errors (a step-down, a dropped connection) are retried here; what is left
    pending (a winner that died) is sealed by the next ``seal()`` anywhere, at the latest
    by the ``audit.forward`` job."""
    from app.db.txn import run

    def conflict(exc: PyMongoError) -> bool:
        return getattr(exc, "code", None) == WRITE_CONFLICT

    key = hmac_key()
    sealed = 0
    for _ in range(SEAL_ROUNDS):
        try:
            chained, refused = run(db, lambda session: _seal_batch(db, session, key, limit),
                                   attempts=attempts, what="audit seal", stop_on=conflict)
        except PyMongoError as exc:
            if not conflict(exc):
                raise
            log.debug("audit seal conflicted: another sealer goes on",
                      extra={"event": "audit.seal_conflict"})
            return sealed
        sealed += chained
        if refused:
            log.error("audit entries refused by the sealer (audit verify names them)",
                      extra={"event": "audit.pending_refused", "count": refused})
        if chained == 0 or oldest_pending(db, sealable=True) is None:
            break
    return sealed


def oldest_pending(db: Database[dict[str, Any]], *,
                   sealable: bool = False) -> dict[str, Any] | None:
    """The oldest entry waiting in ``audit_pending`` (only its ``_id``; with ``sealable``,
    the oldest one not refused), or None."""
    query = {"refused": {"$exists": False}} if sealable else {}
    return db[dbm.AUDIT_PENDING].find_one(query, {"_id": 1}, sort=[("_id", 1)])


def pending_age_seconds(entry: dict[str, Any], now: datetime) -> float:
    """How long ``entry`` (from ``oldest_pending``) has waited, by its ``_id``'s time."""
    return max(0.0, (now - entry["_id"].generation_time).total_seconds())
