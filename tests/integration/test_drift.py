"""Drift scans against real local TLS servers (tests/helpers/receivers.py): the current,
an older and a foreign certificate, one that is down, STARTTLS for SMTP, IMAP and
PostgreSQL; what the API and /metrics show; the spread of scans over the interval; and
a real renewal against Pebble whose endpoint switches to the new certificate."""

from __future__ import annotations

import json
import re
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from app import create_app
from app import db as dbm
from app.audit import system_actor
from app.config.watch import WatchSettings
from app.domain import certificates, drift, orders
from app.domain.issued import describe_issued
from tests.helpers.api import make_admin
from tests.helpers.receivers import CertFactory, Leaf, TlsEndpoint, closed_port
from tests.integration.test_acme_helpers import (
    acme_settings,
    make_account,
    make_project,
    responder,
)

ACTOR = system_actor("cli")


def txn(db: Any) -> Any:
    return lambda fn: dbm.transaction(db, fn)


def make_issued(db: Any, settings: Any, leaf: Leaf, endpoints: list[Any],
                name: str = "drift.example.com") -> dict[str, Any]:
    """A certificate whose current certificate is ``leaf`` (as if issued), with
    endpoints: the stored data an issuance leaves, written directly."""
    project = make_project(db, f"p{abs(hash(name)) % 10**8}")
    make_account(db, project, settings)
    cert = certificates.create_certificate(db, project, {"names": [name],
                                                         "endpoints": endpoints}, ACTOR)
    issued = describe_issued(leaf.pem)
    db[dbm.CERTIFICATES].update_one({"_id": cert["_id"]}, {"$set": {
        **issued, "status": "issued", "next_renewal_at": None}})
    return certificates.get_certificate(db, cert["_id"])


def our_older(db: Any, cert: dict[str, Any], leaf: Leaf) -> None:
    """An earlier, completed order of this certificate that issued ``leaf``."""
    db[dbm.ORDERS].insert_one({"_id": f"ord_old_{leaf.serial[:8]}",
                               "certificate_id": cert["_id"], "project_id": cert["project_id"],
                               "state": orders.COMPLETED, "serial": leaf.serial})


def due_now(db: Any) -> None:
    """Move time through the data: every endpoint's next scan is in the past."""
    past = dbm.server_now(db) - timedelta(seconds=1)
    db[dbm.ENDPOINT_SCANS].update_many({}, {"$set": {"next_scan_at": past}})


@pytest.fixture
def ca(tmp_path: Path) -> CertFactory:
    return CertFactory(tmp_path / "ours")


@pytest.fixture
def servers() -> Any:
    started: list[TlsEndpoint] = []

    def start(leaf: Leaf, starttls: str | None = None) -> TlsEndpoint:
        server = TlsEndpoint(leaf.cert_path, leaf.key_path, starttls)
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()


def test_scan_flags_current_stale_foreign_unreachable_and_expiring(
        migrated_db: Any, settings: Any, ca: CertFactory, servers: Any,
        tmp_path: Path) -> None:
    db = migrated_db
    current, older = ca.leaf("drift.example.com"), ca.leaf("drift.example.com")
    foreign = CertFactory(tmp_path / "theirs", "Someone Else CA").leaf("drift.example.com",
                                                                       days=10)
    eps = {"current": servers(current), "older": servers(older), "foreign": servers(foreign),
           "smtp": servers(current, "smtp"), "imap": servers(older, "imap"),
           "postgres": servers(current, "postgres")}
    down = closed_port()
    cert = make_issued(db, settings, current, [
        eps["current"].address, {"host": "127.0.0.1", "port": eps["older"].port,
                                 "sni": "drift.example.com"},
        eps["foreign"].address, f"127.0.0.1:{down}",
        {"host": "127.0.0.1", "port": eps["smtp"].port, "starttls": "smtp"},
        {"host": "127.0.0.1", "port": eps["imap"].port, "starttls": "imap"},
        {"host": "127.0.0.1", "port": eps["postgres"].port, "starttls": "postgres"}])
    our_older(db, cert, older)
    assert db[dbm.ENDPOINT_SCANS].count_documents({"state": "pending"}) == 7

    due_now(db)
    summary = drift.scan_due(db, settings=settings)
    assert summary["scanned"] == 7
    assert summary["states"] == {"ok": 3, "stale": 2, "foreign": 1, "unreachable": 1}
    by_key = {d["key"]: d for d in db[dbm.ENDPOINT_SCANS].find()}
    assert by_key[eps["current"].address]["state"] == "ok"
    assert by_key[eps["current"].address]["served"]["fingerprint_sha256"] == \
        current.fingerprint_sha256
    assert by_key[f"{eps['older'].address}/drift.example.com"]["state"] == "stale"
    assert by_key[f"{eps['imap'].address}+imap"]["state"] == "stale"
    assert by_key[f"{eps['smtp'].address}+smtp"]["state"] == "ok"
    assert by_key[f"{eps['postgres'].address}+postgres"]["state"] == "ok"
    foreign_scan = by_key[eps["foreign"].address]
    assert (foreign_scan["state"], foreign_scan["flags"]) == ("foreign", ["expiring"])
    assert foreign_scan["served"]["issuer"] == "CN=Someone Else CA"
    unreachable = by_key[f"127.0.0.1:{down}"]
    assert unreachable["state"] == "unreachable"
    assert "refused" in unreachable["error"].lower()
    # Each endpoint comes back one interval later, not at the next scan.
    now = dbm.server_now(db)
    assert all(d["next_scan_at"] > now + timedelta(minutes=50) for d in by_key.values())
    assert drift.scan_due(db, settings=settings)["scanned"] == 0

    # The certificate's API answer shows each endpoint's state; /metrics counts them.
    app = create_app(settings)
    client = app.test_client()
    admin = make_admin(db)
    answer = client.get(f"/api/v1/certificates/{cert['_id']}", headers=admin.headers).json
    states = {row["endpoint"]: row["state"] for row in answer["endpoint_status"]}
    assert states[eps["foreign"].address] == "foreign"
    assert sorted(states.values()) == ["foreign", "ok", "ok", "ok", "stale", "stale",
                                       "unreachable"]
    assert answer["endpoints"][0] == {"host": "127.0.0.1", "port": eps["current"].port,
                                      "sni": None, "starttls": None}
    metrics = client.get("/metrics").get_data(as_text=True)
    for state, count in (("ok", 3), ("stale", 2), ("foreign", 1), ("unreachable", 1),
                         ("expiring", 1), ("pending", 0)):
        assert f'certautopilot_endpoint_drift{{state="{state}"}} {count}.0' in metrics
    served = re.findall(r'certautopilot_endpoint_served_expiration_timestamp_seconds\{'
                        r'certificate="([^"]+)",endpoint="([^"]+)"', metrics)
    assert len(served) == 6 and {c for c, _ in served} == {cert["_id"]}


def test_endpoints_through_the_api_are_validated_and_kept_in_sync(
        migrated_db: Any, settings: Any, ca: CertFactory) -> None:
    db = migrated_db
    cert = make_issued(db, settings, ca.leaf(), ["a.example.com:443"])
    client = create_app(settings).test_client()
    admin = make_admin(db)
    url = f"/api/v1/certificates/{cert['_id']}"
    bad = client.patch(url, headers=admin.headers,
                       json={"endpoints": [{"host": "a.example.com", "port": 443,
                                            "starttls": "pop3"}]})
    assert bad.status_code == 422 and bad.json["code"] == "validation_failed"
    assert db[dbm.ENDPOINT_SCANS].distinct("key") == ["a.example.com:443"]
    # The same endpoint twice (case aside) is one: the API merges it (the schema cannot
    # say two objects are the same endpoint).
    dup = client.patch(url, headers=admin.headers, json={"endpoints": [
        {"host": "b.example.com", "port": 443}, {"host": "B.example.com", "port": 443}]})
    assert dup.status_code == 200 and len(dup.json["endpoints"]) == 1, dup.json
    assert db[dbm.ENDPOINT_SCANS].distinct("key") == ["b.example.com:443"]
    ok = client.patch(url, headers=admin.headers, json={"endpoints": [
        {"host": "a.example.com", "port": 443},
        {"host": "mail.example.com", "port": 587, "starttls": "smtp"}]})
    assert ok.status_code == 200, ok.json
    assert sorted(db[dbm.ENDPOINT_SCANS].distinct("key")) == [
        "a.example.com:443", "mail.example.com:587+smtp"]
    assert [r["state"] for r in ok.json["endpoint_status"]] == ["pending", "pending"]
    assert client.delete(url, headers=admin.headers).status_code == 204
    assert db[dbm.ENDPOINT_SCANS].count_documents({}) == 0


def test_scans_are_spread_over_the_interval_and_only_due_ones_run(
        migrated_db: Any, settings: Any, ca: CertFactory) -> None:
    db = migrated_db
    settings = settings.with_overrides(watch=WatchSettings(drift_scan_interval_seconds=3600,
                                                           drift_connect_timeout_seconds=2))
    down = closed_port()  # 50 endpoints: one closed port, 50 server names
    cert = make_issued(db, settings, ca.leaf(), [
        {"host": "127.0.0.1", "port": down, "sni": f"h{i}.example.com"} for i in range(50)])
    now = dbm.server_now(db)
    offsets = sorted((d["next_scan_at"] - now).total_seconds()
                     for d in db[dbm.ENDPOINT_SCANS].find({"certificate_id": cert["_id"]}))
    assert len(offsets) == 50
    assert -60 < offsets[0] and offsets[-1] < 3600
    assert offsets[-1] - offsets[0] > 1800  # not a burst: spread over the hour
    # Time moves through the data: the first five slots have come.
    first = [d["_id"] for d in db[dbm.ENDPOINT_SCANS].find(
        {"certificate_id": cert["_id"]}).sort("next_scan_at", 1).limit(5)]
    db[dbm.ENDPOINT_SCANS].update_many({"_id": {"$in": first}},
                                       {"$set": {"next_scan_at": now - timedelta(seconds=1)}})
    db[dbm.ENDPOINT_SCANS].update_many({"_id": {"$nin": first}},
                                       {"$set": {"next_scan_at": now + timedelta(minutes=5)}})
    summary = drift.scan_due(db, settings=settings)
    assert summary == {"scanned": 5, "states": {"unreachable": 5}, "verified": 0}
    assert db[dbm.ENDPOINT_SCANS].count_documents({"state": "pending"}) == 45


def test_a_renewal_is_verified_once_its_endpoint_serves_it(
        migrated_db: Any, settings: Any, pebble: Any, servers: Any, ca: CertFactory,
        tmp_path: Path) -> None:
    """A real issuance and renewal against Pebble; the endpoint (a 'load balancer') keeps
    the old certificate until it is reloaded with the new one."""
    from app.domain.issuance import run_issuance
    from app.keys import open_private_key
    from tests.helpers.fences import LocalFence

    db = migrated_db
    settings = acme_settings(settings, pebble).with_overrides(watch=WatchSettings(
        drift_verify_delay_seconds=600, drift_verify_attempts=3))
    balancer = servers(ca.leaf())  # serves a placeholder until the first deployment
    project = make_project(db, "drift-renewal")
    make_account(db, project, settings)
    cert = certificates.create_certificate(db, project, {
        "names": ["lb.drift.test"], "endpoints": [balancer.address]}, ACTOR,
        settings=settings)

    def deploy(doc: dict[str, Any], name: str) -> None:
        key = open_private_key(db, doc["key_id"], project_id=project)
        (tmp_path / f"{name}.pem").write_text(doc["fullchain_pem"])
        (tmp_path / f"{name}.key").write_bytes(key)
        balancer.serve(tmp_path / f"{name}.pem", tmp_path / f"{name}.key")

    with responder(settings, pebble.http_port):
        run_issuance(db, LocalFence(db, "first"), cert["_id"], reason="initial",
                     settings=settings)
        first = certificates.get_certificate(db, cert["_id"])
        assert first.get("verification") is None  # a first issuance is not a renewal
        deploy(first, "first")
        run_issuance(db, LocalFence(db, "renewal"), cert["_id"], reason="renewal",
                     settings=settings)
    renewed = certificates.get_certificate(db, cert["_id"])
    assert renewed["serial"] != first["serial"]
    verification = renewed["verification"]
    assert (verification["state"], verification["serial"]) == ("pending", renewed["serial"])
    job = db[dbm.JOBS].find_one({"kind": drift.VERIFY_JOB_KIND})
    assert job is not None and job["payload"] == {"certificate_id": cert["_id"]}
    assert job["run_after"] > dbm.server_now(db) + timedelta(seconds=500)  # the delay

    # The balancer was not reloaded: the old certificate (ours) is stale; try again later.
    outcome = drift.verify(db, cert["_id"], settings=settings, run_txn=txn(db))
    assert (outcome["outcome"], outcome["attempts"]) == ("retry", 1)
    assert outcome["failing"][0]["state"] == "stale"
    assert drift.endpoint_status(db, renewed)[0]["state"] == "stale"

    deploy(renewed, "renewed")
    outcome = drift.verify(db, cert["_id"], settings=settings, run_txn=txn(db))
    assert (outcome["outcome"], outcome["attempts"]) == ("verified", 2)
    final = certificates.get_certificate(db, cert["_id"])
    assert final["verification"]["state"] == "verified"
    assert drift.endpoint_status(db, final)[0]["state"] == "ok"
    entry = db[dbm.AUDIT].find_one({"action": "certificate.verified"})
    assert entry is not None and entry["target"] == f"certificate:{cert['_id']}"
    # Nothing left to verify: a repeated job is a no-op.
    assert drift.verify(db, cert["_id"], settings=settings,
                        run_txn=txn(db))["outcome"] == "nothing"


def test_endpoints_cli_add_list_scan_remove(migrated_db: Any, settings: Any,
                                            ca: CertFactory, servers: Any) -> None:
    from click.testing import CliRunner

    from app.cli import cli

    db = migrated_db
    current = ca.leaf("cli.example.com")
    cert = make_issued(db, settings, current, [])
    server = servers(current, "smtp")
    runner = CliRunner()
    added = runner.invoke(cli, ["endpoints", "add", cert["_id"], server.address,
                                "--starttls", "smtp", "--sni", "cli.example.com"])
    assert added.exit_code == 0, added.output
    key = f"{server.address}/cli.example.com+smtp"
    assert added.output.strip() == f"added {key}"
    again = runner.invoke(cli, ["endpoints", "add", cert["_id"], server.address,
                                "--starttls", "smtp", "--sni", "cli.example.com"])
    assert again.exit_code == 1 and "already an endpoint" in again.output
    bad = runner.invoke(cli, ["endpoints", "add", cert["_id"], "no-port"])
    assert bad.exit_code == 1 and len(bad.output.strip().splitlines()) == 1
    assert "pending" in runner.invoke(cli, ["endpoints", "list", cert["_id"]]).output
    scanned = runner.invoke(cli, ["endpoints", "scan", cert["_id"], "--json"])
    assert scanned.exit_code == 0, scanned.output
    row = json.loads(scanned.output)[0]
    assert (row["endpoint"], row["state"]) == (key, "ok")
    assert row["served"]["serial"] == current.serial
    unknown = ca.leaf("cli.example.com")  # same CA, never stored: not one of ours
    server.serve(unknown.cert_path, unknown.key_path)
    assert runner.invoke(cli, ["endpoints", "scan", cert["_id"]]).exit_code == 1  # foreign
    removed = runner.invoke(cli, ["endpoints", "remove", cert["_id"], server.address,
                                  "--starttls", "smtp", "--sni", "cli.example.com"])
    assert removed.exit_code == 0, removed.output
    assert db[dbm.ENDPOINT_SCANS].count_documents({}) == 0


def test_a_renewal_never_served_is_flagged_and_alerts_until_it_is(
        migrated_db: Any, settings: Any, ca: CertFactory, servers: Any,
        tmp_path: Path) -> None:
    """The verification job (the real handler, run in process): retried after the delay
    while the endpoint serves another certificate, then `unverified` (an alert); once a
    regular scan sees the new certificate served, `verified` and the alert resolves."""
    from app.handlers import load_handlers
    from app.jobs import enqueue, runner
    from app.ops.alerts import engine

    load_handlers()
    db = migrated_db
    settings = settings.with_overrides(watch=WatchSettings(drift_verify_delay_seconds=600,
                                                           drift_verify_attempts=2))
    current = ca.leaf("v.example.com")
    foreign = CertFactory(tmp_path / "theirs", "Other CA").leaf("v.example.com")
    server = servers(foreign)
    cert = make_issued(db, settings, current, [server.address], name="v.example.com")
    db[dbm.CERTIFICATES].update_one({"_id": cert["_id"]}, {"$set": {"verification": {
        "state": "pending", "fingerprint_sha256": current.fingerprint_sha256,
        "serial": current.serial, "attempts": 0}}})
    job = enqueue(db, drift.VERIFY_JOB_KIND, {"certificate_id": cert["_id"]},
                  publish=False, settings=settings)

    def run() -> dict[str, Any]:
        # Time moves through the data: the delayed attempt is due now.
        db[dbm.JOBS].update_one({"_id": job["_id"]}, {"$set": {
            "run_after": dbm.server_now(db) - timedelta(seconds=1)}})
        runner.run_job(job["_id"], db=db, settings=settings, worker="test")
        return db[dbm.JOBS].find_one({"_id": job["_id"]})

    first = run()
    assert first["state"] == "queued" and first["attempts"] == 0  # RetryLater
    assert first["run_after"] > dbm.server_now(db) + timedelta(seconds=500)
    assert "do not serve the new certificate yet" in first["last_error"]
    second = run()
    assert second["state"] == "succeeded", second
    assert second["result"]["outcome"] == "unverified"
    flagged = certificates.get_certificate(db, cert["_id"])["verification"]
    assert (flagged["state"], flagged["failing"][0]["state"]) == ("unverified", "foreign")
    engine.evaluate(db, settings=settings)
    assert sorted(a["rule"] for a in engine.list_alerts(db)) == ["drift",
                                                                 "renewal_not_verified"]

    server.serve(current.cert_path, current.key_path)  # the load balancer is reloaded
    due_now(db)
    assert drift.scan_due(db, settings=settings)["verified"] == 1
    assert certificates.get_certificate(db, cert["_id"])["verification"]["state"] == \
        "verified"
    assert engine.evaluate(db, settings=settings)["resolved"] == 2
    assert engine.list_alerts(db) == []
