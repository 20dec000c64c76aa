"""Issuance against Debian's Pebble with the real HTTP-01 responder and database: the
order engine, its persisted steps, and failures recorded on the certificate."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from app import db as dbm
from app.domain import certificates, orders, revocation
from app.domain.issuance import IssuanceFailed, run_issuance
from app.keys import open_private_key
from tests.helpers.fences import LocalFence
from tests.integration.test_acme_helpers import (
    ACTOR,
    acme_settings,
    challtest,
    make_account,
    make_project,
    responder,
)


@pytest.fixture
def env(migrated_db, settings, pebble):
    s = acme_settings(settings, pebble)
    project_id = make_project(migrated_db)
    account = make_account(migrated_db, project_id, s)
    with responder(s, pebble.http_port):
        yield migrated_db, s, project_id, account


def _issue(db, s, cert_id, job_id, reason="initial"):
    return run_issuance(db, LocalFence(db, job_id), cert_id, reason=reason, settings=s)


def test_issue_ec_certificate_stores_chain_key_and_schedule(env, pebble):
    db, s, project_id, account = env
    cert = certificates.create_certificate(
        db, project_id, {"names": ["www.issue-ec.test", "issue-ec.test"]}, ACTOR, settings=s)
    assert account["account_url"] is None  # registered lazily by the first issuance

    result = _issue(db, s, cert["_id"], "job-ec-1")

    assert result["outcome"] == "issued"
    stored = certificates.get_certificate(db, cert["_id"])
    assert stored["status"] == "issued"
    leaf = x509.load_pem_x509_certificate(stored["certificate_pem"].encode())
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sorted(sans.get_values_for_type(x509.DNSName)) == ["issue-ec.test",
                                                              "www.issue-ec.test"]
    assert stored["fullchain_pem"].startswith(stored["certificate_pem"])
    assert stored["chain_pem"] and stored["chain_pem"] in stored["fullchain_pem"]
    assert stored["serial"] == format(leaf.serial_number, "x")
    assert stored["not_after"] == leaf.not_valid_after_utc.replace(microsecond=0) or \
        abs(stored["not_after"] - leaf.not_valid_after_utc) < timedelta(seconds=1)
    assert "Pebble" in stored["issuer"]
    assert len(stored["fingerprint_sha256"]) == 64
    # the key: sealed, matching the leaf, never in the certificate document
    key = open_private_key(db, stored["key_id"], project_id=project_id)
    assert b"PRIVATE KEY" not in str(stored).encode()
    from cryptography.hazmat.primitives import serialization

    private = serialization.load_pem_private_key(key, None)
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert private.public_key().public_numbers() == leaf.public_key().public_numbers()
    # renewal at ~2/3 of Pebble's 5-year lifetime
    lifetime = stored["not_after"] - stored["not_before"]
    expected = stored["not_before"] + lifetime * 2 / 3
    assert abs(stored["next_renewal_at"] - expected) <= timedelta(hours=12, seconds=5)
    assert stored["renewal_source"] == "lifetime"
    # the order: completed, with every step recorded, challenges cleaned up
    order = orders.get(db, stored["order_id"])
    assert order["state"] == "completed"
    assert [h["state"] for h in order["history"]] == [
        "created", "pending", "finalizing", "downloaded", "completed"]
    assert order["certificate_url"] and order["fullchain_pem"] == stored["fullchain_pem"]
    answered = [a["answered_at"] for a in order["authorizations"] if a.get("answered_at")]
    assert answered and max(answered) <= order["history"][2]["at"]  # saved before finalize
    assert order["order_url"].startswith("https://127.0.0.1")
    assert order["fence"] and order["fence"]["job_id"] == "job-ec-1"
    assert db[dbm.CHALLENGES].count_documents({"order_id": order["_id"]}) == 0
    # the account was registered and its URL kept
    acct = db[dbm.ACME_ACCOUNTS].find_one({"_id": account["_id"]})
    assert acct["account_url"] and acct["status"] == "registered"
    actions = [e["action"] for e in db[dbm.AUDIT].find(
        {"target": f"certificate:{cert['_id']}"}).sort("seq", 1)]
    assert actions == ["certificate.create", "certificate.issue"]


@pytest.mark.parametrize("key_type", ["rsa2048", "ec384"])
def test_issue_other_key_types(env, key_type):
    db, s, project_id, _ = env
    cert = certificates.create_certificate(
        db, project_id, {"names": [f"{key_type}.keys.test"], "key_type": key_type}, ACTOR,
        settings=s)
    _issue(db, s, cert["_id"], f"job-{key_type}")
    stored = certificates.get_certificate(db, cert["_id"])
    public = x509.load_pem_x509_certificate(stored["certificate_pem"].encode()).public_key()
    if key_type == "rsa2048":
        assert isinstance(public, rsa.RSAPublicKey) and public.key_size == 2048
    else:
        assert isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name == \
            "secp384r1"


def test_ten_names_and_renewal_with_new_key(env, pebble):
    db, s, project_id, _ = env
    names = [f"san{i}.ten.test" for i in range(10)]
    cert = certificates.create_certificate(db, project_id, {"names": names}, ACTOR,
                                           settings=s)
    _issue(db, s, cert["_id"], "job-ten-1")
    first = certificates.get_certificate(db, cert["_id"])
    leaf = x509.load_pem_x509_certificate(first["certificate_pem"].encode())
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sorted(sans.get_values_for_type(x509.DNSName)) == sorted(names)

    result = _issue(db, s, cert["_id"], "job-ten-2", reason="renewal")
    second = certificates.get_certificate(db, cert["_id"])
    assert result["outcome"] == "issued"
    assert second["serial"] != first["serial"]
    assert second["key_id"] != first["key_id"]  # a new key on every renewal by default
    assert second["issue_count"] == 2
    actions = [e["action"] for e in db[dbm.AUDIT].find(
        {"target": f"certificate:{cert['_id']}"}).sort("seq", 1)]
    assert actions[-1] == "certificate.renew"


def test_reuse_key_policy_keeps_the_key(env):
    db, s, project_id, _ = env
    cert = certificates.create_certificate(
        db, project_id, {"names": ["reuse.keys.test"], "renewal": {"reuse_key": True}}, ACTOR,
        settings=s)
    _issue(db, s, cert["_id"], "job-reuse-1")
    first = certificates.get_certificate(db, cert["_id"])
    _issue(db, s, cert["_id"], "job-reuse-2", reason="renewal")
    second = certificates.get_certificate(db, cert["_id"])
    assert second["serial"] != first["serial"] and second["key_id"] == first["key_id"]


def test_same_job_twice_does_not_order_twice(env, pebble):
    db, s, project_id, _ = env
    cert = certificates.create_certificate(db, project_id, {"names": ["once.test"]}, ACTOR,
                                           settings=s)
    first = _issue(db, s, cert["_id"], "job-once")
    before = pebble.log().count("Added order")
    again = _issue(db, s, cert["_id"], "job-once")
    assert again["order_id"] == first["order_id"] and again["outcome"] == "issued"
    assert pebble.log().count("Added order") == before
    assert db[dbm.ORDERS].count_documents({"job_id": "job-once"}) == 1


def test_unvalidatable_name_records_problem_and_backs_off(env, pebble):
    db, s, project_id, _ = env
    bad = "broken.unvalidatable.test"
    challtest(pebble, "set-servfail", {"host": bad})
    try:
        cert = certificates.create_certificate(db, project_id, {"names": [bad]}, ACTOR,
                                               settings=s)
        started = datetime.now(UTC)
        with pytest.raises(IssuanceFailed) as info:
            _issue(db, s, cert["_id"], "job-bad-1")
        problem_type = info.value.problem.problem_type
        # Pebble reports a SERVFAIL lookup as a connection problem
        assert problem_type in ("urn:ietf:params:acme:error:dns",
                                "urn:ietf:params:acme:error:connection")
        stored = certificates.get_certificate(db, cert["_id"])
        assert stored["status"] == "failed"
        failure = stored["failure"]
        assert failure["count"] == 1
        assert failure["last_error"]["type"] == problem_type
        assert bad in failure["last_error"]["detail"] or \
            failure["last_error"].get("identifier") == bad
        # first backoff: one hour
        assert timedelta(minutes=59) < stored["next_renewal_at"] - started < \
            timedelta(minutes=61)
        order = orders.get(db, failure["order_id"])
        assert order["state"] == "invalid" and order["error"]["type"] == problem_type
        assert db[dbm.CHALLENGES].count_documents({"order_id": order["_id"]}) == 0

        with pytest.raises(IssuanceFailed):
            _issue(db, s, cert["_id"], "job-bad-2")
        stored = certificates.get_certificate(db, cert["_id"])
        assert stored["failure"]["count"] == 2
        assert timedelta(minutes=119) < stored["next_renewal_at"] - datetime.now(UTC) < \
            timedelta(minutes=121)
        actions = [e["action"] for e in db[dbm.AUDIT].find(
            {"target": f"certificate:{cert['_id']}"}).sort("seq", 1)]
        assert actions.count("certificate.issue_failed") == 2
    finally:
        challtest(pebble, "clear-servfail", {"host": bad})


def test_revoke_stops_renewals_and_a_new_issuance_restores(env, pebble):
    from app.errors import Conflict, ValidationFailed

    db, s, project_id, _ = env
    cert = certificates.create_certificate(db, project_id, {"names": ["revoke.test"]}, ACTOR,
                                           settings=s)
    with pytest.raises(Conflict, match="not been issued"):
        revocation.revoke_certificate(db, cert["_id"], ACTOR, settings=s)
    _issue(db, s, cert["_id"], "job-revoke-1")
    with pytest.raises(ValidationFailed):
        revocation.revoke_certificate(db, cert["_id"], ACTOR, reason_code=7, settings=s)
    before = pebble.log().count("POST /revoke-cert")
    revoked = revocation.revoke_certificate(db, cert["_id"], ACTOR, reason_code=4, settings=s)
    assert revoked["status"] == "revoked" and revoked["next_renewal_at"] is None
    # One revocation request; Pebble rejects some nonces on purpose, and the acme package
    # then sends the same request once more.
    assert pebble.log().count("POST /revoke-cert") - before in (1, 2)
    with pytest.raises(Conflict, match="already revoked"):
        revocation.revoke_certificate(db, cert["_id"], ACTOR, settings=s)
    # the scan leaves it alone; a scheduled renewal job is skipped; a manual one reissues
    assert _issue(db, s, cert["_id"], "job-revoke-2", reason="renewal")["outcome"] == "skipped"
    assert _issue(db, s, cert["_id"], "job-revoke-3", reason="manual")["outcome"] == "issued"
    stored = certificates.get_certificate(db, cert["_id"])
    assert stored["status"] == "issued" and stored["serial"] != revoked["serial"]
    actions = [e["action"] for e in db[dbm.AUDIT].find(
        {"target": f"certificate:{cert['_id']}"}).sort("seq", 1)]
    assert actions == ["certificate.create", "certificate.issue", "certificate.revoke",
                       "certificate.renew"]


class Killed(BaseException):
    """The process dying at this point (not an exception the engine may catch)."""


def test_an_order_created_but_never_saved_is_found_at_the_ca_not_made_twice(
        env, pebble, monkeypatch):
    """kill -9 between the CA's newOrder answer and saving its URL: the next attempt finds
    the order in the account's orders list and carries on with it (one order at the CA)."""
    db, s, project_id, _ = env
    others = [certificates.create_certificate(db, project_id, {"names": [f"other{i}.test"]},
                                              ACTOR, settings=s) for i in range(2)]
    for i, other in enumerate(others):  # the account has other orders, saved ones
        _issue(db, s, other["_id"], f"job-other-{i}")
    cert = certificates.create_certificate(db, project_id, {"names": ["lost.test"]}, ACTOR,
                                           settings=s)
    real = orders.transition

    def dies_before_saving(db_, order, target, **kwargs):
        if target == orders.PENDING:
            raise Killed
        return real(db_, order, target, **kwargs)

    before = pebble.log().count("Added order")
    monkeypatch.setattr(orders, "transition", dies_before_saving)
    with pytest.raises(Killed):
        _issue(db, s, cert["_id"], "job-lost")
    assert pebble.log().count("Added order") == before + 1
    stored = db[dbm.ORDERS].find_one({"job_id": "job-lost"})
    assert stored["state"] == orders.CREATED and stored["new_order_sent_at"]
    monkeypatch.setattr(orders, "transition", real)
    result = _issue(db, s, cert["_id"], "job-lost")
    assert result["outcome"] == "issued"
    assert pebble.log().count("Added order") == before + 1  # no second order
    assert db[dbm.ORDERS].count_documents({"job_id": "job-lost"}) == 1
    assert db[dbm.CERTIFICATES].find_one({"_id": cert["_id"]})["issue_count"] == 1
