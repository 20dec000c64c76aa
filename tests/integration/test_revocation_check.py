"""A certificate revoked at the CA behind our back is found by the OCSP check and renewed
at once. Pebble runs no OCSP responder, so this one has a real one beside it
(tests/helpers/ocsp_responder.py: Pebble's revocation status, signed with Pebble's
intermediate key) whose URL Pebble writes into every certificate's AIA."""

from __future__ import annotations

import pytest

from app import db as dbm
from app.domain import accounts, certificates, revocation_check
from app.domain.issuance import run_issuance
from tests.helpers.fences import LocalFence
from tests.helpers.ocsp_responder import ocsp_responder
from tests.helpers.pebble import start_pebble
from tests.integration.test_acme_helpers import (
    ACTOR,
    acme_settings,
    make_account,
    make_project,
    responder,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def ocsp_pebble(tmp_path):
    with ocsp_responder() as (url, holder):
        pebble = start_pebble(tmp_path / "pebble-ocsp", ocsp_responder_url=url)
        holder["pebble"] = pebble
        try:
            yield pebble
        finally:
            pebble.stop()


def test_a_certificate_revoked_behind_our_back_is_renewed_at_once(migrated_db, settings,
                                                                  ocsp_pebble):
    db, s = migrated_db, acme_settings(settings, ocsp_pebble)
    bundle = str(ocsp_pebble.ca_cert)
    project_id = make_project(db)
    make_account(db, project_id, s)
    cert = certificates.create_certificate(db, project_id, {"names": ["www.revoked.test"]},
                                           ACTOR, settings=s)
    with responder(s, ocsp_pebble.http_port):
        run_issuance(db, LocalFence(db, "job-first"), cert["_id"], reason="initial",
                     settings=s)
        stored = certificates.get_certificate(db, cert["_id"])
        assert revocation_check.check_all(db, ca_bundle=bundle) == {
            "good": 1, "revoked": 0, "unknown": 0, "ari_window_passed": 0}

        # Revoked at the CA with the account's key, without telling the service.
        account = accounts.get_account(db, stored["account_id"])
        accounts.client_for(db, account, s).revoke(stored["certificate_pem"].encode(), 1)
        assert certificates.get_certificate(db, cert["_id"])["status"] == "issued"

        before = dbm.server_now(db)
        # With settings the check also asks for renewalInfo (Pebble offers none).
        assert revocation_check.check_all(db, ca_bundle=bundle, settings=s) == {
            "good": 0, "revoked": 1, "unknown": 0, "ari_window_passed": 0}
        [job] = list(db[dbm.JOBS].find({"payload.certificate_id": cert["_id"],
                                        "state": "queued"}))
        assert job["payload"]["reason"] == "emergency"
        flagged = certificates.get_certificate(db, cert["_id"])
        assert flagged["renewal_source"] == "revoked"
        assert flagged["next_renewal_at"] <= dbm.server_now(db)
        assert flagged["revocation_check"]["status"] == "revoked"
        assert flagged["updated_at"] > stored["updated_at"]  # the dashboard's pass sees it
        [entry] = list(db[dbm.AUDIT].find({"action": "certificate.revocation_detected"}))
        assert entry["target"] == f"certificate:{cert['_id']}"
        assert entry["details"]["serial"] == stored["serial"]
        assert before <= dbm.server_now(db)

        # The renewal it enqueued issues a new certificate, which the next check finds good.
        result = run_issuance(db, LocalFence(db, job["_id"]), cert["_id"],
                              reason="emergency", settings=s)
        assert result["outcome"] == "issued"
        renewed = certificates.get_certificate(db, cert["_id"])
        assert renewed["serial"] != stored["serial"] and renewed["issue_count"] == 2
        assert revocation_check.check_all(db, ca_bundle=bundle) == {
            "good": 1, "revoked": 0, "unknown": 0, "ari_window_passed": 0}
