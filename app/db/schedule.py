"""The scheduler's storage contract: what it leaves in the database, read back for
operators (``certautopilot scheduler status``, ``/api/v1/status``, metrics).

The scheduler (``scheduler/``, which ``app/`` never imports) writes, and this module
reads, four things:

- ``leases/scheduler``: the leader lease — ``holder``, ``term`` (rises at every change of
  holder), ``expires_at``, ``renewed_at``, ``acquired_at``, ``released_at``.
- ``schedule``: one document per entry — ``definition`` (kind, payload, every_seconds or
  cron) apart from its run metadata (``last_run_at``, ``next_run_at``,
  ``total_run_count``, ``last_term``, ``last_holder``, ``last_job_id``).
- ``schedule_fires``: one document per fired slot (entry, slot, term, holder, job id),
  unique on (entry, slot), kept ``FIRES_TTL_SECONDS``: the durable proof that a slot ran
  once, and the history ``certautopilot scheduler status`` shows.
- ``scheduler_standbys``: one document per scheduler that is not leading, refreshed at
  most every ``STANDBY_NOTE_SECONDS`` (TTL on ``expires_at``): who would take over.

``status(db)`` assembles them, with the lease's state judged on the server's clock.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta

from pymongo.database import Database

from app.db.client import primary, retry
from app.db.clock import server_now
from app.db.names import (
    FIRES,
    LEASES,
    SCHEDULE,
    SCHEDULER_LEASE_ID,
    SCHEDULER_STANDBYS,
    Doc,
)

__all__ = ["FIRES", "FIRES_TTL_SECONDS", "SCHEDULER_LEASE_ID", "entries_status",
           "lease_status", "note_standby", "recent_fires", "standbys", "status"]

# A fired slot's unique (entry, slot) only has to outlast a deposed leader's pause; a day
# of fires is history enough (at ~35,000 fires a day a week would be 240,000 documents).
# TTL index, m0003 (m0010 shortens it).
FIRES_TTL_SECONDS = 86400
# The jobs the scheduler enqueues expire this long after their slot whatever their state
# (``slot_expire_at``, TTL index in m0010): the next slot runs the work again.
SLOT_JOB_TTL_SECONDS = 86400
STANDBY_NOTE_SECONDS = 10.0
# A standby not seen for this long is not shown (it stopped, or lost the database).
STANDBY_SEEN_WITHIN = timedelta(seconds=60)
STANDBY_FORGET_AFTER = timedelta(minutes=10)  # the TTL index removes it then

log = logging.getLogger(__name__)
_noted: dict[str, float] = {}


def note_standby(db: Database[Doc], holder: str) -> None:
    """Record that ``holder`` runs as a standby (throttled; never raises: a standby's
    only duty is to take over, not to report)."""
    if time.monotonic() - _noted.get(holder, 0.0) < STANDBY_NOTE_SECONDS:
        return
    _noted[holder] = time.monotonic()
    try:
        now = server_now(db)
        db[SCHEDULER_STANDBYS].update_one(
            {"_id": holder}, {"$set": {"seen_at": now, "expires_at": now + STANDBY_FORGET_AFTER}},
            upsert=True)
    except Exception as exc:  # noqa: BLE001
        log.debug("could not note the standby: %s", exc)


def standbys(db: Database[Doc], now: datetime, holder: str | None) -> list[Doc]:
    """Schedulers seen as standby within ``STANDBY_SEEN_WITHIN`` (not the holder)."""
    docs = retry(lambda: list(db[SCHEDULER_STANDBYS].find(
        {"seen_at": {"$gt": now - STANDBY_SEEN_WITHIN}}).limit(20)), what="read standbys")
    return [{"holder": d["_id"], "seen_at": d.get("seen_at")} for d in docs
            if d["_id"] != holder]


def _seconds(later: datetime | None, earlier: datetime) -> float | None:
    if later is None:
        return None
    return round((later - earlier).total_seconds(), 3)


def lease_status(db: Database[Doc], now: datetime | None = None) -> Doc:
    """The scheduler lease as an operator reads it: who leads, under which term, until
    when (``state`` is ``held``, ``expired``, ``released`` or ``never taken``)."""
    db = primary(db)
    now = now or server_now(db)
    doc = retry(lambda: db[LEASES].find_one({"_id": SCHEDULER_LEASE_ID}),
                    what="read scheduler lease")
    if doc is None:
        return {"state": "never taken", "holder": None, "term": 0, "expires_at": None,
                "renewed_at": None, "acquired_at": None, "expires_in_s": None,
                "server_time": now}
    expires_at = doc.get("expires_at")
    if doc.get("holder") is None:
        state = "released"
    elif expires_at is not None and expires_at > now:
        state = "held"
    else:
        state = "expired"
    return {
        "state": state,
        "holder": doc.get("holder"),
        "term": int(doc.get("term") or 0),
        "expires_at": expires_at,
        "renewed_at": doc.get("renewed_at"),
        "acquired_at": doc.get("acquired_at"),
        "released_at": doc.get("released_at"),
        "lease_seconds": doc.get("lease_seconds"),
        "expires_in_s": _seconds(expires_at, now) if state == "held" else None,
        "server_time": now,
    }


def entries_status(db: Database[Doc], now: datetime | None = None) -> list[Doc]:
    """Every schedule entry with its definition, last and next run (soonest first)."""
    db = primary(db)
    now = now or server_now(db)
    docs = retry(lambda: list(db[SCHEDULE].find().sort([("next_run_at", 1),
                                                                 ("_id", 1)])),
                     what="read schedule")
    rows = []
    for doc in docs:
        definition = doc.get("definition") or {}
        rows.append({
            "name": doc["_id"],
            "kind": definition.get("kind"),
            "every_seconds": definition.get("every_seconds"),
            "cron": definition.get("cron"),
            "source": doc.get("source"),
            "next_run_at": doc.get("next_run_at"),
            "next_run_in_s": _seconds(doc.get("next_run_at"), now),
            "last_run_at": doc.get("last_run_at"),
            "total_run_count": int(doc.get("total_run_count") or 0),
            "last_term": doc.get("last_term"),
            "last_holder": doc.get("last_holder"),
            "last_job_id": doc.get("last_job_id"),
        })
    return rows


# The windows ``recent_fires`` reads, newest first, each 4x the one before: slots fire
# every few seconds, so the first ones nearly always hold the page, and after a pause
# the window that reaches the page's oldest fire is at most 4x the span it needs; the whole
# day's fires (about 26,000 with the default entries) are sorted only when fewer than
# the page fired in the last 17 hours.
_FIRE_WINDOWS = (*(timedelta(minutes=4 ** i) for i in range(6)), None)


def recent_fires(db: Database[Doc], limit: int = 10) -> list[Doc]:
    """The last ``limit`` fired slots, newest first, read through windows of
    ``fired_at`` below now (the embedded server sorts every entry of a range before it
    limits: an unbounded read sorted the whole day of fires at each status call)."""
    db = primary(db)
    now = server_now(db)
    found: list[Doc] = []
    for width in _FIRE_WINDOWS:
        query = {} if width is None else {"fired_at": {"$gte": now - width}}
        found = retry(lambda q=query: list(  # type: ignore[misc]
            db[FIRES].find(q, {"_id": 0}).sort("fired_at", -1).limit(limit)),
            what="read schedule fires")
        if len(found) >= limit:
            break
    return found


def status(db: Database[Doc], *, fires: int = 0) -> Doc:
    """Lease, entries and (optionally) the last ``fires`` fired slots."""
    now = server_now(db)
    result: Doc = {"lease": lease_status(db, now), "entries": entries_status(db, now)}
    if fires:
        result["recent_fires"] = recent_fires(db, fires)
    return result
