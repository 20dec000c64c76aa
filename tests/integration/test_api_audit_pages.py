"""``GET /api/v1/audit`` pages read through windows (app.api.windows): paging through
every page in either order returns exactly the matching entries, in seq order without a
time range and in (time, seq) order with one, including entries whose time order is not
their seq order (numbered when sealed, after the commit) and entries that tie on time
across a page boundary; a cursor of the other ordering is answered, not refused."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from urllib.parse import quote

import pytest

from app import create_app
from app import db as dbm
from app.audit.log import CHAIN_ID
from app.domain import tokens
from tests.helpers.api import API, make_admin, make_project

pytestmark = pytest.mark.integration

BASE = datetime(2026, 3, 1, tzinfo=UTC)
COUNT = 600


@pytest.fixture
def seeded(migrated_db, settings):
    """600 entries: three projects, two actions, times three to a second (ties) and
    shuffled within a few seconds of their seq (a seal after the commit)."""
    tokens.clear_cache()
    admin = make_admin(migrated_db)  # audited: before the log is replaced
    projects = [make_project(migrated_db, f"pages-{i}") for i in range(3)]
    rng = random.Random(7)
    entries = []
    for seq in range(1, COUNT + 1):
        when = BASE + timedelta(seconds=seq // 3 + rng.choice((0, 0, 0, -2, -5)))
        entries.append({
            "seq": seq, "time": when, "actor": {"kind": "system", "id": "bench@h"},
            "project_id": projects[seq % 3], "action": ("certificate.renew" if seq % 2
                                                       else "job.cancel"),
            "target": f"certificate:crt_{seq % 50}", "details": {}, "request_id": None,
            "prev_hash": "0" * 64, "hash": f"{seq:064x}", "hash_alg": "sha256"})
    migrated_db[dbm.AUDIT].delete_many({})
    migrated_db[dbm.AUDIT].insert_many(entries)
    migrated_db[dbm.COUNTERS].update_one({"_id": CHAIN_ID}, {"$set": {"seq": COUNT}},
                                         upsert=True)
    assert not migrated_db[dbm.AUDIT_PENDING].count_documents({})
    return create_app(settings).test_client(), admin, entries, projects


def walk(client, admin, query: str, limit: int) -> list[dict]:
    items, cursor = [], None
    for _ in range(COUNT):
        url = f"{API}/audit?limit={limit}{query}" + (f"&cursor={cursor}" if cursor else "")
        answer = client.get(url, headers=admin.headers)
        assert answer.status_code == 200, answer.json
        items += answer.json["items"]
        cursor = answer.json["next_cursor"]
        if cursor is None:
            return items
    raise AssertionError("the pages never ended")


def q(value: datetime) -> str:
    return quote(value.isoformat())


@pytest.mark.parametrize("order", ["desc", "asc"])
def test_every_page_of_the_whole_log_in_seq_order(seeded, order) -> None:
    client, admin, entries, projects = seeded
    for limit in (50, 11):  # the second walk starts from the span the first one kept
        seqs = [e["seq"] for e in walk(client, admin, f"&order={order}", limit)]
        expected = list(range(1, COUNT + 1))
        assert seqs == (expected[::-1] if order == "desc" else expected)
    prefix = [e["seq"] for e in walk(client, admin, f"&order={order}&action=job.", 30)]
    wanted = [e["seq"] for e in entries if e["action"] == "job.cancel"]
    assert prefix == (wanted[::-1] if order == "desc" else wanted)


@pytest.mark.parametrize("order", ["desc", "asc"])
@pytest.mark.parametrize("bounds", ["both", "since", "until"])
def test_a_time_range_pages_in_time_order_exactly(seeded, order, bounds) -> None:
    client, admin, entries, projects = seeded
    since, until = BASE + timedelta(seconds=40), BASE + timedelta(seconds=150)
    query = f"&order={order}"
    if bounds in ("both", "since"):
        query += f"&since={q(since)}"
    if bounds in ("both", "until"):
        query += f"&until={q(until)}"

    def inside(e: dict) -> bool:
        return (bounds == "until" or e["time"] >= since) and \
            (bounds == "since" or e["time"] < until)

    expected = sorted(((e["time"], e["seq"]) for e in entries if inside(e)),
                      reverse=order == "desc")
    assert any(a[0] == b[0] for a, b in zip(expected, expected[1:], strict=False))  # ties
    for limit in (40, 9):
        got = walk(client, admin, query, limit)
        assert [(datetime.fromisoformat(e["time"].replace("Z", "+00:00")), e["seq"])
                for e in got] == expected
    # With a project and an action too (windows on time, the rest as a filter).
    got = walk(client, admin, query + f"&project_id={projects[1]}&action=certificate.", 9)
    assert [e["seq"] for e in got] == [seq for _, seq in expected
                                       if seq % 3 == 1 and seq % 2 == 1]


def test_a_cursor_of_the_other_ordering_is_answered_not_refused(seeded) -> None:
    """A schema-valid cursor of another shape is a position the database orders (as
    every list answers one): a page, never an error."""
    client, admin, *_ = seeded
    by_seq = client.get(f"{API}/audit?limit=5", headers=admin.headers).json["next_cursor"]
    by_time = client.get(f"{API}/audit?limit=5&since={q(BASE)}",
                         headers=admin.headers).json["next_cursor"]
    for url in (f"{API}/audit?since={q(BASE)}&cursor={by_seq}",
                f"{API}/audit?cursor={by_time}", f"{API}/audit?cursor=d3~n"):
        answer = client.get(url, headers=admin.headers)
        assert answer.status_code == 200, answer.json


@pytest.mark.parametrize("query", [
    "until=0001-01-01T00:00:00Z", "until=0001-01-01T00:00:00Z&order=asc",
    "since=9999-12-31T00:00:00Z&order=asc", "since=9999-12-31T00:00:00Z",
    "since=0001-01-01T00:00:00Z&order=asc", "until=9999-12-31T00:00:00Z"])
def test_ranges_at_the_ends_of_the_calendar_are_answered(seeded, query) -> None:
    client, admin, *_ = seeded
    answer = client.get(f"{API}/audit?limit=5&{query}", headers=admin.headers)
    assert answer.status_code == 200, answer.json
    full = query.startswith("since=0001") or query.startswith("until=9999")
    assert len(answer.json["items"]) == (5 if full else 0)
