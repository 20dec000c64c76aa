"""CA fallback by policy, against two Pebble instances (different roots): the primary's
directory stops answering, the renewal completes at the second CA (the switch audited
and shown on the certificate); the primary comes back and the next renewal goes to it.
Bad fallback lists (unknown accounts, another project's account, the primary itself)
are refused and change nothing."""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest

from app import db as dbm
from app.acme.client import close_clients
from app.acme.errors import AcmeError
from app.domain import certificates
from app.domain.issuance import run_issuance
from app.errors import ValidationFailed
from app.jobs import RetryLater
from tests.helpers.fences import LocalFence
from tests.helpers.pebble import start_pebble
from tests.integration.test_acme_helpers import (
    ACTOR,
    acme_settings,
    make_account,
    make_project,
    responder,
)

pytestmark = pytest.mark.integration


def _issue(db, s, cert_id, job_id, reason):
    """One job attempt after another, as the worker would run them, until one issues."""
    errors = []
    for attempt in range(6):
        try:
            return run_issuance(db, LocalFence(db, f"{job_id}-{attempt}"), cert_id,
                                reason=reason, settings=s), errors
        except (AcmeError, RetryLater) as exc:
            errors.append(exc)
    raise AssertionError(f"not issued after 6 attempts: {errors}")


def test_renewals_fall_back_to_the_next_ca_and_return_to_the_primary(
        migrated_db, settings, tmp_path):
    db = migrated_db
    first = start_pebble(tmp_path / "first")
    second = start_pebble(tmp_path / "second")
    try:
        s = acme_settings(settings, first).with_overrides(acme_ca_bundle=None)
        # Both Pebbles' TLS certificates, so one client trusts both directories.
        bundle = tmp_path / "bundle.pem"
        bundle.write_text(first.ca_cert.read_text() + second.ca_cert.read_text())
        s = s.with_overrides(acme_ca_bundle=bundle, acme_order_timeout_seconds=30.0)
        project_id = make_project(db)
        primary = make_account(db, project_id, s)
        other = make_account(db, project_id, s.with_overrides(
            acme_directory_url=second.directory_url), name="second")
        cert = certificates.create_certificate(db, project_id, {
            "names": ["www.fallback.test"], "account_id": primary["_id"],
            "ca_fallback": [other["_id"]]}, ACTOR, settings=s)
        with responder(s, first.http_port), responder(s, second.http_port):
            _issue(db, s, cert["_id"], "initial", "initial")
            issued = certificates.get_certificate(db, cert["_id"])
            assert issued["issued_by"]["account_id"] == primary["_id"]
            assert issued["issued_by"]["fallback"] is False

            first_port = urlsplit(first.directory_url).port
            first.stop()  # the primary CA is down
            _, errors = _issue(db, s, cert["_id"], "renewal-1", "renewal")
            assert errors and all(isinstance(e, AcmeError) for e in errors[:1])
            renewed = certificates.get_certificate(db, cert["_id"])
            assert renewed["issue_count"] == 2
            assert renewed["issued_by"]["account_id"] == other["_id"]
            assert renewed["issued_by"]["fallback"] is True
            assert renewed["issued_by"]["reason"] == "directory unreachable"
            assert renewed["issuer"] != issued["issuer"]  # a different root
            [switch] = list(db[dbm.AUDIT].find({"action": "certificate.ca_switch"}))
            assert switch["details"]["from_account"] == primary["_id"]
            assert switch["details"]["to_account"] == other["_id"]
            assert renewed["ca_state"] == {"active": 0, "failures": 0}

            # The primary is back (same directory URL): the next renewal goes to it.
            restarted = start_pebble(tmp_path / "first-again", port=first_port,
                                     http_port=first.http_port)
            try:
                bundle.write_text(restarted.ca_cert.read_text()
                                  + second.ca_cert.read_text())
                close_clients()  # the restarted Pebble has a new TLS certificate
                _issue(db, s, cert["_id"], "renewal-2", "renewal")
                back = certificates.get_certificate(db, cert["_id"])
                assert back["issue_count"] == 3
                assert back["issued_by"]["account_id"] == primary["_id"]
                assert db[dbm.AUDIT].count_documents({"action": "certificate.ca_switch"}) == 1
            finally:
                restarted.stop()
    finally:
        first.stop()
        second.stop()


def test_bad_fallback_lists_are_refused_and_store_nothing(migrated_db, settings):
    db = migrated_db
    project_id, elsewhere = make_project(db, "mine"), make_project(db, "theirs")
    mine = make_account(db, project_id, settings)
    theirs = make_account(db, elsewhere, settings)
    before = db[dbm.CERTIFICATES].count_documents({})
    cases = [
        (["acct_nope"], "unknown ACME account"),
        ([theirs["_id"]], "cannot mix projects"),
        ([mine["_id"]], "is the primary account"),
        ("acct", "a list of at most 5"),
    ]
    for fallback, fragment in cases:
        with pytest.raises(ValidationFailed) as err:
            certificates.create_certificate(db, project_id, {
                "names": ["www.bad-fallback.test"], "account_id": mine["_id"],
                "ca_fallback": fallback}, ACTOR, settings=settings)
        assert fragment in err.value.message + str(err.value.errors), fallback
    assert db[dbm.CERTIFICATES].count_documents({}) == before


def test_a_project_default_list_applies_to_certificates_without_their_own(
        migrated_db, settings, cap_env, monkeypatch):
    from click.testing import CliRunner

    from app.cli.main import cli
    from app.domain import ca_fallback, projects

    db = migrated_db
    project_id, elsewhere = make_project(db, "mine"), make_project(db, "theirs")
    primary = make_account(db, project_id, settings)
    spare = make_account(db, project_id, settings.with_overrides(
        acme_directory_url="https://127.0.0.1:2/dir"), name="spare")
    theirs = make_account(db, elsewhere, settings)
    cert = certificates.create_certificate(db, project_id, {
        "names": ["www.project-default.test"], "account_id": primary["_id"]}, ACTOR,
        settings=settings)
    for key, value in cap_env.items():
        monkeypatch.setenv(key, value)

    audit_before = db[dbm.AUDIT].count_documents({})
    for bad, fragment in ((["acct_nope"], "unknown ACME account"),
                          ([theirs["_id"]], "cannot mix projects")):
        result = CliRunner().invoke(cli, ["ca", "fallback", project_id, *bad])
        assert result.exit_code == 1 and fragment in result.output, result.output
    assert "ca_fallback" not in projects.get_project(db, project_id)
    assert db[dbm.AUDIT].count_documents({}) == audit_before

    result = CliRunner().invoke(cli, ["ca", "fallback", project_id, spare["_id"]])
    assert result.exit_code == 0, result.output
    stored = db[dbm.CERTIFICATES].find_one({"_id": cert["_id"]})
    assert ca_fallback.chain(ca_fallback.with_project_default(db, stored)) == [
        primary["_id"], spare["_id"]]
    # A certificate's own list wins over the project's.
    own = certificates.create_certificate(db, project_id, {
        "names": ["www.own-list.test"], "account_id": spare["_id"],
        "ca_fallback": [primary["_id"]]}, ACTOR, settings=settings)
    stored_own = db[dbm.CERTIFICATES].find_one({"_id": own["_id"]})
    assert ca_fallback.chain(ca_fallback.with_project_default(db, stored_own)) == [
        spare["_id"], primary["_id"]]
    assert db[dbm.AUDIT].count_documents({"action": "project.ca_fallback_set"}) == 1
