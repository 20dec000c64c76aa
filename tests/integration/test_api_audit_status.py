"""Audit queries (time, actor, action, target; a project sees its own entries) and the
scheduler / worker status resources."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from urllib.parse import quote

import pytest

from app import create_app
from app import db as dbm
from app.domain import tokens
from tests.helpers.api import API, make_admin, make_project, make_token


@pytest.fixture
def client(migrated_db, settings):
    tokens.clear_cache()
    return create_app(settings).test_client()


def q(value: datetime) -> str:
    return quote(value.isoformat())


def test_audit_query_filters_and_isolation(client, migrated_db) -> None:
    admin = make_admin(migrated_db)
    a, b = make_project(migrated_db, "alpha"), make_project(migrated_db, "beta")
    writer_a = make_token(migrated_db, a, ["read", "write"])
    reader_b = make_token(migrated_db, b, ["read"])
    time.sleep(0.01)
    before = datetime.now(UTC)
    time.sleep(0.01)
    created = client.post(f"{API}/tokens", json={"scopes": ["read"], "name": "ci"},
                          headers=writer_a.headers).json
    client.delete(f"{API}/tokens/{created['id']}", headers=writer_a.headers)
    client.patch(f"{API}/projects/{a}", json={"description": "x"}, headers=writer_a.headers)

    def entries(query: str, tok=writer_a) -> list[dict]:
        response = client.get(f"{API}/audit{query}", headers=tok.headers)
        assert response.status_code == 200, response.json
        return response.json["items"]

    mine = entries("")
    assert [e["action"] for e in mine][:3] == ["project.update", "token.revoke",
                                               "token.create"]  # newest first
    assert all(e["project_id"] == a for e in mine)
    assert [e["action"] for e in entries("?order=asc")][0] == "project.create"
    assert {e["action"] for e in entries("?action=token.")} == {"token.create",
                                                                "token.revoke"}
    assert [e["action"] for e in entries("?action=token.revoke")] == ["token.revoke"]
    assert {e["target"] for e in entries(f"?target=token:{created['id']}")} == {
        f"token:{created['id']}"}
    by_actor = entries(f"?actor={writer_a.id}")
    assert len(by_actor) == 3 and all(e["actor"]["id"] == writer_a.id for e in by_actor)
    assert len(entries(f"?since={q(before)}")) == 3
    earlier = entries(f"?until={q(before)}")
    assert {e["action"] for e in earlier} == {"project.create", "token.create"}
    assert all(e["actor"]["kind"] == "system" for e in earlier)
    first = entries("?limit=2")
    page = client.get(f"{API}/audit?limit=2", headers=writer_a.headers).json
    rest = entries(f"?limit=50&cursor={page['next_cursor']}")
    assert [e["seq"] for e in first + rest] == sorted(
        (e["seq"] for e in first + rest), reverse=True)

    # B sees none of A's entries; asking for A's is 404; the admin sees all.
    assert all(e["project_id"] == b for e in entries("", reader_b))
    assert client.get(f"{API}/audit?project_id={a}",
                      headers=reader_b.headers).status_code == 404
    everything = client.get(f"{API}/audit?limit=200", headers=admin.headers).json["items"]
    assert {e["project_id"] for e in everything} >= {a, b, None}
    assert client.get(f"{API}/audit?since=yesterday",
                      headers=admin.headers).status_code == 422


def test_scheduler_and_workers_status(client, migrated_db) -> None:
    pid = make_project(migrated_db, "alpha")
    reader = make_token(migrated_db, pid, ["read"])
    admin = make_admin(migrated_db)
    now = dbm.server_now(migrated_db)
    migrated_db[dbm.LEASES].insert_one({"_id": "scheduler", "holder": "sched-1@h",
                                        "term": 3, "expires_at": now + timedelta(seconds=9),
                                        "renewed_at": now, "acquired_at": now})
    migrated_db[dbm.WORKERS].insert_many([
        {"_id": "w1@h", "host": "h", "pid": 10, "version": "0.1.0", "state": "running",
         "concurrency": 2, "running_jobs": ["652f00000000000000000001"], "last_seen": now,
         "started_at": now, "expires_at": now + timedelta(days=1)},
        {"_id": "w2@h", "host": "h", "pid": 11, "version": "0.1.0", "state": "running",
         "concurrency": 2, "running_jobs": [], "last_seen": now - timedelta(minutes=10),
         "started_at": now - timedelta(hours=1), "expires_at": now + timedelta(days=1)},
    ])
    scheduler = client.get(f"{API}/status/scheduler", headers=reader.headers)
    assert scheduler.status_code == 200
    assert scheduler.json["lease"]["state"] == "held"
    assert scheduler.json["lease"]["holder"] == "sched-1@h"
    assert scheduler.json["lease"]["term"] == 3
    workers = client.get(f"{API}/status/workers", headers=reader.headers)
    assert workers.status_code == 200
    assert workers.json["alive"] == 1
    rows = {w["id"]: w for w in workers.json["workers"]}
    assert rows["w1@h"]["alive"] and rows["w1@h"]["running"] == 1
    assert not rows["w2@h"]["alive"]
    assert "running_jobs" not in rows["w1@h"]  # job ids are for admins
    as_admin = client.get(f"{API}/status/workers", headers=admin.headers).json
    assert {w["id"]: w for w in as_admin["workers"]}["w1@h"]["running_jobs"] == [
        "652f00000000000000000001"]


def test_worker_status_counts_active_jobs_now_and_finished_ones_from_the_snapshot(
        client, migrated_db) -> None:
    """Queued and running jobs are counted at the request; the finished states (a week
    of every renewal and slot) come from the metrics snapshot, with when it counted."""
    from app import metrics_snapshot

    reader = make_token(migrated_db, make_project(migrated_db, "alpha"), ["read"])
    now = dbm.server_now(migrated_db)
    migrated_db[dbm.JOBS].insert_many(
        [{"kind": "k", "state": state, "created_at": now, "run_after": now}
         for state in ["queued"] * 2 + ["running"] + ["succeeded"] * 3 + ["dead"]])

    def status():
        answer = client.get(f"{API}/status/workers", headers=reader.headers)
        assert answer.status_code == 200, answer.json
        return answer.json

    before = status()
    assert before["queue"] == {"queued": 2, "running": 1}
    assert before["finished_counted_at"] is None
    metrics_snapshot.refresh(migrated_db)
    migrated_db[dbm.JOBS].insert_one({"kind": "k", "state": "queued", "created_at": now,
                                      "run_after": now})
    migrated_db[dbm.JOBS].insert_one({"kind": "k", "state": "succeeded",
                                      "created_at": now, "run_after": now})
    after = status()
    # the new queued job at once; the new succeeded one at the snapshot's next refresh
    assert after["queue"] == {"queued": 3, "running": 1, "succeeded": 3, "dead": 1}
    assert after["finished_counted_at"] is not None


def test_a_single_valued_query_parameter_given_twice_is_a_422(client, migrated_db) -> None:
    admin = make_admin(migrated_db)
    for url in (f"{API}/status/ca-budgets?ca=&ca=https://ca.example/dir",
                f"{API}/audit?limit=5&limit=6"):
        answer = client.get(url, headers=admin.headers)
        assert answer.status_code == 422, answer.json
        assert "given more than once" in json.dumps(answer.json)
    assert client.get(f"{API}/status/ca-budgets?ca=https://ca.example/dir",
                      headers=admin.headers).status_code == 200
