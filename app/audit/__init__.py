"""Tamper-evident audit log (invariant 4): every mutation writes one entry in the same
transaction as the change. ``record()`` is the one function every mutation path calls."""

from app.audit.log import Actor, canonical_json, entry_hash, record, system_actor

__all__ = ["Actor", "canonical_json", "entry_hash", "record", "system_actor"]
