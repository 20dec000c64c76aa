"""Writing audit entries: a gap-free ``seq`` and a hash chain, in the caller's transaction.

The chain head (last seq and hash) lives in one ``counters`` document. Reading and
advancing it inside the mutation's transaction serialises concurrent writers (a write
conflict aborts and retries the loser), so committed entries form a gap-free sequence:
an aborted transaction takes its entry and its seq with it, and entries commit in seq
order (what the forwarders rely on). ``scripts/bench/audit.py`` measures what this costs
with 8 concurrent writers: about a third of the audited transactions retry once, and the
audited/unaudited throughput ratio stays what it is with one writer (≈ 0.45 on the
embedded server, where the three extra operations per mutation dominate), so the
counter is not the bottleneck and the sealer design the issue allows (chain entries
after commit) is not needed: its unchained window and a sealer that would chain forged
pending entries are worse trades than these retries.

Each entry's ``hash`` covers the previous entry's hash and the canonical JSON of the
entry (every field but ``_id`` and ``hash``). With ``CAP_AUDIT_HMAC_KEY`` set it is an
HMAC-SHA256 (``hash_alg: "hmac-sha256"``), so someone who can write to the database but
does not hold the key cannot rewrite the chain consistently.
"""

from __future__ import annotations

import hashlib
import hmac
import json
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

from app import db as dbm
from app.logs import request_id_var

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


def build_entry(*, seq: int, prev_hash: str, time: datetime, actor: Actor, action: str,
                target: str, project_id: Any, details: dict[str, Any] | None,
                request_id: str | None, key: bytes | None) -> dict[str, Any]:
    """The document ``record()`` stores (also used by tests and the benchmark to build
    chains): every field, then its hash."""
    if not _ACTION.match(action) or len(action) > 100:
        raise ValueError(f"audit action {action!r} is not dotted lower case, e.g. "
                         "'certificate.create'")
    if not isinstance(target, str) or not target or len(target) > 500:
        raise ValueError("audit target must be a non-empty string such as 'certificate:<id>'")
    time = time.astimezone(UTC)
    entry: dict[str, Any] = {
        "seq": seq,
        "time": time.replace(microsecond=time.microsecond // 1000 * 1000),  # BSON: ms
        "actor": actor.as_doc(),
        "project_id": str(project_id) if project_id is not None else None,
        "action": action,
        "target": target,
        "details": plain_details(details or {}),
        "request_id": request_id,
        "prev_hash": prev_hash,
        "hash_alg": ALG_HMAC if key else ALG_SHA256,
    }
    entry["hash"] = entry_hash(prev_hash, entry, key)
    return entry


def record(db: Database[dict[str, Any]], session: ClientSession, *, actor: Actor,
           action: str, target: str, project_id: Any = None,
           details: dict[str, Any] | None = None, request_id: str | None = None) -> int:
    """Append one audit entry inside ``session``'s transaction; return its seq.

    ``details`` must hold no secret (keys such as ``token`` or ``private_key`` and PEM
    private keys are refused with ValueError). ``action`` is dotted, e.g.
    "certificate.create"; ``target`` names the object, e.g. "certificate:<id>".
    """
    if not session.in_transaction:
        raise RuntimeError("audit.record must run inside the mutation's transaction")
    counters = db[dbm.COUNTERS]
    head = counters.find_one({"_id": CHAIN_ID}, session=session) or {}
    seq = int(head.get("seq", 0)) + 1
    entry = build_entry(
        seq=seq, prev_hash=head.get("hash", GENESIS_HASH), time=datetime.now(UTC),
        actor=actor, action=action, target=target, project_id=project_id, details=details,
        request_id=request_id or request_id_var.get(), key=hmac_key())
    counters.update_one({"_id": CHAIN_ID}, {"$set": {"seq": seq, "hash": entry["hash"]}},
                        upsert=True, session=session)
    db[dbm.AUDIT].insert_one(entry, session=session)
    return seq
