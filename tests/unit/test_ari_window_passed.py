"""The daily check renews at once a certificate whose ARI window has started while it
is scheduled later. Pebble has no renewalInfo, so the CA's answer comes from a small
stand-in with the AcmeClient methods the check calls (the HTTP side is covered by
tests/unit/test_acme_ari.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from app.acme.errors import AcmeNetworkError
from app.domain.revocation_check import ari_window_passed

pytestmark = pytest.mark.unit

NOW = datetime(2026, 12, 1, 12, tzinfo=UTC)


class RenewalInfoAnswer:
    def __init__(self, start: datetime | None, *, offered: bool = True) -> None:
        self.start, self.offered = start, offered

    def has_renewal_info(self) -> bool:
        return self.offered

    def renewal_info(self, cert_id: str):
        if self.start is None:
            raise AcmeNetworkError("no answer")
        end = self.start + timedelta(days=1)
        return {"suggestedWindow": {"start": self.start.isoformat().replace("+00:00", "Z"),
                                    "end": end.isoformat().replace("+00:00", "Z")}}, None


def cert(**extra):
    return {"_id": "crt_1", "ari_cert_id": "aki.serial", "renewal": {},
            "next_renewal_at": NOW + timedelta(days=20), **extra}


def test_a_window_moved_into_the_past_renews_now():
    assert ari_window_passed(cert(), RenewalInfoAnswer(NOW - timedelta(hours=1)), NOW)


def test_a_window_still_ahead_changes_nothing():
    assert not ari_window_passed(cert(), RenewalInfoAnswer(NOW + timedelta(days=3)), NOW)


@pytest.mark.parametrize("doc, answer", [
    (cert(renewal={"use_ari": False}), RenewalInfoAnswer(NOW - timedelta(days=1))),
    (cert(ari_cert_id=None), RenewalInfoAnswer(NOW - timedelta(days=1))),
    (cert(next_renewal_at=NOW - timedelta(minutes=1)), RenewalInfoAnswer(NOW)),
    (cert(), RenewalInfoAnswer(NOW - timedelta(days=1), offered=False)),
    (cert(), RenewalInfoAnswer(None)),
])
def test_no_ari_or_no_answer_changes_nothing(doc, answer):
    assert not ari_window_passed(doc, answer, NOW)
