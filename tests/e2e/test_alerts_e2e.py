"""Alerts with three real worker processes: many concurrent evaluations send each alert
once per channel, and a receiver that is down for a while receives the backlog once, in
order, when it is back (delivery as durable jobs, retried with backoff)."""

from __future__ import annotations

from collections import Counter
from datetime import timedelta
from typing import Any

from app import db as dbm
from app.audit import system_actor
from app.domain import accounts, certificates
from app.jobs import enqueue
from app.ops.alerts import channels, engine
from tests.helpers import wait_for
from tests.helpers.api import make_project
from tests.helpers.receivers import HttpReceiver

ACTOR = system_actor("cli")
ALERT_ENV = {"CAP_ALERT_RETRY_BASE_SECONDS": "0.5", "CAP_ALERT_RETRY_MAX_SECONDS": "2"}


def expiring(db: Any, project: str, days: float, name: str) -> str:
    cert = certificates.create_certificate(db, project, {"names": [name]}, ACTOR)
    now = dbm.server_now(db)
    db[dbm.CERTIFICATES].update_one({"_id": cert["_id"]}, {"$set": {
        "status": "issued", "not_after": now + timedelta(days=days), "serial": name[:8]}})
    return str(cert["_id"])


def evaluations(db: Any, count: int, tag: str) -> None:
    """As many alerts.evaluate jobs at once as an api fleet and a leader could cause."""
    for i in range(count):
        enqueue(db, engine.EVALUATE_JOB_KIND, {}, dedupe_key=f"test:{tag}:{i}")


def settled(db: Any) -> bool:
    return (db[dbm.ALERT_DELIVERIES].count_documents({"state": "pending"}) == 0
            and db[dbm.JOBS].count_documents({"state": {"$in": ["queued", "running"]}}) == 0)


def test_three_workers_send_each_alert_once_and_a_receiver_gets_its_backlog(
        jenv: dict[str, str], migrated_db: Any, procs: Any) -> None:
    db = migrated_db
    env = {**jenv, **ALERT_ENV}
    team, oncall = HttpReceiver(), HttpReceiver()
    try:
        project = make_project(db, "alpha")
        accounts.create_account(db, project, {"directory_url": "https://127.0.0.1:1/dir",
                                              "terms_agreed": True}, ACTOR, register=False)
        channels.create_channel(db, project, {"name": "team", "url": team.url(),
                                              "allow_http": True}, ACTOR,
                                rule_names=engine.RULES)
        channels.create_channel(db, None, {"name": "oncall", "url": oncall.url(),
                                           "allow_http": True}, ACTOR, rule_names=engine.RULES)
        for i, days in enumerate((29, 13, 6, 2.5, 0.5, -1)):
            expiring(db, project, days, f"c{i}.example.com")
        dead = enqueue(db, "certificates.issue", {"certificate_id": "gone"},
                       project_id=project, publish=False)
        db[dbm.JOBS].update_one({"_id": dead["_id"]}, {"$set": {"state": "dead"}})

        for _ in range(3):
            procs.worker(env, name="worker", concurrency=1)
        wait_for(lambda: db[dbm.WORKERS].count_documents({"state": "running"}) >= 3,
                 timeout=150, message="3 workers heartbeating")
        evaluations(db, 12, "first")
        wait_for(lambda: len(team.received) >= 7 and len(oncall.received) >= 7
                 and settled(db), timeout=180, message="7 alerts delivered to both")
        evaluations(db, 6, "again")  # more evaluations: nothing new to send
        wait_for(lambda: settled(db), timeout=120, message="evaluations done")
        for receiver in (team, oncall):
            ids = Counter(b["alert_id"] for b in receiver.bodies())
            assert len(ids) == 7 and set(ids.values()) == {1}, ids
        assert db[dbm.ALERTS].count_documents({}) == 7
        assert db[dbm.AUDIT].count_documents({"action": "alert.sent"}) == 14
        assert db[dbm.AUDIT].count_documents({"action": "alert.open"}) == 7

        # The team's receiver goes down; three more alerts wait for it (the other channel
        # is not held up), then it comes back on the same port.
        team.down()
        for i, days in enumerate((20, 10, 4)):
            expiring(db, project, days, f"late{i}.example.com")
        evaluations(db, 3, "outage")
        team_channel = db[dbm.ALERT_CHANNELS].find_one({"name": "team"})
        wait_for(lambda: ((db[dbm.ALERT_CHANNELS].find_one({"_id": team_channel["_id"]})
                           .get("failure") or {}).get("count") or 0) >= 2,
                 timeout=120, message="the team channel failed twice (backoff)")
        wait_for(lambda: len(oncall.received) == 10, timeout=120,
                 message="the on-call channel got the three new alerts meanwhile")
        assert len(team.received) == 7
        team.up()
        wait_for(lambda: len(team.received) >= 10 and settled(db), timeout=120,
                 message="the backlog delivered")
        evaluations(db, 3, "after")
        wait_for(lambda: settled(db), timeout=120, message="evaluations done")
        bodies = team.bodies()
        assert len(bodies) == 10 and len({b["alert_id"] for b in bodies}) == 10
        in_seq = [d["message"]["alert_id"] for d in db[dbm.ALERT_DELIVERIES].find(
            {"channel_id": team_channel["_id"]}).sort("seq", 1)]
        assert [b["alert_id"] for b in bodies] == in_seq  # in order
        assert db[dbm.ALERT_CHANNELS].find_one({"_id": team_channel["_id"]})["failure"] is None
    finally:
        team.down()
        oncall.down()


def test_workers_alert_when_no_scheduler_leads(jenv: dict[str, str], migrated_db: Any,
                                               procs: Any) -> None:
    """No leader, so no alerts.evaluate is enqueued: the workers notice by themselves,
    and the alert resolves once a scheduler holds the lease again."""
    db = migrated_db
    oncall = HttpReceiver()
    try:
        channels.create_channel(db, None, {"name": "oncall", "url": oncall.url(),
                                           "allow_http": True}, ACTOR, rule_names=engine.RULES)
        now = dbm.server_now(db)
        db[dbm.LEASES].insert_one({"_id": "scheduler", "holder": "beat@gone", "term": 3,
                                   "expires_at": now - timedelta(seconds=120)})
        procs.worker({**jenv, **ALERT_ENV}, name="worker", concurrency=1)
        wait_for(lambda: len(oncall.received) >= 1, timeout=180,
                 message="the scheduler_leader alert")
        firing = oncall.bodies()[0]
        assert (firing["rule"], firing["event"]) == ("scheduler_leader", "firing")
        assert "beat@gone" in firing["summary"]
        db[dbm.LEASES].update_one({"_id": "scheduler"}, {"$set": {
            "holder": "beat@new", "term": 4,
            "expires_at": dbm.server_now(db) + timedelta(hours=1)}})
        wait_for(lambda: len(oncall.received) >= 2, timeout=120, message="resolved")
        assert [b["event"] for b in oncall.bodies()] == ["firing", "resolved"]
    finally:
        oncall.down()
