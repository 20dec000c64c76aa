"""Writing audit entries: a gap-free ``seq`` and a hash chain, in the caller's transaction.

The chain head (last seq and hash) lives in one ``counters`` document. Reading and
advancing it inside the mutation's transaction serialises concurrent writers (a write
conflict aborts and retries the loser), so committed entries form a gap-free sequence:
an aborted transaction takes its entry and its seq with it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import socket
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from bson import ObjectId
from pymongo.client_session import ClientSession
from pymongo.database import Database

from app import db as dbm
from app.logs import request_id_var

CHAIN_ID = "audit"
GENESIS_HASH = "0" * 64


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


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.astimezone(UTC).isoformat(timespec="milliseconds")
    if isinstance(value, ObjectId):
        return str(value)
    return value


def canonical_json(entry: dict[str, Any]) -> bytes:
    """Canonical form of an entry without its hash: sorted keys, no spaces, UTF-8."""
    body = {k: v for k, v in entry.items() if k not in ("_id", "hash")}
    return json.dumps(_plain(body), sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode()


def _hmac_key() -> bytes | None:
    key = os.environ.get("CAP_AUDIT_HMAC_KEY")
    return key.encode() if key else None


def entry_hash(prev_hash: str, entry: dict[str, Any], key: bytes | None = None) -> str:
    """SHA-256 over the previous hash and the entry's canonical JSON; an HMAC when a key
    is configured (CAP_AUDIT_HMAC_KEY), so a database writer cannot forge the chain."""
    message = prev_hash.encode() + b"\n" + canonical_json(entry)
    if key:
        return hmac.new(key, message, hashlib.sha256).hexdigest()
    return hashlib.sha256(message).hexdigest()


def record(db: Database[dict[str, Any]], session: ClientSession, *, actor: Actor,
           action: str, target: str, project_id: Any = None,
           details: dict[str, Any] | None = None, request_id: str | None = None) -> int:
    """Append one audit entry inside ``session``'s transaction; return its seq.

    ``details`` must hold no secret. ``action`` is dotted, e.g. "certificate.create";
    ``target`` names the object, e.g. "certificate:<id>".
    """
    if not session.in_transaction:
        raise RuntimeError("audit.record must run inside the mutation's transaction")
    counters = db[dbm.COUNTERS]
    head = counters.find_one({"_id": CHAIN_ID}, session=session) or {}
    seq = int(head.get("seq", 0)) + 1
    prev_hash = head.get("hash", GENESIS_HASH)
    now = datetime.now(UTC)
    now = now.replace(microsecond=now.microsecond // 1000 * 1000)  # BSON keeps milliseconds
    entry: dict[str, Any] = {
        "seq": seq,
        "time": now,
        "actor": actor.as_doc(),
        "project_id": str(project_id) if project_id is not None else None,
        "action": action,
        "target": target,
        "details": details or {},
        "request_id": request_id or request_id_var.get(),
        "prev_hash": prev_hash,
    }
    entry["hash"] = entry_hash(prev_hash, entry, _hmac_key())
    counters.update_one({"_id": CHAIN_ID}, {"$set": {"seq": seq, "hash": entry["hash"]}},
                        upsert=True, session=session)
    db[dbm.AUDIT].insert_one(entry, session=session)
    return seq
