"""Schedule entries: slots, coalescing, static sources, and CAP_SCHEDULER_EXTRA_ENTRIES."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from celery.schedules import crontab, schedule

from app.config import ConfigError, load_settings
from scheduler.entries import (
    EntryDefinition,
    EntryError,
    from_beat_schedule,
    slot_key,
    static_entries,
)
from scheduler.timed import TIMED_WORK, TimedWork

URI = {"CAP_MONGO_URI": "mongodb://m0/certautopilot?replicaSet=rs0"}


def at(h: int, m: int, s: float = 0) -> datetime:
    return datetime(2026, 11, 27, h, m, 0, tzinfo=UTC) + timedelta(seconds=s)


def test_interval_slots_are_aligned_to_the_epoch() -> None:
    every15 = EntryDefinition("reap", "jobs.reap", every_seconds=15)
    assert every15.latest_at_or_before(at(10, 0, 44.9)) == at(10, 0, 30)
    assert every15.latest_at_or_before(at(10, 0, 45)) == at(10, 0, 45)
    assert every15.next_after(at(10, 0, 45)) == at(10, 1, 0)
    assert every15.next_after(at(10, 0, 44.999)) == at(10, 0, 45)
    fast = EntryDefinition("fast", "k", every_seconds=0.5)
    assert fast.next_after(at(10, 0, 1.2)) == at(10, 0, 1.5)


def test_a_due_entry_fires_its_latest_slot_and_coalesces_missed_ones() -> None:
    every15 = EntryDefinition("reap", "jobs.reap", every_seconds=15)
    # On time.
    assert every15.slot_to_fire(at(10, 0, 15), at(10, 0, 15.2)) == (at(10, 0, 15), at(10, 0, 30))
    # Ten minutes late (a failover, an outage): one run for the current slot, not forty.
    assert every15.slot_to_fire(at(10, 0, 15), at(10, 10, 7)) == (at(10, 10, 0), at(10, 10, 15))


def test_a_new_interval_entry_is_due_now_unless_its_slot_already_ran() -> None:
    every15 = EntryDefinition("reap", "jobs.reap", every_seconds=15)
    assert every15.first_next_run(at(10, 0, 20), None) == at(10, 0, 15)
    assert every15.first_next_run(at(10, 0, 20), at(10, 0, 15)) == at(10, 0, 30)
    # Redefined from every 15 s to every 60 s: next run on the 60 s grid, once.
    every60 = EntryDefinition("reap", "jobs.reap", every_seconds=60)
    assert every60.first_next_run(at(10, 0, 20), at(10, 0, 15)) == at(10, 1, 0)


def test_cron_entries() -> None:
    quarter = EntryDefinition("q", "k", cron={"minute": "*/15"})
    assert quarter.next_after(at(10, 7)) == at(10, 15)
    assert quarter.next_after(at(10, 15)) == at(10, 30)
    assert quarter.latest_at_or_before(at(10, 29, 59)) == at(10, 15)
    assert quarter.latest_at_or_before(at(10, 30)) == at(10, 30)
    # A new cron entry waits for its next time; a late one fires its latest slot.
    assert quarter.first_next_run(at(10, 7), None) == at(10, 15)
    assert quarter.slot_to_fire(at(9, 0), at(10, 7)) == (at(10, 0), at(10, 15))
    nightly = EntryDefinition("n", "k", cron={"minute": "0", "hour": "4"})
    assert nightly.latest_at_or_before(at(10, 7)) == at(4, 0)


def test_dedupe_key_names_entry_and_slot() -> None:
    assert slot_key("jobs.reap", at(10, 0, 15)) == "jobs.reap@2026-11-27T10:00:15.000+00:00"


@pytest.mark.parametrize("kwargs", [
    {"name": "", "kind": "k", "every_seconds": 1},
    {"name": "x", "kind": "", "every_seconds": 1},
    {"name": "x", "kind": "k"},
    {"name": "x", "kind": "k", "every_seconds": 1, "cron": {"minute": "1"}},
    {"name": "x", "kind": "k", "every_seconds": 0.01},
    {"name": "x", "kind": "k", "every_seconds": float("nan")},
    {"name": "x", "kind": "k", "cron": {"minute": "61"}},
    {"name": "x", "kind": "k", "cron": {"second": "1"}},
    {"name": "x", "kind": "k", "every_seconds": 1, "payload": ["not", "a", "dict"]},
])
def test_bad_definitions_are_refused_with_the_entry_named(kwargs) -> None:
    with pytest.raises(EntryError, match=repr(kwargs["name"])):
        EntryDefinition(**kwargs)


def test_definition_round_trips_through_its_document() -> None:
    entry = EntryDefinition("e", "k", {"a": 1}, every_seconds=2)
    doc = {"_id": "e", "definition": entry.definition()}
    assert EntryDefinition.from_doc(doc) == entry
    assert entry.same_definition(doc["definition"])
    assert not EntryDefinition("e", "k", {"a": 2}, every_seconds=2).same_definition(
        doc["definition"])


def test_beat_schedule_items_become_timed_work() -> None:
    assert from_beat_schedule("a", {"task": "k", "schedule": 30.0}).every_seconds == 30
    assert from_beat_schedule("b", {"task": "k", "schedule": timedelta(minutes=2),
                                    "kwargs": {"x": 1}}).payload == {"x": 1}
    assert from_beat_schedule("c", {"task": "k", "schedule": schedule(5)}).every_seconds == 5
    cron = from_beat_schedule("d", {"task": "k", "schedule": crontab(minute="*/5")})
    assert cron.cron is not None and cron.cron["minute"] == "*/5"
    with pytest.raises(EntryError, match="positional args"):
        from_beat_schedule("e", {"task": "k", "schedule": 5, "args": (1,)})
    with pytest.raises(EntryError, match="not supported"):
        from_beat_schedule("f", {"task": "k", "schedule": "often"})


def test_static_schedule_has_the_reaper_and_merges_every_source() -> None:
    assert TimedWork("jobs.reap", 15, "jobs.reap") in TIMED_WORK
    settings = load_settings({**URI, "CAP_SCHEDULER_EXTRA_ENTRIES": json.dumps(
        [{"name": "tick", "every_seconds": 1, "kind": "test.tick", "payload": {"n": 1}}])})
    entries = static_entries(settings, {"nightly": {"task": "k", "schedule": crontab(0, 4)}})
    names = [e.name for e in entries]
    assert names == [w.name for w in TIMED_WORK] + ["nightly", "tick"]
    reaper = entries[names.index("jobs.reap")]
    assert (reaper.kind, reaper.every_seconds) == ("jobs.reap", 15)
    with pytest.raises(EntryError, match="defined twice"):
        static_entries(settings, {"tick": {"task": "k", "schedule": 5}})


def test_extra_entries_setting() -> None:
    assert load_settings(URI).scheduler_extra_entries == ()
    value = [{"name": "tick", "every_seconds": 0.5, "kind": "test.tick"}]
    settings = load_settings({**URI, "CAP_SCHEDULER_EXTRA_ENTRIES": json.dumps(value)})
    assert settings.scheduler_extra_entries == (
        {"name": "tick", "every_seconds": 0.5, "kind": "test.tick", "payload": {}},)


@pytest.mark.parametrize("raw", [
    "not json",
    '{"name": "x"}',
    '[{"name": "x", "every_seconds": 1}]',
    '[{"name": "x", "every_seconds": 0, "kind": "k"}]',
    '[{"name": "x", "every_seconds": true, "kind": "k"}]',
    '[{"name": "x", "every_seconds": "1", "kind": "k"}]',
    '[{"name": "x", "every_seconds": 1, "kind": "k", "payload": []}]',
    '[{"name": "x", "every_seconds": 1, "kind": "k", "colour": "red"}]',
    '[{"name": "x", "every_seconds": 1, "kind": "k"}, {"name": "x", "every_seconds": 2, '
    '"kind": "k"}]',
])
def test_bad_extra_entries_name_the_variable(raw) -> None:
    with pytest.raises(ConfigError, match="CAP_SCHEDULER_EXTRA_ENTRIES"):
        load_settings({**URI, "CAP_SCHEDULER_EXTRA_ENTRIES": raw})
