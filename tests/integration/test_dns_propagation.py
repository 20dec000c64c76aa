"""dns-01 propagation and cleanup against real authoritative servers (Debian's knot).

- A zone with two name servers where the second lags (the test copies the record to it
  later): the challenge is answered only once both serve it, and the certificate shows
  what is awaited meanwhile. Pebble resolves through the lagging server, so an early
  answer would fail validation.
- A record left behind by a killed worker's order is removed by the next attempt.
"""

from __future__ import annotations

import threading
import time

import pytest

from app.acme.dns.lookup import PropagationTimeout
from app.domain import accounts, certificates, orders
from app.domain.issuance import run_issuance
from tests.helpers.dnsservers import Zone, free_loopback, start_knot, txt_at
from tests.helpers.fences import LocalFence
from tests.helpers.pebble import start_pebble
from tests.integration.test_acme_helpers import ACTOR, make_project


def acme(settings, pebble):
    return settings.with_overrides(acme_directory_url=pebble.directory_url,
                                   acme_ca_bundle=pebble.ca_cert,
                                   acme_order_timeout_seconds=60.0)


def rfc2136_spec(knot, zone: str, env: str) -> dict:
    return {"type": "dns-01", "provider": "rfc2136", "server": knot.address,
            "tsig_key_name": knot.key_name, "tsig_secret_env": env,
            "resolvers": [knot.address], "propagation_timeout": 120}


def wait_for(predicate, what: str, timeout: float = 90.0):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_answered_only_when_every_authoritative_server_serves(migrated_db, settings,
                                                              tmp_path, monkeypatch):
    zone = "lag.test"
    first, second = free_loopback(), free_loopback()
    servers = {f"ns1.{zone}": first, f"ns2.{zone}": second}
    primary = start_knot(tmp_path / "ns1", first, [Zone(zone, servers)])
    lagging = start_knot(tmp_path / "ns2", second, [Zone(zone, servers)])
    monkeypatch.setenv("CAP_TEST_TSIG_SECRET", primary.secret)
    pebble = start_pebble(tmp_path / "pebble", dns_server=f"{second}:53")
    try:
        s = acme(settings, pebble)
        project_id = make_project(migrated_db)
        accounts.create_account(migrated_db, project_id, {"terms_agreed": True}, ACTOR,
                                settings=s)
        cert = certificates.create_certificate(migrated_db, project_id, {
            "names": [f"*.{zone}", zone],
            "challenge": rfc2136_spec(primary, zone, "CAP_TEST_TSIG_SECRET")}, ACTOR,
            settings=s)
        outcome: dict = {}

        def issue() -> None:
            try:
                outcome["result"] = run_issuance(migrated_db, LocalFence(migrated_db, "job-lag"),
                                                 cert["_id"], reason="initial", settings=s)
            except Exception as exc:  # noqa: BLE001 - reported by the test
                outcome["error"] = exc

        worker = threading.Thread(target=issue, daemon=True)
        worker.start()
        awaiting = wait_for(lambda: certificates.get_certificate(
            migrated_db, cert["_id"]).get("awaiting"), "the certificate to show the wait")
        assert awaiting["pending"] and all(f"ns2.{zone}" in p for p in awaiting["pending"])
        values = txt_at(first, f"_acme-challenge.{zone}")
        assert len(values) == 2  # the wildcard's and the apex's
        assert txt_at(second, f"_acme-challenge.{zone}") == []
        order = orders.latest_for_job(migrated_db, "job-lag")
        assert order is not None and order.get("awaiting")
        assert not [a for a in order["authorizations"] if a.get("status") == "answered"]

        time.sleep(1.0)  # the wait goes on while the second server lags
        assert "result" not in outcome and "error" not in outcome
        lagging.update(zone, f"_acme-challenge.{zone}", values)

        worker.join(120)
        assert "error" not in outcome, outcome.get("error")
        assert outcome["result"]["outcome"] == "issued"
        stored = certificates.get_certificate(migrated_db, cert["_id"])
        assert stored["status"] == "issued" and stored.get("awaiting") is None
        assert txt_at(first, f"_acme-challenge.{zone}") == []  # cleaned up after success
    finally:
        pebble.stop()
        primary.stop()
        lagging.stop()


def test_next_attempt_removes_a_killed_workers_record(migrated_db, settings, tmp_path,
                                                      monkeypatch):
    zone = "left.test"
    address = free_loopback()
    knot = start_knot(tmp_path / "knot", address, [Zone(zone, {f"ns.{zone}": address})])
    monkeypatch.setenv("CAP_TEST_TSIG_SECRET", knot.secret)
    pebble = start_pebble(tmp_path / "pebble", dns_server=f"{address}:53")
    try:
        s = acme(settings, pebble)
        project_id = make_project(migrated_db)
        account = accounts.create_account(migrated_db, project_id, {"terms_agreed": True},
                                          ACTOR, settings=s)
        cert = certificates.create_certificate(migrated_db, project_id, {
            "names": [zone], "challenge": rfc2136_spec(knot, zone, "CAP_TEST_TSIG_SECRET")},
            ACTOR, settings=s)
        # What a worker killed between adding its record and answering leaves behind: the
        # order notes the record (saved before it is added) and the record is in the zone.
        stale = orders.new_order_doc(
            certificate=cert, account=account, job_id="job-killed", reason="initial",
            identifiers=cert["identifiers"], key_type=cert["key_type"], key_id="",
            csr_pem="", challenge=cert["challenge"], profile=None, replaces=None, attempt=1)
        stale["state"] = orders.PENDING
        stale["authorizations"] = [{
            "url": "https://ca.invalid/authz/1", "identifier": zone, "status": "provisioning",
            "challenge": {"type": "dns-01", "url": None, "token": "tok",
                          "dns_value": "left-by-a-killed-worker"}}]
        orders.insert(migrated_db, stale)
        knot.update(zone, f"_acme-challenge.{zone}", ["left-by-a-killed-worker"])

        result = run_issuance(migrated_db, LocalFence(migrated_db, "job-next"), cert["_id"],
                              reason="initial", settings=s)
        assert result["outcome"] == "issued"
        assert txt_at(address, f"_acme-challenge.{zone}") == []
        assert orders.get(migrated_db, stale["_id"]).get("challenges_cleaned_at")
    finally:
        pebble.stop()
        knot.stop()


def test_a_server_that_never_serves_the_record_fails_the_attempt_unanswered(
        migrated_db, settings, tmp_path, monkeypatch):
    zone = "stuck.test"
    first, second = free_loopback(), free_loopback()
    servers = {f"ns1.{zone}": first, f"ns2.{zone}": second}
    primary = start_knot(tmp_path / "ns1", first, [Zone(zone, servers)])
    stuck = start_knot(tmp_path / "ns2", second, [Zone(zone, servers)])
    monkeypatch.setenv("CAP_TEST_TSIG_SECRET", primary.secret)
    pebble = start_pebble(tmp_path / "pebble", dns_server=f"{second}:53")
    try:
        s = acme(settings, pebble)
        project_id = make_project(migrated_db)
        accounts.create_account(migrated_db, project_id, {"terms_agreed": True}, ACTOR,
                                settings=s)
        cert = certificates.create_certificate(migrated_db, project_id, {
            "names": [zone], "challenge": {**rfc2136_spec(primary, zone,
                                                          "CAP_TEST_TSIG_SECRET"),
                                           "propagation_timeout": 3}}, ACTOR, settings=s)
        with pytest.raises(PropagationTimeout, match=f"ns2.{zone}"):
            run_issuance(migrated_db, LocalFence(migrated_db, "job-stuck"), cert["_id"],
                         reason="initial", settings=s)
        order = orders.latest_for_job(migrated_db, "job-stuck")
        assert not [a for a in order["authorizations"] if a.get("status") == "answered"]
        assert certificates.get_certificate(migrated_db, cert["_id"]).get("awaiting") is None
    finally:
        pebble.stop()
        primary.stop()
        stuck.stop()
