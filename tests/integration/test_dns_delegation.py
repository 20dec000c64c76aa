"""dns-01 CNAME delegation across two real authoritative servers, and the inputs refused
before any CA call.

``_acme-challenge.deleg.test`` (on knot) is a CNAME chain ending in ``acme.test``, a zone
on PowerDNS: the TXT is written there through lexicon's powerdns provider (whose
credentials reach nothing else), the zone is found by SOA lookup, and Pebble follows the
chain through a resolver of the test's zones."""

from __future__ import annotations

import pytest
from cryptography import x509

from app import db as dbm
from app.domain import accounts, certificates
from app.domain.issuance import run_issuance
from app.errors import ValidationFailed
from tests.helpers.dnsservers import (
    Zone,
    free_loopback,
    start_forwarder,
    start_knot,
    start_powerdns,
    txt_at,
)
from tests.helpers.fences import LocalFence
from tests.helpers.pebble import start_pebble
from tests.integration.test_acme_helpers import ACTOR, make_project

TOKEN_ENV = "CAP_TEST_PDNS_API_KEY"


@pytest.fixture
def world(tmp_path):
    """knot serving deleg.test and loop.test, PowerDNS serving acme.test."""
    knot_address, pdns_address = free_loopback(), free_loopback()
    knot = start_knot(tmp_path / "knot", knot_address, [
        Zone("deleg.test", {"ns.deleg.test": knot_address}, [
            "_acme-challenge CNAME hop.deleg.test.", "hop CNAME deleg.acme.test."]),
        Zone("loop.test", {"ns.loop.test": knot_address}, [
            "_acme-challenge CNAME a.loop.test.", "a CNAME b.loop.test.",
            "b CNAME _acme-challenge.loop.test."])])
    pdns = start_powerdns(tmp_path / "pdns", pdns_address,
                          [Zone("acme.test", {"ns1.acme.test": pdns_address})])
    try:
        yield knot, pdns
    finally:
        pdns.stop()
        knot.stop()


def spec(knot, pdns) -> dict:
    return {"type": "dns-01", "provider": "powerdns", "options": {"pdns_server": pdns.api_url},
            "credentials_env": {"auth_token": TOKEN_ENV},
            # knot refuses questions about acme.test: the lookups go on to PowerDNS
            "resolvers": [knot.address, pdns.address], "propagation_timeout": 60}


def new_cert(db, settings, names, challenge, register=True):
    project_id = make_project(db)
    accounts.create_account(db, project_id, {"terms_agreed": True}, ACTOR, settings=settings,
                            register=register)
    return certificates.create_certificate(db, project_id, {
        "names": names, "challenge": challenge}, ACTOR, settings=settings)


def test_txt_is_written_where_the_cname_chain_ends(migrated_db, settings, tmp_path,
                                                   monkeypatch, world):
    knot, pdns = world
    monkeypatch.setenv(TOKEN_ENV, pdns.api_key)
    resolver = start_forwarder({"deleg.test": knot.address, "loop.test": knot.address,
                                "acme.test": pdns.address})
    pebble = start_pebble(tmp_path / "pebble", dns_server=f"{resolver.address}:53")
    try:
        s = settings.with_overrides(acme_directory_url=pebble.directory_url,
                                    acme_ca_bundle=pebble.ca_cert,
                                    acme_order_timeout_seconds=60.0)
        cert = new_cert(migrated_db, s, ["deleg.test", "*.deleg.test"], spec(knot, pdns))
        result = run_issuance(migrated_db, LocalFence(migrated_db, "job-deleg"), cert["_id"],
                              reason="initial", settings=s)
        assert result["outcome"] == "issued"
        stored = certificates.get_certificate(migrated_db, cert["_id"])
        leaf = x509.load_pem_x509_certificate(stored["certificate_pem"].encode())
        sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert sorted(sans.get_values_for_type(x509.DNSName)) == ["*.deleg.test",
                                                                  "deleg.test"]
        assert txt_at(pdns.address, "deleg.acme.test") == []  # removed after success
    finally:
        pebble.stop()
        resolver.stop()


def unreachable_ca(settings):
    # any CA call would fail with a connection error, not the ValidationFailed asserted
    return settings.with_overrides(acme_directory_url="https://127.0.0.1:9/dir")


def test_a_cname_loop_is_refused_before_any_ca_call(migrated_db, settings, monkeypatch,
                                                    world):
    knot, pdns = world
    monkeypatch.setenv(TOKEN_ENV, pdns.api_key)
    s = unreachable_ca(settings)
    cert = new_cert(migrated_db, s, ["loop.test"], spec(knot, pdns), register=False)
    with pytest.raises(ValidationFailed, match="CNAME loop at _acme-challenge.loop.test"):
        run_issuance(migrated_db, LocalFence(migrated_db, "job-loop"), cert["_id"],
                     reason="initial", settings=s)
    assert migrated_db[dbm.ORDERS].count_documents({"certificate_id": cert["_id"]}) == 0


def test_a_missing_credential_variable_is_refused_before_any_ca_call(migrated_db, settings,
                                                                     monkeypatch, world):
    knot, pdns = world
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    s = unreachable_ca(settings)
    cert = new_cert(migrated_db, s, ["deleg.test"], spec(knot, pdns), register=False)
    with pytest.raises(ValidationFailed, match=f"{TOKEN_ENV} is not set"):
        run_issuance(migrated_db, LocalFence(migrated_db, "job-nocred"), cert["_id"],
                     reason="initial", settings=s)
    assert migrated_db[dbm.ORDERS].count_documents({"certificate_id": cert["_id"]}) == 0
