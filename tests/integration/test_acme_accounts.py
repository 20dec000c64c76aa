"""ACME accounts against Pebble: registration, recovery of a lost URL with
onlyReturnExisting, External Account Binding, and bad input."""

from __future__ import annotations

import pytest

from app import db as dbm
from app.domain import accounts
from app.errors import Conflict, ValidationFailed
from app.keys import open_private_key
from tests.helpers.pebble import start_pebble
from tests.integration.test_acme_helpers import ACTOR, acme_settings, make_project

# the key Pebble's fixture configures for kid-1 (tests/helpers/pebble.py)
EAB_KID = "kid-1"
EAB_HMAC = "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W"


def _accounts_at_ca(pebble) -> int:
    return pebble.log().count("accounts in memory")  # one line per account Pebble adds


def test_register_stores_url_and_sealed_p256_key(migrated_db, settings, pebble):
    s = acme_settings(settings, pebble)
    project_id = make_project(migrated_db)
    account = accounts.create_account(migrated_db, project_id, {
        "contact": ["ops@example.test", "mailto:sec@example.test"], "terms_agreed": True},
        ACTOR, settings=s)
    assert account["status"] == "registered"
    assert account["account_url"].startswith(pebble.directory_url.rsplit("/", 1)[0])
    assert account["contact"] == ["ops@example.test", "sec@example.test"]
    key = open_private_key(migrated_db, account["key_id"], project_id=project_id)
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    parsed = serialization.load_pem_private_key(key, None)
    assert isinstance(parsed, ec.EllipticCurvePrivateKey) and parsed.curve.name == "secp256r1"
    stored = migrated_db[dbm.ACME_ACCOUNTS].find_one({"_id": account["_id"]})
    assert "PRIVATE KEY" not in str(stored)
    actions = [e["action"] for e in migrated_db[dbm.AUDIT].find(
        {"target": f"acme_account:{account['_id']}"}).sort("seq", 1)]
    assert actions == ["acme_account.create", "acme_account.register"]


def test_lost_account_url_is_recovered_with_only_return_existing(migrated_db, settings,
                                                                  tmp_path):
    # A Pebble that rejects no nonce: by default it rejects 5 %, and a rejected request is
    # sent again, by our client or inside the acme package (which logs nothing).
    pebble = start_pebble(tmp_path / "pebble-nonces", {"PEBBLE_WFE_NONCEREJECT": "0"})
    try:
        s = acme_settings(settings, pebble)
        project_id = make_project(migrated_db)
        account = accounts.create_account(migrated_db, project_id, {"terms_agreed": True},
                                          ACTOR, settings=s)
        url = account["account_url"]
        migrated_db[dbm.ACME_ACCOUNTS].update_one({"_id": account["_id"]}, {"$set": {
            "account_url": None, "status": "new"}})
        before, accounts_before = pebble.log().count("POST /sign-me-up"), \
            _accounts_at_ca(pebble)
        recovered = accounts.register_account(migrated_db, account["_id"], ACTOR, settings=s)
        assert recovered["account_url"] == url
        assert pebble.log().count("POST /sign-me-up") == before + 1  # onlyReturnExisting
        assert _accounts_at_ca(pebble) == accounts_before  # no account created
    finally:
        pebble.stop()
    last = migrated_db[dbm.AUDIT].find_one({"target": f"acme_account:{account['_id']}"},
                                           sort=[("seq", -1)])
    assert last["action"] == "acme_account.recover"


def test_terms_must_be_agreed(migrated_db, settings, pebble):
    s = acme_settings(settings, pebble)
    project_id = make_project(migrated_db)
    with pytest.raises(accounts.AccountNotRegistrable, match="terms of service"):
        accounts.create_account(migrated_db, project_id, {"terms_agreed": False}, ACTOR,
                                settings=s)
    stored = migrated_db[dbm.ACME_ACCOUNTS].find_one({"project_id": project_id})
    assert stored["status"] == "new" and stored["account_url"] is None


def test_external_account_binding(migrated_db, settings, tmp_path):
    eab_pebble = start_pebble(tmp_path / "pebble-eab", eab_required=True)
    try:
        s = acme_settings(settings, eab_pebble)
        project_id = make_project(migrated_db)
        with pytest.raises(accounts.AccountNotRegistrable, match="external account binding"):
            accounts.create_account(migrated_db, project_id,
                                    {"name": "no-eab", "terms_agreed": True}, ACTOR,
                                    settings=s)
        account = accounts.create_account(
            migrated_db, project_id, {"name": "eab", "terms_agreed": True,
                                      "eab": {"kid": EAB_KID, "hmac_key": EAB_HMAC}},
            ACTOR, settings=s)
        assert account["status"] == "registered" and account["eab_kid"] == EAB_KID
        # the HMAC key is used once and stored nowhere
        for name in migrated_db.list_collection_names():
            for doc in migrated_db[name].find():
                assert EAB_HMAC not in str(doc), name
        # a lost URL of an EAB account is recovered without the HMAC key
        migrated_db[dbm.ACME_ACCOUNTS].update_one({"_id": account["_id"]},
                                                  {"$set": {"account_url": None}})
        again = accounts.register_account(migrated_db, account["_id"], ACTOR, settings=s)
        assert again["account_url"] == account["account_url"]
    finally:
        eab_pebble.stop()


@pytest.mark.parametrize("spec, field", [
    ({"contact": ["not-an-email"]}, "contact"),
    ({"directory_url": "http://ca.example/dir"}, "directory_url"),
    ({"terms_agreed": "yes"}, "terms_agreed"),
    ({"name": "bad name!"}, "name"),
    ({"eab": {"kid": "k", "hmac_key": "not base64 !!"}}, "eab"),
    ({"eab": {"kid": ""}}, "eab"),
    ({"colour": "blue"}, "colour"),
])
def test_bad_account_specs_change_nothing(migrated_db, settings, pebble, spec, field):
    s = acme_settings(settings, pebble)
    project_id = make_project(migrated_db)
    log_before = len(pebble.log())
    with pytest.raises(ValidationFailed) as info:
        accounts.create_account(migrated_db, project_id, spec, ACTOR, settings=s)
    assert field in info.value.errors
    assert migrated_db[dbm.ACME_ACCOUNTS].count_documents({}) == 0
    assert migrated_db[dbm.KEYS].count_documents({"purpose": "acme_account"}) == 0
    assert len(pebble.log()) == log_before


def test_duplicate_name_conflicts_and_delete_refuses_while_used(migrated_db, settings,
                                                                 pebble):
    from app.domain import certificates

    s = acme_settings(settings, pebble)
    project_id = make_project(migrated_db)
    account = accounts.create_account(migrated_db, project_id, {"terms_agreed": True}, ACTOR,
                                      register=False, settings=s)
    with pytest.raises(Conflict):
        accounts.create_account(migrated_db, project_id, {"terms_agreed": True}, ACTOR,
                                register=False, settings=s)
    cert = certificates.create_certificate(migrated_db, project_id, {"names": ["u.example"]},
                                           ACTOR, settings=s)
    assert cert["account_id"] == account["_id"]  # the project's only account
    with pytest.raises(Conflict):
        accounts.delete_account(migrated_db, account["_id"], ACTOR)
    certificates.delete_certificate(migrated_db, cert["_id"], ACTOR)
    accounts.delete_account(migrated_db, account["_id"], ACTOR)
    assert migrated_db[dbm.ACME_ACCOUNTS].count_documents({}) == 0
