"""Schedule entries: their definition, their slots, and where static ones come from.

An entry's *definition* (job kind, payload, and either ``every_seconds`` or a ``cron``
spec) is stored apart from its *run metadata* (``last_run_at``, ``next_run_at``,
``total_run_count``), so reloading the static schedule keeps when each entry last ran.

Slots: an interval entry fires at instants aligned to the epoch (every 15 s means
hh:mm:00, :15, :30, :45 UTC), a cron entry at its cron times. Every scheduler computes the
same slot for the same moment, and the slot names the job's dedupe key
(``"<entry>@<slot ISO>"``). After an outage only the latest due slot fires: missed slots
are coalesced, never replayed one by one.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from celery.schedules import crontab
from celery.schedules import schedule as interval_schedule

from app.config import Settings
from app.db import Doc
from scheduler.timed import TIMED_WORK, TimedWork

CRON_FIELDS = ("minute", "hour", "day_of_week", "day_of_month", "month_of_year")
MIN_EVERY_SECONDS = 0.1


class EntryError(ValueError):
    """A schedule entry cannot be used as defined (the message names it)."""


def to_ms(when: datetime) -> int:
    return int(round(when.timestamp() * 1000))


def from_ms(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def slot_key(name: str, slot: datetime) -> str:
    """The dedupe key of one run of an entry: ``"<name>@<slot, ISO UTC ms>"``."""
    return f"{name}@{slot.astimezone(UTC).isoformat(timespec='milliseconds')}"


@dataclass(frozen=True)
class EntryDefinition:
    name: str
    kind: str
    payload: dict[str, Any] = field(default_factory=dict)
    every_seconds: float | None = None
    cron: dict[str, str] | None = None

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise EntryError(f"schedule entry {self.name!r}: a non-empty name is required")
        if not self.kind or not isinstance(self.kind, str):
            raise EntryError(f"schedule entry {self.name!r}: a job kind is required")
        if not isinstance(self.payload, dict):
            raise EntryError(f"schedule entry {self.name!r}: payload must be a dict")
        if (self.every_seconds is None) == (self.cron is None):
            raise EntryError(f"schedule entry {self.name!r}: give every_seconds or cron "
                             "(exactly one)")
        if self.every_seconds is not None and not (
                math.isfinite(self.every_seconds) and self.every_seconds >= MIN_EVERY_SECONDS):
            raise EntryError(f"schedule entry {self.name!r}: every_seconds must be a number "
                             f">= {MIN_EVERY_SECONDS}, not {self.every_seconds!r}")
        if self.cron is not None:
            unknown = set(self.cron) - set(CRON_FIELDS)
            if unknown:
                raise EntryError(f"schedule entry {self.name!r}: unknown cron fields "
                                 f"{sorted(unknown)}")
            try:
                self._crontab()
            except (ValueError, TypeError) as exc:
                raise EntryError(f"schedule entry {self.name!r}: bad cron spec "
                                 f"{self.cron}: {exc}") from None

    # --- storage -------------------------------------------------------------------------

    def definition(self) -> Doc:
        doc: Doc = {"kind": self.kind, "payload": dict(self.payload)}
        if self.every_seconds is not None:
            doc["every_seconds"] = float(self.every_seconds)
        else:
            doc["cron"] = dict(self.cron or {})
        return doc

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> EntryDefinition:
        definition = doc.get("definition") or {}
        every = definition.get("every_seconds")
        return cls(name=str(doc["_id"]), kind=definition.get("kind", ""),
                   payload=dict(definition.get("payload") or {}),
                   every_seconds=float(every) if every is not None else None,
                   cron=dict(definition["cron"]) if definition.get("cron") else None)

    def same_definition(self, stored: Mapping[str, Any] | None) -> bool:
        return canonical(self.definition()) == canonical(stored or {})

    # --- slots ---------------------------------------------------------------------------

    def _crontab(self) -> crontab:
        spec = {k: str(v) for k, v in (self.cron or {}).items()}
        sched = crontab(**spec)
        sched.tz = UTC
        return sched

    def next_after(self, when: datetime) -> datetime:
        """The first slot strictly after ``when``."""
        if self.every_seconds is not None:
            step = max(1, int(round(self.every_seconds * 1000)))
            return from_ms((to_ms(when) // step + 1) * step)
        start, delta, _ = self._crontab().remaining_delta(when.astimezone(UTC), tz=UTC)
        nxt = (start + delta).astimezone(UTC)
        return nxt if nxt > when else self.next_after(when + timedelta(seconds=1))

    def latest_at_or_before(self, now: datetime) -> datetime | None:
        """The latest slot at or before ``now`` (None for a cron entry with no slot in the
        last 366 days)."""
        if self.every_seconds is not None:
            step = max(1, int(round(self.every_seconds * 1000)))
            return from_ms(to_ms(now) // step * step)
        window = timedelta(minutes=1)
        while window <= timedelta(days=366):
            candidate = self.next_after(now - window)
            if candidate <= now:
                while True:
                    following = self.next_after(candidate)
                    if following > now:
                        return candidate
                    candidate = following
            window *= 2
        return None

    def first_next_run(self, now: datetime, last_run_at: datetime | None) -> datetime:
        """``next_run_at`` for a new or redefined entry: an interval entry is due at its
        current slot unless that slot already ran; a cron entry waits for its next time."""
        if self.every_seconds is not None:
            current = self.latest_at_or_before(now)
            assert current is not None
            if last_run_at is None or last_run_at < current:
                return current
            return self.next_after(last_run_at)
        return self.next_after(max(now, last_run_at) if last_run_at else now)

    def slot_to_fire(self, next_run_at: datetime, now: datetime) -> tuple[datetime, datetime]:
        """For an entry due at ``next_run_at <= now``: the slot to fire (the latest due
        one; earlier missed slots are coalesced) and the ``next_run_at`` after it."""
        latest = self.latest_at_or_before(now)
        slot = latest if latest is not None and latest >= next_run_at else next_run_at
        return slot, self.next_after(slot)

    def describe(self) -> str:
        if self.every_seconds is not None:
            return f"every {self.every_seconds:g}s"
        return "cron " + " ".join(str((self.cron or {}).get(f, "*")) for f in CRON_FIELDS)


def canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def from_timed_work(work: TimedWork) -> EntryDefinition:
    return EntryDefinition(name=work.name, kind=work.kind, payload=dict(work.payload or {}),
                           every_seconds=float(work.every_seconds))


def from_beat_schedule(name: str, spec: Mapping[str, Any]) -> EntryDefinition:
    """A Celery ``beat_schedule`` item as timed work: ``task`` is the job kind, ``kwargs``
    the payload; ``schedule`` a number of seconds, a timedelta, ``schedule(...)`` or
    ``crontab(...)``. Positional ``args`` are refused (a job takes a payload dict)."""
    if spec.get("args"):
        raise EntryError(f"beat_schedule entry {name!r}: positional args are not supported; "
                         "put the job payload in kwargs")
    kind = spec.get("task")
    sched = spec.get("schedule")
    payload = dict(spec.get("kwargs") or {})
    if isinstance(sched, bool):
        raise EntryError(f"beat_schedule entry {name!r}: bad schedule {sched!r}")
    if isinstance(sched, (int, float)):
        return EntryDefinition(name, str(kind or ""), payload, every_seconds=float(sched))
    if isinstance(sched, timedelta):
        return EntryDefinition(name, str(kind or ""), payload,
                               every_seconds=sched.total_seconds())
    if isinstance(sched, crontab):
        cron = {"minute": sched._orig_minute, "hour": sched._orig_hour,
                "day_of_week": sched._orig_day_of_week,
                "day_of_month": sched._orig_day_of_month,
                "month_of_year": sched._orig_month_of_year}
        return EntryDefinition(name, str(kind or ""), payload,
                               cron={k: str(v) for k, v in cron.items()})
    if isinstance(sched, interval_schedule):
        return EntryDefinition(name, str(kind or ""), payload,
                               every_seconds=sched.run_every.total_seconds())
    raise EntryError(f"beat_schedule entry {name!r}: schedule {sched!r} is not supported "
                     "(use seconds, a timedelta, schedule() or crontab())")


def static_entries(settings: Settings, beat_schedule: Mapping[str, Any] | None = None,
                   timed_work: Iterable[TimedWork] | None = None) -> list[EntryDefinition]:
    """The static schedule: ``scheduler/timed.py``'s TIMED_WORK, Celery's
    ``beat_schedule`` and CAP_SCHEDULER_EXTRA_ENTRIES, names distinct across all three."""
    found: list[EntryDefinition] = []
    sources: list[tuple[str, Callable[[], Iterable[EntryDefinition]]]] = [
        ("scheduler/timed.py",
         lambda: [from_timed_work(w) for w in (TIMED_WORK if timed_work is None
                                               else timed_work)]),
        ("beat_schedule",
         lambda: [from_beat_schedule(n, s) for n, s in (beat_schedule or {}).items()]),
        ("CAP_SCHEDULER_EXTRA_ENTRIES",
         lambda: [EntryDefinition(e["name"], e["kind"], dict(e.get("payload") or {}),
                                  every_seconds=float(e["every_seconds"]))
                  for e in settings.scheduler_extra_entries]),
    ]
    seen: dict[str, str] = {}
    for source, load in sources:
        for entry in load():
            if entry.name in seen:
                raise EntryError(f"schedule entry {entry.name!r} is defined twice "
                                 f"({seen[entry.name]} and {source})")
            seen[entry.name] = source
            found.append(entry)
    return found
