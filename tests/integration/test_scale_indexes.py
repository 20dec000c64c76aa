"""Scale (issue 19): the renewal scan and the certificate lists stay on an index
(examined / returned near 1 in ``explain``), pages after a cursor neither skip nor
repeat, and the per-event collections expire."""

from __future__ import annotations

import random
from datetime import timedelta
from typing import Any

import pytest

from app import db as dbm
from app.api.common import encode_cursor, page_query
from app.db.names import FIRES
from app.db.schedule import FIRES_TTL_SECONDS
from app.domain import certificates, orders, renewal
from tests.helpers.api import API, make_admin, make_project
from tests.helpers.fleet import seed_fleet


def explained(db: Any, query: dict[str, Any], sort: dict[str, int]) -> dict[str, Any]:
    result = db.command("explain", {"find": dbm.CERTIFICATES, "filter": query, "sort": sort,
                                    "limit": 51}, verbosity="executionStats")
    stats = result["executionStats"]
    return {"examined": stats["totalDocsExamined"], "returned": stats["nReturned"],
            "plan": str(result["queryPlanner"]["winningPlan"])}


def assert_index_backed(report: dict[str, Any]) -> None:
    assert report["returned"] > 0, report
    assert report["examined"] <= 1.5 * report["returned"], report
    assert "COLLSCAN" not in report["plan"], report


@pytest.fixture
def fleet(migrated_db: Any) -> tuple[list[str], list[dict[str, Any]]]:
    projects = [make_project(migrated_db, f"idx-{i}") for i in range(4)]
    now = dbm.server_now(migrated_db)
    return projects, seed_fleet(migrated_db, 400, projects, now)


def test_renewal_scan_and_lists_are_index_backed(migrated_db, fleet) -> None:
    projects, docs = fleet
    now = dbm.server_now(migrated_db)
    assert_index_backed(explained(migrated_db, certificates.due_query(now),
                                  {"next_renewal_at": 1}))
    # The scan's batch: which of the due certificates already have an active issuance.
    result = renewal.renewal_scan(migrated_db)
    assert result["enqueued"] == sum(1 for d in docs if d["deleted_at"] is None
                                     and d["next_renewal_at"] <= now)
    keys = [certificates.dedupe_key(d["_id"]) for d in docs[:60]]
    active = migrated_db.command("explain", {"find": dbm.JOBS, "filter": {
        "dedupe_key": {"$in": keys}}}, verbosity="executionStats")
    assert "COLLSCAN" not in str(active["queryPlanner"]["winningPlan"]), active
    live = {"deleted_at": None}
    project = {**live, "project_id": projects[1]}
    by_status = {**live, "status": "issued"}
    expiring = {**live, "not_after": {"$lt": now + timedelta(days=30)}}
    created = {"created_at": 1, "_id": 1}
    for query, sort in ((project, created), (by_status, created),
                        ({**project, "status": "issued"}, created),
                        (expiring, {"not_after": 1, "_id": 1}),
                        ({**expiring, "project_id": projects[2]}, {"not_after": 1, "_id": 1})):
        assert_index_backed(explained(migrated_db, query, sort))
        # A deep page: the filter after a cursor 80 % into the list.
        keys = tuple(sort)
        ordered = sorted((d for d in docs if all(
            d.get(k) == v for k, v in query.items() if not isinstance(v, dict))
            and (not isinstance(query.get("not_after"), dict)
                 or (d["not_after"] and d["not_after"] < query["not_after"]["$lt"]))),
            key=lambda d: tuple(d[k] for k in keys))
        deep = ordered[int(len(ordered) * 0.8)]
        after, _ = page_query(query, keys, [deep[k] for k in keys])
        assert_index_backed(explained(migrated_db, after, sort))


def test_pages_after_a_cursor_with_ties_skip_and_repeat_nothing(client_admin) -> None:
    client, admin, db, projects = client_admin
    now = dbm.server_now(db)
    # Eleven certificates created in the same millisecond: the cursor's first key ties.
    seed_fleet(db, 11, projects[:1], now, deleted_every=0)
    db[dbm.CERTIFICATES].update_many({}, {"$set": {"created_at": now}})
    seen: list[str] = []
    cursor = None
    for _ in range(20):
        url = f"{API}/certificates?limit=3" + (f"&cursor={cursor}" if cursor else "")
        page = client.get(url, headers=admin.headers).json
        seen.extend(item["id"] for item in page["items"])
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == sorted(seen) and len(seen) == len(set(seen)) == 11

    # expiring_before pages soonest expiry first, across pages.
    expiring: list[str] = []
    cursor = encode_cursor([now - timedelta(days=400), ""])
    before = (now + timedelta(days=365)).isoformat().replace("+00:00", "Z")
    while cursor:
        page = client.get(f"{API}/certificates?limit=2&expiring_before={before}"
                          f"&cursor={cursor}", headers=admin.headers).json
        expiring.extend(item["not_after"] for item in page["items"])
        cursor = page["next_cursor"]
    assert expiring == sorted(expiring) and len(expiring) == db[dbm.CERTIFICATES]\
        .count_documents({"not_after": {"$ne": None}})
    listed = client.get(f"{API}/certificates?limit=1", headers=admin.headers).json["items"][0]
    assert "fullchain_pem" not in listed and "certificate_pem" not in listed


def test_windowed_pages_are_one_sorted_read_whatever_the_hints(migrated_db) -> None:
    """The certificates list reads its pages through windows of the date key chosen from
    per-process hints (``windowed_paginate``): every page sequence equals one sorted read
    of the filter, with cold hints, warm ones, and after documents arrived below where
    the hints say the first page ends."""
    from app.api import common

    coll = migrated_db[dbm.CERTIFICATES]
    now = dbm.server_now(migrated_db)
    rng = random.Random(19)
    offsets = ([timedelta(0)] * 15  # ties on the date
               + [timedelta(seconds=rng.uniform(1, 3600)) for _ in range(40)]
               + [timedelta(days=rng.uniform(1, 1100)) for _ in range(40)]
               + [timedelta(days=500, milliseconds=i) for i in range(20)]
               + [timedelta(days=-2_900_000)])  # year 9966: windows would pass year 9999
    docs = []
    for i, offset in enumerate(offsets):
        expires = None if i % 9 == 4 else now + timedelta(days=rng.uniform(-400, 400))
        docs.append({"_id": f"crt_w{rng.randrange(10**6):06d}_{i:03d}",
                     "project_id": f"prj_w{i % 2}", "created_at": now - offset,
                     "not_after": expires, "status": "failed" if i % 5 == 1 else "issued",
                     "deleted_at": now if i % 11 == 3 else None})
    coll.insert_many(docs)
    before = now + timedelta(days=100)
    lists = [({"deleted_at": None}, ("created_at", "_id")),
             ({"deleted_at": None, "status": "issued"}, ("created_at", "_id")),
             ({"deleted_at": None, "project_id": "prj_w1"}, ("created_at", "_id")),
             ({"deleted_at": None, "not_after": {"$lt": before}}, ("not_after", "_id"))]

    def expected(query: dict[str, Any], keys: tuple[str, str]) -> list[str]:
        found = coll.find(query, {k: 1 for k in keys})
        return [d["_id"] for d in sorted(found, key=lambda d: tuple(d[k] for k in keys))]

    def walk(query: dict[str, Any], keys: tuple[str, str], limit: int) -> list[str]:
        seen: list[str] = []
        cursor = None
        for _ in range(500):
            page = common.windowed_paginate(coll, query, limit=limit, cursor=cursor,
                                            keys=keys, projection={k: 1 for k in keys})
            assert len(page["items"]) <= limit
            seen.extend(d["_id"] for d in page["items"])
            cursor = page["next_cursor"]
            if cursor is None:
                return seen
        raise AssertionError("no last page")

    common._hints.clear()
    for query, keys in lists:
        want = expected(query, keys)
        assert len(want) > 30
        for limit in (1, 7, 50, 200):
            assert walk(query, keys, limit) == want, (query, limit)  # cold, then warm
            assert walk(query, keys, limit) == want, (query, limit)
    # Documents below where the warm hints put the first page's end, and one that joins
    # the issued ones with an old date: the next first pages start with them.
    coll.insert_many([{"_id": "crt_w_oldest", "project_id": "prj_w1", "status": "issued",
                       "created_at": now - timedelta(days=4000), "deleted_at": None,
                       "not_after": now - timedelta(days=4000)}])
    rejoined = docs[1]  # status failed, among the ties
    coll.update_one({"_id": rejoined["_id"]}, {"$set": {"status": "issued"}})
    for query, keys in lists:
        want = expected(query, keys)
        assert walk(query, keys, 7) == want, query
        if "status" in query:
            assert rejoined["_id"] in want
    assert walk(*lists[0], 7)[0] == "crt_w_oldest"


def test_a_page_after_a_cursor_is_one_read(migrated_db, mongo_uri) -> None:
    """The range after a cursor includes the cursor's own document (ties on the date are
    dropped in the application): each pager asks for it too, so a deep page costs one
    read, not a second one for the item it dropped (every deep page took two before)."""
    from pymongo import MongoClient, monitoring

    from app.api import common

    class Finds(monitoring.CommandListener):
        count = 0

        def started(self, event: monitoring.CommandStartedEvent) -> None:
            if event.command_name == "find":
                Finds.count += 1

        def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
            pass

        def failed(self, event: monitoring.CommandFailedEvent) -> None:
            pass

    now = dbm.server_now(migrated_db)
    migrated_db[dbm.CERTIFICATES].insert_many([
        {"_id": f"crt_one{i:04d}", "project_id": "prj_one", "status": "issued",
         "created_at": now - timedelta(minutes=300 - i), "deleted_at": None}
        for i in range(300)])
    client: MongoClient[dict[str, Any]] = MongoClient(
        mongo_uri, tz_aware=True, event_listeners=[Finds()])
    try:
        coll = client.get_default_database()[dbm.CERTIFICATES]
        query = {"deleted_at": None, "status": "issued"}
        keys = ("created_at", "_id")
        common._hints.clear()
        for pager in (common.paginate, common.windowed_paginate):
            cursor, seen, reads = None, [], []
            while True:
                Finds.count = 0
                page = pager(coll, query, limit=50, cursor=cursor, keys=keys,
                             projection={"_id": 1, "created_at": 1})
                reads.append(Finds.count)
                seen.extend(d["_id"] for d in page["items"])
                cursor = page["next_cursor"]
                if cursor is None:
                    break
            assert seen == [f"crt_one{i:04d}" for i in range(300)], pager
            if pager is common.paginate:
                assert reads == [1] * len(reads), reads
            else:
                # Its first deep page learns how much of the date a page covers; every
                # full page after it is one read (the last, short one climbs through
                # empty windows up to the unbounded one).
                assert len(reads) == 6 and reads[2:5] == [1, 1, 1], reads
    finally:
        client.close()


@pytest.fixture
def client_admin(migrated_db, settings):
    from app import create_app
    from app.domain import tokens

    tokens.clear_cache()
    projects = [make_project(migrated_db, "ties")]
    return create_app(settings).test_client(), make_admin(migrated_db), migrated_db, projects


def test_per_event_collections_expire(migrated_db) -> None:
    def ttl(collection: str, index: str) -> Any:
        return migrated_db[collection].index_information()[index]["expireAfterSeconds"]

    assert ttl(dbm.JOBS, "ttl_expire_at") == 0
    assert ttl(dbm.JOBS, "ttl_slot_expire_at") == 0
    assert ttl(dbm.ORDERS, "ttl_expire_at") == 0
    assert ttl(FIRES, "ttl_fired_at") == FIRES_TTL_SECONDS == 86400
    assert ttl(dbm.CHALLENGES, "ttl_expires_at") == 0
    assert ttl(dbm.METRICS_SNAPSHOTS, "ttl_expire_at") == 0
    assert ttl("api_idempotency", "ttl_expires_at") == 0
    # A finished order carries its expiry.
    order = {"_id": "ord_ttl", "state": orders.PENDING, "history": []}
    migrated_db[dbm.ORDERS].insert_one(dict(order))
    orders.transition(migrated_db, order, orders.INVALID)
    stored = migrated_db[dbm.ORDERS].find_one({"_id": "ord_ttl"})
    assert stored["expire_at"] - stored["completed_at"] == orders.ORDER_RETENTION


def test_migration_shortens_an_existing_fires_ttl_and_backfills_orders(db) -> None:
    from app.migrations import discover, migrate

    older = [m for m in discover() if m.version < 10]
    for migration in older:
        migration.apply(db)
        db[dbm.MIGRATIONS].insert_one({"_id": migration.version})
    db[FIRES].drop_index("ttl_fired_at")
    db[FIRES].create_index("fired_at", name="ttl_fired_at", expireAfterSeconds=7 * 86400)
    now = dbm.server_now(db)
    db[dbm.ORDERS].insert_many([
        {"_id": "ord_done", "state": "completed", "completed_at": now},
        {"_id": "ord_open", "state": "pending", "completed_at": None}])
    assert migrate(db) == [m.version for m in discover() if m.version >= 10]
    assert db[FIRES].index_information()["ttl_fired_at"]["expireAfterSeconds"] == 86400
    done = db[dbm.ORDERS].find_one({"_id": "ord_done"})
    assert done["expire_at"] == now + orders.ORDER_RETENTION
    assert "expire_at" not in db[dbm.ORDERS].find_one({"_id": "ord_open"})
    indexes = db[dbm.CERTIFICATES].index_information()
    assert {"deleted_renewal", "project_deleted_created"} <= set(indexes)
    assert "project_created" not in indexes and "project_status" not in indexes
