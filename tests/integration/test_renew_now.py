"""An operator's "renew now" gets a new certificate now; the CA's ARI window postpones
scheduled renewals only. Pebble 2.4 has no renewalInfo, so the CA's answer to it (a
window 30 days ahead) is given by the test at the client; the order itself is Pebble's."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from app.acme.client import AcmeClient
from app.domain import certificates
from app.domain.issuance import run_issuance
from tests.helpers.fences import LocalFence
from tests.integration.test_acme_helpers import (
    ACTOR,
    acme_settings,
    make_account,
    make_project,
    responder,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def ca_window_in_a_month(monkeypatch):
    start = datetime.now(UTC) + timedelta(days=30)

    def renewal_info(self: AcmeClient, cert_id: str) -> tuple[dict[str, Any], float | None]:
        return {"suggestedWindow": {"start": start.isoformat().replace("+00:00", "Z"),
                                    "end": (start + timedelta(days=2)).isoformat()
                                    .replace("+00:00", "Z")}}, 3600.0

    monkeypatch.setattr(AcmeClient, "has_renewal_info", lambda self: True)
    monkeypatch.setattr(AcmeClient, "renewal_info", renewal_info)
    return start


def test_renew_now_ignores_a_later_ari_window_scheduled_renewal_waits(
        migrated_db, settings, pebble, ca_window_in_a_month) -> None:
    db = migrated_db
    s = acme_settings(settings, pebble)
    project_id = make_project(db)
    make_account(db, project_id, s)
    cert = certificates.create_certificate(db, project_id, {"names": ["now.renew.test"]},
                                           ACTOR, settings=s)
    with responder(s, pebble.http_port):
        first = run_issuance(db, LocalFence(db, "job-now-1"), cert["_id"], reason="initial",
                             settings=s)
        assert first["outcome"] == "issued"
        issued = certificates.get_certificate(db, cert["_id"])
        assert issued["ari_cert_id"]

        # The scan's renewal asks the CA first and is postponed into its window.
        scheduled = run_issuance(db, LocalFence(db, "job-now-2"), cert["_id"],
                                 reason="renewal", settings=s)
        assert scheduled["outcome"] == "not_due"
        after_scheduled = certificates.get_certificate(db, cert["_id"])
        assert after_scheduled["serial"] == issued["serial"]
        # Asked again at the CA's Retry-After (1 h), before its window opens.
        assert datetime.now(UTC) < after_scheduled["next_renewal_at"] < ca_window_in_a_month

        # What POST /certificates/{id}/renew and `certs renew` enqueue: renewed now.
        job = certificates.request_issuance(db, cert["_id"], ACTOR, "renew_now")
        assert job["payload"]["reason"] == "renew_now"
        forced = run_issuance(db, LocalFence(db, str(job["_id"])), cert["_id"],
                              reason="renew_now", settings=s)
    assert forced["outcome"] == "issued"
    renewed = certificates.get_certificate(db, cert["_id"])
    assert renewed["serial"] != issued["serial"]
    assert renewed["issue_count"] == 2
