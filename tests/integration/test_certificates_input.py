"""Bad certificate input is refused before any CA call, and changes nothing."""

from __future__ import annotations

import pytest

from app import db as dbm
from app.domain import certificates
from app.errors import NotFound, ValidationFailed
from tests.integration.test_acme_helpers import ACTOR, acme_settings, make_account, make_project

BAD_SPECS = [
    ({"names": ["192.0.2.10"], "challenge": {"type": "dns-01", "provider": "rfc2136",
                                             "server": "127.0.0.1", "zone": "example.test",
                                             "tsig_key_name": "k",
                                             "tsig_secret_env": "CAP_TSIG"}}, "names"),
    ({"names": ["*.example.test"]}, "names"),          # wildcard needs dns-01
    ({"names": ["*.*.x"]}, "names"),
    ({"names": ["a" * 64 + ".example.test"]}, "names"),
    ({"names": ["xn--zz.example.test"]}, "names"),
    ({"names": ["\u2603\U0001F4A9.example.test"]}, "names"),
    ({"names": ["ok.example.test"], "key_type": "rsa1024"}, "key_type"),
    ({"names": ["ok.example.test"], "key_type": "dsa"}, "key_type"),
    ({"names": []}, "names"),
    ({"names": ["*.example.test"], "challenge": "tls-alpn-01"}, "names"),
    ({"names": ["ok.example.test"], "challenge": {"type": "dns-01", "provider": "magic"}},
     "challenge"),
    ({"names": ["ok.example.test"], "challenge": {
        "type": "dns-01", "provider": "cloudflare", "options": {"auth_token": "s3cret"}}},
     "challenge"),
]


@pytest.mark.parametrize("spec, field", BAD_SPECS)
def test_refused_before_any_ca_call(migrated_db, settings, pebble, spec, field):
    s = acme_settings(settings, pebble)
    project_id = make_project(migrated_db)
    make_account(migrated_db, project_id, s)
    log_before = len(pebble.log())
    audit_before = migrated_db[dbm.AUDIT].count_documents({})
    with pytest.raises(ValidationFailed) as info:
        certificates.create_certificate(migrated_db, project_id, spec, ACTOR, settings=s)
    assert field in info.value.errors and info.value.status == 422
    assert migrated_db[dbm.CERTIFICATES].count_documents({}) == 0
    assert migrated_db[dbm.AUDIT].count_documents({}) == audit_before
    assert len(pebble.log()) == log_before


def test_update_with_bad_names_changes_nothing(migrated_db, settings, pebble):
    s = acme_settings(settings, pebble)
    project_id = make_project(migrated_db)
    make_account(migrated_db, project_id, s)
    cert = certificates.create_certificate(migrated_db, project_id, {"names": ["a.example"]},
                                           ACTOR, settings=s)
    with pytest.raises(ValidationFailed):
        certificates.update_certificate(migrated_db, cert["_id"], {"names": ["*.*.x"]}, ACTOR)
    assert certificates.get_certificate(migrated_db, cert["_id"]) == cert


def test_unknown_project_and_account(migrated_db, settings, pebble):
    s = acme_settings(settings, pebble)
    with pytest.raises(NotFound):
        certificates.create_certificate(migrated_db, "prj_0000000000000000",
                                        {"names": ["a.example"]}, ACTOR, settings=s)
    project_id = make_project(migrated_db)
    with pytest.raises(ValidationFailed, match="account_id is required"):
        certificates.create_certificate(migrated_db, project_id, {"names": ["a.example"]},
                                        ACTOR, settings=s)
    with pytest.raises(ValidationFailed) as info:
        certificates.create_certificate(migrated_db, project_id, {
            "names": ["a.example"], "account_id": "acc_nope"}, ACTOR, settings=s)
    assert "account_id" in info.value.errors


def test_spec_change_makes_the_certificate_due(migrated_db, settings, pebble):
    s = acme_settings(settings, pebble)
    project_id = make_project(migrated_db)
    make_account(migrated_db, project_id, s)
    cert = certificates.create_certificate(migrated_db, project_id, {"names": ["a.example"]},
                                           ACTOR, settings=s)
    far = dbm.server_now(migrated_db).replace(year=2099)
    migrated_db[dbm.CERTIFICATES].update_one({"_id": cert["_id"]},
                                             {"$set": {"next_renewal_at": far}})
    updated = certificates.update_certificate(migrated_db, cert["_id"],
                                              {"renewal": {"renew_before_days": 20}}, ACTOR,
                                              expected_version=1)
    assert updated["next_renewal_at"] == far and updated["version"] == 2  # policy only
    updated = certificates.update_certificate(migrated_db, cert["_id"],
                                              {"names": ["a.example", "b.example"]}, ACTOR)
    assert updated["next_renewal_at"] < far and updated["renewal_source"] == "spec_changed"
