"""PEBBLE_WFE_NONCEREJECT=30: Pebble rejects 30 % of good nonces; every issuance still
succeeds (badNonce is retried at once with a fresh nonce)."""

from __future__ import annotations

from app.domain import accounts, certificates
from app.domain.issuance import run_issuance
from tests.helpers.fences import LocalFence
from tests.helpers.pebble import start_pebble
from tests.integration.test_acme_helpers import ACTOR, acme_settings, make_project, responder


def _rejected(pebble) -> float:
    from urllib.parse import urlsplit

    from app.metrics import ACME_REQUESTS

    ca = urlsplit(pebble.directory_url).netloc
    return sum(sample.value for metric in ACME_REQUESTS.collect() for sample in metric.samples
               if sample.name.endswith("_total") and sample.labels.get("ca") == ca
               and sample.labels.get("status") == "400")


def test_every_issuance_succeeds_despite_rejected_nonces(migrated_db, settings, tmp_path):
    pebble = start_pebble(tmp_path / "pebble-nonce", {"PEBBLE_WFE_NONCEREJECT": "30"})
    try:
        s = acme_settings(settings, pebble)
        project_id = make_project(migrated_db)
        accounts.create_account(migrated_db, project_id, {"terms_agreed": True}, ACTOR,
                                settings=s)
        rejected_before = _rejected(pebble)
        with responder(s, pebble.http_port):
            for i in range(8):
                names = [f"n{i}-{j}.nonce.test" for j in range(1 + i % 3)]
                cert = certificates.create_certificate(
                    migrated_db, project_id, {"names": names, "key_type": "ec256"}, ACTOR,
                    settings=s)
                result = run_issuance(migrated_db, LocalFence(migrated_db, f"job-nonce-{i}"),
                                      cert["_id"], reason="initial", settings=s)
                assert result["outcome"] == "issued"
                assert certificates.get_certificate(migrated_db, cert["_id"])["status"] == \
                    "issued"
        # Pebble does not log its rejections; the client's request metrics count them
        assert _rejected(pebble) - rejected_before >= 5
    finally:
        pebble.stop()
