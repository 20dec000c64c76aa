"""Forwarding the audit log to its sinks: at least once, in seq order, from a cursor.

Each configured sink has a state document in ``audit_sinks`` (``_id`` = the sink's name):
its ``cursor`` (the last seq delivered), counters, the last error, and a short lease so
that two forwarders (an overlapping run, a second worker) never send to the same sink at
once, which would break the order. A run takes the lease, then repeatedly reads the
entries after the cursor (in seq order, ``spec.batch`` at a time), sends them, and
advances the cursor only after the sink confirmed the batch, under the lease. A crash
between sending and advancing sends that batch again: at least once, never out of order.

A failing sink is retried with backoff (5 s doubling to 60 s); its error, the time it
started failing and its lag stay in its state document, which readiness (``/readyz``
detail) and the metrics read. The API never sees it. The cursor stays put while a sink
is down, so it catches up from there when it comes back.

The scheduler leader enqueues ``audit.forward`` every 10 s (``scheduler/timed.py``); the
handler (``app/audit/jobs.py``) calls ``forward_all``. Forwarding state is bookkeeping,
not a user-visible mutation: it is not audited (auditing it would feed itself).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta

from pymongo import ReturnDocument
from pymongo.database import Database
from pymongo.errors import DuplicateKeyError

from app import db as dbm
from app.audit.sinks import Sink, SinkError, open_sink
from app.config.audit_sinks import SinkSpec
from app.db.lease import Lease, LeaseSchema
from app.db.names import SINKS, Doc

log = logging.getLogger(__name__)

LEASE_SECONDS = 60.0
BACKOFF_BASE_SECONDS = 5.0
BACKOFF_MAX_SECONDS = 60.0

SinkFactory = Callable[[SinkSpec], Sink]

# The forwarding lease, in the top-level ``lease_*`` fields of the sink's state document.
SINK_LEASE = LeaseSchema(holder="lease_owner", expires_at="lease_expires_at",
                         token="lease_token", acquired_at=None, renewed_at=None)


def backoff_seconds(failures: int) -> float:
    return float(min(BACKOFF_MAX_SECONDS, BACKOFF_BASE_SECONDS * 2 ** max(0, failures - 1)))


def default_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def ensure_state(db: Database[Doc], spec: SinkSpec) -> Doc:
    """The sink's state document, created at cursor 0 (forward the whole history)."""
    now = dbm.server_now(db)
    try:
        doc = db[SINKS].find_one_and_update(
            {"_id": spec.name},
            {"$setOnInsert": {"cursor": 0, "delivered": 0, "created_at": now,
                              "consecutive_failures": 0, "failing_since": None,
                              "last_error": None, "next_attempt_at": None,
                              "lease_owner": None, "lease_expires_at": None},
             "$set": {"kind": spec.kind, "display": spec.display}},
            upsert=True, return_document=ReturnDocument.AFTER)
    except DuplicateKeyError:  # a peer created it at the same moment
        doc = db[SINKS].find_one({"_id": spec.name})
    assert doc is not None
    return doc


def sink_lease(db: Database[Doc], name: str, owner: str) -> Lease:
    """The forwarding lease of sink ``name`` (in its state document)."""
    return Lease(db[SINKS], {"_id": name}, owner, LEASE_SECONDS, schema=SINK_LEASE,
                 what="audit sink lease")


def forward_sink(db: Database[Doc], spec: SinkSpec, *, owner: str, deadline: float,
                 check: Callable[[], None] | None = None,
                 make_sink: SinkFactory = open_sink) -> Doc:
    """Deliver what the sink lacks, batch by batch, until caught up or ``deadline``
    (time.monotonic()). Returns a summary; a sink failure is recorded, not raised."""
    db = dbm.primary(db)
    state = ensure_state(db, spec)
    now = dbm.server_now(db)
    next_attempt = state.get("next_attempt_at")
    if isinstance(next_attempt, datetime) and next_attempt > now:
        return {"skipped": "backoff", "cursor": state.get("cursor", 0),
                "retry_in_s": round((next_attempt - now).total_seconds(), 1)}
    lease = sink_lease(db, spec.name, owner)
    state = lease.acquire(also={"last_attempt_at": now}, now=now) or {}
    if not state:
        return {"skipped": "another forwarder holds this sink"}
    cursor = int(state.get("cursor", 0))
    delivered = 0
    sink: Sink | None = None
    try:
        sink = make_sink(spec)
        while time.monotonic() < deadline:
            batch = list(db[dbm.AUDIT].find({"seq": {"$gt": cursor}})
                         .sort("seq", 1).limit(spec.batch))
            if not batch:
                break
            _note_gaps(db, spec, cursor, batch)
            if check is not None:
                check()  # the job's lease: never send once it is gone
            sink.send(batch)
            last = int(batch[-1]["seq"])
            now = dbm.server_now(db)
            # Fenced by the lease's token, which the same write renews.
            moved = db[SINKS].update_one(
                {"_id": spec.name, **lease.owned(), "cursor": cursor},
                {"$set": {"cursor": last, "last_success_at": now, "consecutive_failures": 0,
                          "failing_since": None, "last_error": None,
                          "next_attempt_at": None, **lease.renewal(now)},
                 "$inc": {"delivered": len(batch)}})
            if moved.matched_count == 0:
                log.warning("audit sink lease lost; stopping", extra={"sink": spec.name})
                return {"delivered": delivered, "cursor": cursor, "stopped": "lease lost"}
            delivered += len(batch)
            cursor = last
        if delivered == 0:
            db[SINKS].update_one({"_id": spec.name, **lease.owned()},
                                 {"$set": {"last_success_at": dbm.server_now(db),
                                           "consecutive_failures": 0, "failing_since": None,
                                           "last_error": None}})
        return {"delivered": delivered, "cursor": cursor}
    except SinkError as exc:
        return _failed(db, spec, owner, cursor, delivered, str(exc))
    except (OSError, ValueError) as exc:  # e.g. an unreadable CA file (ssl.SSLError)
        return _failed(db, spec, owner, cursor, delivered,
                       f"{exc.__class__.__name__}: {exc}"[:300])
    finally:
        if sink is not None:
            sink.close()
        lease.release()


def _failed(db: Database[Doc], spec: SinkSpec, owner: str, cursor: int, delivered: int,
            error: str) -> Doc:
    now = dbm.server_now(db)
    state = db[SINKS].find_one({"_id": spec.name}) or {}
    failures = int(state.get("consecutive_failures") or 0) + 1
    delay = backoff_seconds(failures)
    db[SINKS].update_one({"_id": spec.name}, {
        "$set": {"consecutive_failures": failures, "last_error": error,
                 "last_failure_at": now,
                 "failing_since": state.get("failing_since") or now,
                 "next_attempt_at": now + timedelta(seconds=delay)},
        "$inc": {"failures_total": 1}})
    log.warning("audit sink delivery failed", extra={
        "sink": spec.name, "target": spec.display, "error": error, "cursor": cursor,
        "consecutive_failures": failures, "retry_in_s": delay})
    return {"delivered": delivered, "cursor": cursor, "error": error,
            "consecutive_failures": failures}


def _note_gaps(db: Database[Doc], spec: SinkSpec, cursor: int, batch: list[Doc]) -> None:
    """Entries commit in seq order, so a hole is a deleted entry: forward what is there
    (the SIEM copy matters most then) and say so loudly."""
    expected = cursor + 1
    for entry in batch:
        seq = int(entry["seq"])
        if seq != expected:
            log.error("audit log has a gap: entries missing (run `certautopilot audit "
                      "verify`)", extra={"sink": spec.name, "missing_from": expected,
                                         "missing_to": seq - 1})
            db[SINKS].update_one({"_id": spec.name}, {"$set": {
                "last_gap": {"from": expected, "to": seq - 1}}})
        expected = seq + 1


def forward_all(db: Database[Doc], sinks: Sequence[SinkSpec], *, owner: str | None = None,
                budget_seconds: float = 30.0, check: Callable[[], None] | None = None,
                make_sink: SinkFactory = open_sink) -> dict[str, Doc]:
    """One forwarding run over every configured sink (the ``audit.forward`` job)."""
    owner = owner or default_owner()
    deadline = time.monotonic() + budget_seconds
    return {spec.name: forward_sink(db, spec, owner=owner, deadline=deadline, check=check,
                                    make_sink=make_sink)
            for spec in sinks}
