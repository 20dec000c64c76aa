"""ARI (RFC 9773): CertID (app.acme.ari), window selection and Retry-After handling
(app.domain.renewal), replayed from the
recorded renewalInfo answers in tests/testdata/ari (Pebble 2.4 has no ARI)."""

from __future__ import annotations

import datetime as dt
import json
import random
from pathlib import Path

import pytest
from acme.client import _renewal_info_path_component
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from app.acme import ari
from app.acme.client import parse_retry_after
from app.acme.errors import AcmeProtocolError
from app.domain import renewal

DATA = Path(__file__).resolve().parent.parent / "testdata" / "ari"
UTC = dt.UTC


def recorded(name: str) -> tuple[dict, float | None, dict]:
    answer = json.loads((DATA / name).read_text())
    return answer["body"], answer["headers"].get("Retry-After"), answer


def decide(name: str, now: dt.datetime, seed: int = 1) -> renewal.AriDecision:
    body, retry_after, _ = recorded(name)
    return renewal.decide_ari(body, parse_retry_after(retry_after, now=now), now,
                              random.Random(seed))


def _cert(serial: int, aki: bytes) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ari.test")])
    now = dt.datetime.now(UTC)
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(serial)
            .not_valid_before(now).not_valid_after(now + dt.timedelta(days=90))
            .add_extension(x509.AuthorityKeyIdentifier(aki, None, None), critical=False)
            .sign(key, hashes.SHA256()))


def test_cert_id_matches_the_rfc_example():
    aki = bytes.fromhex("69885B6B87464041E1B37B847BA0AE2CDE01C8D4")
    cert = _cert(0x87654321, aki)
    assert ari.cert_id(cert) == "aYhba4dGQEHhs3uEe6CuLN4ByNQ.AIdlQyE"
    assert ari.cert_id(cert) == _renewal_info_path_component(cert)


@pytest.mark.parametrize("serial", [1, 0x7F, 0x80, 0xFF, 0x1234, 2**159 - 1])
def test_cert_id_serial_encoding_agrees_with_the_acme_package(serial):
    cert = _cert(serial, b"\x01" * 20)
    assert ari.cert_id(cert) == _renewal_info_path_component(cert)


def test_window_selection_picks_a_point_inside_the_window():
    now = dt.datetime(2025, 1, 1, tzinfo=UTC)
    start = dt.datetime(2025, 1, 2, 4, tzinfo=UTC)
    end = dt.datetime(2025, 1, 3, 4, tzinfo=UTC)
    seen = {decide("rfc9773-example.json", now, seed).renew_at for seed in range(200)}
    assert all(start <= t <= end for t in seen)
    # uniformly spread, not pinned to an edge
    assert min(seen) < start + dt.timedelta(hours=3) and max(seen) > end - dt.timedelta(hours=3)
    decision = decide("rfc9773-example.json", now)
    assert decision.window.explanation_url == "https://acme.example.com/docs/ari"
    assert decision.next_check_at == now + dt.timedelta(seconds=21600)


def test_window_partly_in_the_past_never_schedules_in_the_past():
    now = dt.datetime(2025, 1, 2, 16, tzinfo=UTC)  # half-way through the window
    results = [decide("rfc9773-example.json", now, seed).renew_at for seed in range(100)]
    assert all(t >= now for t in results)
    assert any(t == now for t in results) and any(t > now for t in results)


def test_window_in_the_past_means_renew_now():
    now = dt.datetime(2025, 3, 1, tzinfo=UTC)
    decision = decide("incident-window-in-past.json", now)
    assert decision.renew_at == now
    assert decision.next_check_at == now + dt.timedelta(hours=1)


def test_fractional_seconds_beyond_microseconds_are_read():
    now = dt.datetime(2026, 1, 1, tzinfo=UTC)
    decision = decide("lets-encrypt-routine.json", now)
    assert decision.window.start == dt.datetime(2026, 1, 26, 19, 17, 40, 123456, tzinfo=UTC)
    assert decision.window.start <= decision.renew_at <= decision.window.end


def test_zero_length_window():
    now = dt.datetime(2025, 1, 1, tzinfo=UTC)
    decision = decide("no-retry-after.json", now)
    assert decision.renew_at == dt.datetime(2025, 2, 10, tzinfo=UTC)


def test_retry_after_http_date_is_honoured():
    now = dt.datetime(2025, 1, 2, 8, tzinfo=UTC)
    decision = decide("retry-after-http-date.json", now)
    assert decision.next_check_at == dt.datetime(2025, 1, 2, 10, tzinfo=UTC)


def test_retry_after_absent_defaults_to_six_hours():
    now = dt.datetime(2025, 1, 1, tzinfo=UTC)
    assert decide("no-retry-after.json", now).next_check_at == now + dt.timedelta(hours=6)


def test_retry_after_is_clamped_between_a_minute_and_a_day():
    now = dt.datetime(2025, 1, 1, tzinfo=UTC)
    assert decide("retry-after-too-short.json", now).next_check_at == \
        now + dt.timedelta(minutes=1)
    assert decide("retry-after-too-long.json", now).next_check_at == now + dt.timedelta(days=1)


@pytest.mark.parametrize("name", ["malformed-end-before-start.json", "malformed-no-window.json",
                                  "malformed-no-timezone.json"])
def test_malformed_answers_are_refused(name):
    with pytest.raises(AcmeProtocolError):
        decide(name, dt.datetime(2025, 1, 1, tzinfo=UTC))


def test_parse_retry_after_forms():
    now = dt.datetime(2025, 1, 2, 8, tzinfo=UTC)
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after(" 0 ") == 0.0
    assert parse_retry_after("Thu, 02 Jan 2025 08:00:30 GMT", now=now) == 30.0
    assert parse_retry_after("Thu, 02 Jan 2025 07:00:00 GMT", now=now) == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None
    assert parse_retry_after("-5") is None
