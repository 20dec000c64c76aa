"""Alerts against a real HTTPS webhook receiver and a real SMTP server (aiosmtpd):
thresholds crossed by moving time through the data (never by sleeping), each alert sent
once and resolved once, every rule, signatures, secrets never stored in plaintext, a
receiver that was down gets the backlog once and in order, and bad channel definitions
refused (API and CLI) without storing anything."""

from __future__ import annotations

import hashlib
import hmac
import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from app import create_app
from app import db as dbm
from app.audit import system_actor
from app.cli import cli
from app.domain import certificates
from app.ops.alerts import channels, engine
from tests.helpers.api import make_admin, make_project, make_token
from tests.helpers.receivers import HttpReceiver, SmtpReceiver, self_signed

ACTOR = system_actor("cli")
SECRET = "webhook-signing-secret-0123456789"
HOOK_PATH = "/services/T0SECRETPATH/B1/xoxb"


def txn(db: Any) -> Any:
    return lambda fn: dbm.transaction(db, fn)


def deliver_all(db: Any, settings: Any) -> dict[str, str]:
    """Run every channel's delivery once, as its alerts.deliver job would; the channels
    that refused a message, with the reason."""
    refused = {}
    for channel_id in db[dbm.ALERT_DELIVERIES].distinct("channel_id", {"state": "pending"}):
        try:
            engine.deliver(db, channel_id, settings=settings, run_txn=txn(db),
                           check_lease=lambda: None)
        except engine.RetryChannel as exc:
            refused[channel_id] = exc.reason
    return refused


def cert_expiring(db: Any, settings: Any, project: str, days: float, name: str) -> str:
    from app.domain import accounts

    if not accounts.list_accounts(db, project):
        accounts.create_account(db, project, {"directory_url": "https://127.0.0.1:1/dir",
                                              "terms_agreed": True}, ACTOR, register=False)
    cert = certificates.create_certificate(db, project, {"names": [name]}, ACTOR)
    set_expiry(db, cert["_id"], days)
    return str(cert["_id"])


def set_expiry(db: Any, certificate_id: str, days: float) -> None:
    """Move time through the data: the certificate now expires ``days`` from now."""
    now = dbm.server_now(db)
    db[dbm.CERTIFICATES].update_one({"_id": certificate_id}, {"$set": {
        "status": "issued", "not_before": now - timedelta(days=90 - days),
        "not_after": now + timedelta(days=days), "serial": f"{int(days * 1000):x}"}})


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[Path, Path]:
    directory = tmp_path / "tls"
    directory.mkdir()
    return self_signed(directory)


@pytest.fixture
def receiver(tls_files: tuple[Path, Path]) -> Any:
    hook = HttpReceiver(tls=tls_files)
    yield hook
    hook.down()


@pytest.fixture
def smtp(tls_files: tuple[Path, Path]) -> Any:
    server = SmtpReceiver(*tls_files)
    yield server
    server.close()


def test_expiry_thresholds_fire_once_each_and_resolve_on_renewal(
        migrated_db: Any, settings: Any, receiver: HttpReceiver,
        tls_files: tuple[Path, Path]) -> None:
    db = migrated_db
    project = make_project(db, "alpha")
    client = create_app(settings).test_client()
    owner = make_token(db, project, ["read", "write"])
    created = client.post("/api/v1/alert-channels", headers=owner.headers, json={
        "name": "ops", "url": receiver.url(HOOK_PATH), "secret": SECRET,
        "ca_file": str(tls_files[0])})
    assert created.status_code == 201, created.json
    assert created.json["target"] == f"https://127.0.0.1:{receiver.port}/…"
    assert "url" not in created.json and "secret" not in created.json
    crt = cert_expiring(db, settings, project, 29.5, "web.example.com")
    late = cert_expiring(db, settings, project, 2.5, "late.example.com")

    assert engine.evaluate(db, settings=settings)["opened"] == 2
    for _ in range(3):  # evaluating again (any number of times) sends nothing new
        assert engine.evaluate(db, settings=settings)["opened"] == 0
    assert deliver_all(db, settings) == {}
    first = {b["subject"]: (b["threshold"], b["event"]) for b in receiver.bodies()}
    # A certificate first seen at 2.5 days gets the 3-day alert, not 30, 14, 7 and 3.
    assert first == {f"certificate:{crt}": ("30", "firing"),
                     f"certificate:{late}": ("3", "firing")}

    # The webhook's signature checks out with the channel's secret.
    request = receiver.received[0]
    signed = f"{request.headers['X-CertAutoPilot-Timestamp']}.".encode() + request.body
    assert request.headers["X-CertAutoPilot-Signature"] == "sha256=" + hmac.new(
        SECRET.encode(), signed, hashlib.sha256).hexdigest()
    assert request.path == HOOK_PATH

    set_expiry(db, crt, 13)  # two weeks later
    assert engine.evaluate(db, settings=settings)["opened"] == 1
    deliver_all(db, settings)
    assert [(b["threshold"], b["event"]) for b in receiver.bodies()][2:] == [("14", "firing")]

    set_expiry(db, crt, 89)  # renewed
    assert engine.evaluate(db, settings=settings)["resolved"] == 2
    deliver_all(db, settings)
    assert sorted((b["threshold"], b["event"]) for b in receiver.bodies()[3:]) == [
        ("14", "resolved"), ("30", "resolved")]
    assert len(receiver.received) == 5
    assert engine.evaluate(db, settings=settings) == {
        "opened": 0, "resolved": 0, "open": 1, "channels_woken": 0}

    actions = [e["action"] for e in db[dbm.AUDIT].find({"action": {"$regex": "^alert"}})]
    assert actions.count("alert.open") == 3 and actions.count("alert.resolve") == 2
    assert actions.count("alert.sent") == 5
    # Open alerts, from the API and the CLI.
    listed = client.get("/api/v1/alerts", headers=owner.headers).json["items"]
    assert [(a["rule"], a["threshold"]) for a in listed] == [("certificate_expiry", "3")]
    out = CliRunner().invoke(cli, ["alerts", "list"])
    assert out.exit_code == 0 and "certificate_expiry[3]" in out.output
    assert "late.example.com" in out.output and "web.example.com" not in out.output
    assert CliRunner().invoke(cli, ["alerts", "list", "--all"]).output.count("resolved") == 2

    # Neither the webhook URL (a credential for Slack) nor its secret is stored in clear.
    for name in db.list_collection_names():
        text = json.dumps(list(db[name].find()), default=str)
        assert "T0SECRETPATH" not in text and SECRET not in text, name


def test_every_rule_fires_once_and_clears(migrated_db: Any, settings: Any, smtp: SmtpReceiver,
                                          receiver: HttpReceiver, tls_files: tuple[Path, Path],
                                          monkeypatch: pytest.MonkeyPatch,
                                          tmp_path: Path) -> None:
    from app.config.audit_sinks import parse_sinks
    from app.jobs import enqueue

    db = migrated_db
    monkeypatch.setenv("CAP_ALERT_SMTP_PASSWORD", "s3cret-password")
    monkeypatch.setenv("CAP_AUDIT_SINKS", f"file://{tmp_path}/audit.jsonl")
    project, other = make_project(db, "alpha"), make_project(db, "beta")
    mail = channels.create_channel(db, None, {
        "name": "oncall", "url": f"smtp://alerts@127.0.0.1:{smtp.port}",
        "password_env": "CAP_ALERT_SMTP_PASSWORD", "to": ["oncall@example.com"],
        "from": "cap@example.com", "ca_file": str(tls_files[0])}, ACTOR,
        rule_names=engine.RULES)
    hook = channels.create_channel(db, project, {
        "name": "team", "url": receiver.url(), "format": "slack",
        "ca_file": str(tls_files[0])}, ACTOR, rule_names=engine.RULES)
    now = dbm.server_now(db)

    failing = cert_expiring(db, settings, project, 60, "fails.example.com")
    db[dbm.CERTIFICATES].update_one({"_id": failing}, {"$set": {"failure": {
        "count": 3, "last_error": {"type": "urn:ietf:params:acme:error:unauthorized",
                                   "detail": "Invalid response from http://fails/: 404"}}}})
    other_cert = cert_expiring(db, settings, other, 60, "beta.example.com")
    db[dbm.CERTIFICATES].update_one({"_id": other_cert}, {"$set": {
        "verification": {"state": "unverified", "fingerprint_sha256": "ab" * 32,
                         "failing": [{"endpoint": "10.0.0.1:443", "state": "stale"}]}}})
    dead = enqueue(db, "certificates.issue", {"certificate_id": failing}, project_id=project,
                   publish=False)
    db[dbm.JOBS].update_one({"_id": dead["_id"]}, {"$set": {
        "state": "dead", "last_error": "CA unreachable", "attempts": 10}})
    db[dbm.LEASES].insert_one({"_id": "scheduler", "holder": "beat@old", "term": 4,
                               "expires_at": now - timedelta(seconds=90)})
    sink = parse_sinks()[0]
    db["audit_sinks"].insert_one({"_id": sink.name, "cursor": 0, "failing_since":
                                  now - timedelta(minutes=10), "last_error": "disk full"})
    db["kek_rotations"].insert_one({"_id": "rot1", "seq": 1, "state": "running",
                                    "target_version": 2, "error_count": 3,
                                    "last_error": "no KEK file named v2.key"})
    db[dbm.ENDPOINT_SCANS].insert_many([
        {"_id": f"{failing}|a:443", "certificate_id": failing, "project_id": project,
         "key": "a:443", "state": "stale", "served": {"serial": "01"},
         "consecutive_failures": 0},
        {"_id": f"{failing}|b:443", "certificate_id": failing, "project_id": project,
         "key": "b:443", "state": "unreachable", "error": "timed out",
         "consecutive_failures": 2},
        {"_id": f"{failing}|c:443", "certificate_id": failing, "project_id": project,
         "key": "c:443", "state": "unreachable", "error": "timed out",
         "consecutive_failures": 1}])  # one failed scan is not yet an alert

    result = engine.evaluate(db, settings=settings)
    rules = sorted(a["rule"] for a in engine.list_alerts(db))
    assert rules == sorted(["renewal_failures", "renewal_not_verified", "dead_job",
                            "scheduler_leader", "audit_sink", "kek_rotation_blocked", "drift",
                            "endpoint_unreachable"]), rules
    assert result["opened"] == 8
    assert engine.evaluate(db, settings=settings)["opened"] == 0
    assert deliver_all(db, settings) == {}
    # The global email channel gets everything; the project's webhook only its own.
    subjects = [" ".join(str(m["Subject"]).split()) for m in smtp.messages]
    assert len(subjects) == 8 and set(smtp.auth_seen) == {"PLAIN"}
    assert any("failed 3 times in a row: urn:ietf:params:acme:error:unauthorized" in s
               for s in subjects)
    assert any("no scheduler has held the leader lease" in s for s in subjects)
    team = receiver.bodies()
    assert sorted(b["text"].split("]")[0] for b in team) == ["[CertAutoPilot FIRING"] * 4
    assert all(set(b) == {"text", "blocks"} for b in team)  # Slack's format
    body = smtp.messages[0].get_payload()
    assert "rule:" in body and "subject:" in body

    # Everything clears: each alert resolves once, with a message.
    db[dbm.CERTIFICATES].update_many({}, {"$set": {"failure": None, "verification": None}})
    db[dbm.JOBS].update_one({"_id": dead["_id"]}, {"$set": {"state": "succeeded"}})
    db[dbm.LEASES].update_one({"_id": "scheduler"}, {"$set": {
        "holder": "beat@new", "expires_at": dbm.server_now(db) + timedelta(seconds=15)}})
    db["audit_sinks"].update_one({"_id": sink.name}, {"$set": {"failing_since": None}})
    db["kek_rotations"].update_one({"_id": "rot1"}, {"$set": {"state": "completed"}})
    db[dbm.ENDPOINT_SCANS].update_many({}, {"$set": {"state": "ok",
                                                     "consecutive_failures": 0}})
    assert engine.evaluate(db, settings=settings)["resolved"] == 8
    assert engine.evaluate(db, settings=settings)["resolved"] == 0
    deliver_all(db, settings)
    assert len(smtp.messages) == 16 and len(receiver.received) == 8
    assert sum("RESOLVED" in m["Subject"] for m in smtp.messages) == 8
    assert mail["_id"] != hook["_id"]


def test_a_receiver_that_was_down_gets_the_backlog_once_in_order(
        migrated_db: Any, settings: Any, receiver: HttpReceiver,
        tls_files: tuple[Path, Path]) -> None:
    db = migrated_db
    project = make_project(db, "alpha")
    channel = channels.create_channel(db, project, {
        "name": "hook", "url": receiver.url(), "ca_file": str(tls_files[0])}, ACTOR,
        rule_names=engine.RULES)
    receiver.down()
    for i in range(3):
        cert_expiring(db, settings, project, 5 + i, f"c{i}.example.com")
        engine.evaluate(db, settings=settings)
    refused = deliver_all(db, settings)
    assert "ConnectionError" in refused[channel["_id"]]
    assert "T0" not in refused[channel["_id"]] and "/hook" not in refused[channel["_id"]]
    first = db[dbm.ALERT_CHANNELS].find_one({"_id": channel["_id"]})["failure"]
    deliver_all(db, settings)  # still down: the next wait doubles
    failure = db[dbm.ALERT_CHANNELS].find_one({"_id": channel["_id"]})["failure"]
    assert (first["count"], failure["count"]) == (1, 2) and failure["since"]
    assert db[dbm.ALERT_DELIVERIES].count_documents({"state": "pending"}) == 3

    receiver.up()  # back, on the same port
    assert deliver_all(db, settings) == {}
    assert deliver_all(db, settings) == {}
    seqs = [d["seq"] for d in db[dbm.ALERT_DELIVERIES].find().sort("sent_at", 1)]
    assert seqs == [1, 2, 3]
    assert [b["subject"] for b in receiver.bodies()] == [
        d["message"]["subject"] for d in db[dbm.ALERT_DELIVERIES].find().sort("seq", 1)]
    health = db[dbm.ALERT_CHANNELS].find_one({"_id": channel["_id"]})
    assert health["failure"] is None and health["last_success_at"]


def test_smtps_with_a_wrong_password_keeps_the_message_until_fixed(
        migrated_db: Any, settings: Any, tls_files: tuple[Path, Path],
        monkeypatch: pytest.MonkeyPatch) -> None:
    db = migrated_db
    server = SmtpReceiver(*tls_files, implicit_tls=True)
    try:
        monkeypatch.setenv("CAP_ALERT_MAIL_PW", "wrong")
        project = make_project(db, "alpha")
        channels.create_channel(db, project, {
            "name": "mail", "url": f"smtps://alerts@127.0.0.1:{server.port}",
            "password_env": "CAP_ALERT_MAIL_PW", "to": ["a@example.com"],
            "ca_file": str(tls_files[0])}, ACTOR, rule_names=engine.RULES)
        cert_expiring(db, settings, project, 1.5, "m.example.com")
        engine.evaluate(db, settings=settings)
        refused = list(deliver_all(db, settings).values())
        assert refused and "authentication refused (535)" in refused[0]
        assert "wrong" not in refused[0]
        monkeypatch.setenv("CAP_ALERT_MAIL_PW", "s3cret-password")
        assert deliver_all(db, settings) == {}
        assert len(server.messages) == 1
        assert server.messages[0]["Subject"].startswith("[CertAutoPilot FIRING] certificate")
    finally:
        server.close()


def test_test_messages_from_the_cli_and_the_api(migrated_db: Any, settings: Any,
                                                receiver: HttpReceiver,
                                                tls_files: tuple[Path, Path]) -> None:
    db = migrated_db
    project = make_project(db, "alpha")
    channel = channels.create_channel(db, project, {
        "name": "hook", "url": receiver.url(), "ca_file": str(tls_files[0])}, ACTOR,
        rule_names=engine.RULES)
    out = CliRunner().invoke(cli, ["alerts", "test", "hook", "--project", "alpha"])
    assert out.exit_code == 0, out.output
    assert receiver.bodies()[0]["event"] == "test"
    client = create_app(settings).test_client()
    owner = make_token(db, project, ["read", "write"])
    ok = client.post(f"/api/v1/alert-channels/{channel['_id']}/test", headers=owner.headers)
    assert ok.status_code == 200 and ok.json["sent"] is True
    assert db[dbm.AUDIT].count_documents({"action": "alert.test_sent"}) == 2

    receiver.down()
    out = CliRunner().invoke(cli, ["alerts", "test", channel["_id"]])
    assert out.exit_code == 1
    assert out.output.strip().splitlines() == [
        f"certautopilot: test message not delivered: webhook https://127.0.0.1:"
        f"{receiver.port}/…: ConnectionError (no answer)"]
    failed = client.post(f"/api/v1/alert-channels/{channel['_id']}/test",
                         headers=owner.headers)
    assert failed.status_code == 502 and failed.json["code"] == "channel_send_failed"
    assert db[dbm.AUDIT].count_documents({"action": "alert.test_sent"}) == 2


def test_bad_channel_definitions_are_refused_and_nothing_is_stored(
        migrated_db: Any, settings: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    db = migrated_db
    monkeypatch.delenv("CAP_ALERT_UNSET", raising=False)
    project = make_project(db, "alpha")
    client = create_app(settings).test_client()
    owner = make_token(db, project, ["read", "write"])
    audit_before = db[dbm.AUDIT].count_documents({})
    # 422: the definition is wrong; 409: it names a variable this server lacks.
    cases = [
        ({"name": "a", "url": "ftp://example.com/x"}, "unknown scheme ftp://", 422),
        ({"name": "a", "url": "http://hooks.example.com/x"}, "must use https://", 422),
        ({"name": "a", "url": "https://u@hooks.example.com/x"}, "no user or password", 422),
        ({"name": "a", "url": "smtp://mail.example.com", "to": ["a@b.c"],
          "secret": "s" * 16}, "only for webhook channels", 422),
        ({"name": "a", "url": "https://hooks.example.com/x", "secret_env": "CAP_ALERT_UNSET"},
         "CAP_ALERT_UNSET is not set", 409),
        ({"name": "a", "url": "smtp://u@mail.example.com", "to": ["a@b.c"],
          "password_env": "CAP_ALERT_UNSET"}, "CAP_ALERT_UNSET is not set", 409),
    ]
    for body, message, status in cases:
        answer = client.post("/api/v1/alert-channels", headers=owner.headers, json=body)
        assert answer.status_code == status, answer.json
        assert message in answer.json["message"]
        assert set(answer.json) == {"code", "status", "message", "errors"}
    forbidden = client.post("/api/v1/alert-channels", headers=owner.headers, json={
        "name": "g", "url": "https://hooks.example.com/x", "global": True})
    assert forbidden.status_code == 403
    admin = make_admin(db)
    audit_before += 1  # the admin token's creation
    for argv, message in (
            (["--project", "alpha", "--url", "gopher://x.example.com"], "unknown scheme"),
            (["--global", "--url", "http://x.example.com/h"], "must use https://"),
            (["--global", "--url", "https://x.example.com/h", "--secret-env", "PATH"],
             "CAP_ALERT_* environment variable"),
            (["--url", "https://x.example.com/h"], "--project P or --global")):
        out = CliRunner().invoke(cli, ["alerts", "channels", "add", "bad", *argv])
        assert out.exit_code == 1, out.output
        lines = out.output.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], lines
    assert db[dbm.ALERT_CHANNELS].count_documents({}) == 0
    assert db[dbm.KEYS].count_documents({}) == 0
    assert db[dbm.AUDIT].count_documents({}) == audit_before
    assert admin.id
