"""Tamper-evident audit log (invariant 4): every mutation writes one entry in the same
transaction as the change. ``record()`` is the one function every mutation path calls.

- ``log``: ``record()`` and the hash chain; ``verify``: walking and diagnosing the chain;
- ``sinks`` / ``forward``: at-least-once forwarding to CAP_AUDIT_SINKS (parsed by
  ``app.config.audit_sinks``);
- ``status``: the ``audit_sinks`` readiness check and metrics (``app.health`` imports it);
- ``cli``: ``certautopilot audit ...``; ``jobs``: the ``audit.forward`` job handler;
- ``walk``: helpers for tests that check every mutating route and command is audited.
"""

from app.audit.log import Actor, canonical_json, entry_hash, record, system_actor

__all__ = ["Actor", "canonical_json", "entry_hash", "record", "system_actor"]
