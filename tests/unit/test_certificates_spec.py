"""Certificate specs, renewal times and backoff: pure rules, no database."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from app.config import load_settings
from app.domain import certspec, issued, renewal
from app.errors import ValidationFailed


def test_defaults():
    spec = certspec.validate_spec({"names": ["Example.com"]})
    assert spec["names"] == ["example.com"]
    assert spec["key_type"] == "ec256"
    assert spec["challenge"] == {"type": "http-01"}
    assert spec["renewal"] == {"renew_before_days": None, "use_ari": True, "reuse_key": False}
    assert spec["name"] == "example.com" and spec["profile"] is None


@pytest.mark.parametrize("key_type", ["ec256", "ec384", "rsa2048", "rsa3072", "rsa4096"])
def test_every_key_type_is_accepted(key_type):
    assert certspec.validate_spec({"names": ["a.example"], "key_type": key_type})[
        "key_type"] == key_type


@pytest.mark.parametrize("key_type", ["rsa1024", "ed25519", "EC256", "", None, 256])
def test_unknown_key_types_are_refused(key_type):
    with pytest.raises(ValidationFailed) as info:
        certspec.validate_spec({"names": ["a.example"], "key_type": key_type})
    assert "key_type" in info.value.errors


@pytest.mark.parametrize("spec, field", [
    ({"names": ["a.example"], "colour": "red"}, "colour"),
    ({}, "names"),
    ({"names": ["a.example"], "challenge": {"type": "tls-alpn-01", "x": 1}}, "challenge"),
    ({"names": ["a.example"], "challenge": {"type": "http-01", "x": 1}}, "challenge"),
    ({"names": ["a.example"], "challenge": {"type": "dns-01", "provider": "magic"}}, "challenge"),
    ({"names": ["a.example"], "renewal": {"renew_before_days": 0}}, "renewal"),
    ({"names": ["a.example"], "renewal": {"renew_before_days": True}}, "renewal"),
    ({"names": ["a.example"], "renewal": {"reuse_key": "yes"}}, "renewal"),
    ({"names": ["a.example"], "renewal": {"when": "soon"}}, "renewal"),
    ({"names": ["a.example"], "profile": "has space"}, "profile"),
    ({"names": ["*.a.example"]}, "names"),
    ({"names": ["1.2.3.4"], "challenge": {"type": "dns-01", "provider": "rfc2136",
                                          "server": "127.0.0.1", "zone": "a.example",
                                          "tsig_key_name": "k", "tsig_secret_env": "CAP_T"}},
     "names"),
])
def test_bad_specs_name_the_field(spec, field):
    with pytest.raises(ValidationFailed) as info:
        certspec.validate_spec(spec)
    assert field in info.value.errors


def test_dns01_allows_wildcards_and_keeps_no_secret():
    spec = certspec.validate_spec({
        "names": ["*.a.example", "a.example"],
        "challenge": {"type": "dns-01", "provider": "rfc2136", "server": "127.0.0.1",
                      "port": 5353, "zone": "a.example.", "tsig_key_name": "cap-key",
                      "tsig_secret_env": "CAP_DNS_TSIG_SECRET"}})
    assert spec["names"] == ["*.a.example", "a.example"]
    assert spec["challenge"]["zone"] == "a.example"
    assert spec["challenge"]["tsig_secret_env"] == "CAP_DNS_TSIG_SECRET"
    with pytest.raises(ValidationFailed, match="tsig_secret_env"):
        certspec.validate_spec({"names": ["a.example"], "challenge": {
            "type": "dns-01", "provider": "rfc2136", "server": "127.0.0.1", "zone": "a.example",
            "tsig_key_name": "k", "tsig_secret_env": "c2VjcmV0IGtleQ=="}})


def test_partial_update_merges_with_current():
    current = certspec.validate_spec({"names": ["a.example"], "key_type": "rsa2048"})
    merged = certspec.validate_spec({"names": ["b.example"]}, current={
        k: current[k] for k in certspec.SPEC_FIELDS})
    assert merged["names"] == ["b.example"] and merged["key_type"] == "rsa2048"


def test_default_renewal_at_two_thirds_with_bounded_jitter():
    nb = datetime(2026, 1, 1, tzinfo=UTC)
    na = nb + timedelta(days=90)
    times = [renewal.default_renewal_time(nb, na, random.Random(i)) for i in range(300)]
    two_thirds = nb + timedelta(days=60)
    assert all(abs(t - two_thirds) <= timedelta(hours=12) for t in times)
    assert max(times) - min(times) > timedelta(hours=12)  # spread, not a constant


def test_short_lifetimes_renew_at_half():
    nb = datetime(2026, 1, 1, tzinfo=UTC)
    na = nb + timedelta(days=6)
    times = [renewal.default_renewal_time(nb, na, random.Random(i)) for i in range(100)]
    half = nb + timedelta(days=3)
    assert all(abs(t - half) <= timedelta(days=6) / 30 for t in times)
    ten = renewal.default_renewal_time(nb, nb + timedelta(days=10), random.Random(0))
    assert abs(ten - (nb + timedelta(days=10) * 2 / 3)) <= timedelta(hours=8)


def test_override_renews_that_many_days_before_expiry():
    na = datetime(2026, 4, 1, tzinfo=UTC)
    at = renewal.override_renewal_time(na, 14, random.Random(3))
    assert na - timedelta(days=14, hours=4) <= at <= na - timedelta(days=14)


def test_backoff_doubles_from_one_hour_to_thirty_two():
    settings = load_settings({})
    hours = [renewal.backoff_delay(n, settings) / timedelta(hours=1) for n in range(1, 9)]
    assert hours == [1, 2, 4, 8, 16, 32, 32, 32]
    fast = settings.with_overrides(renewal_backoff_seconds=10, renewal_backoff_max_seconds=40)
    assert [renewal.backoff_delay(n, fast).total_seconds() for n in (1, 2, 3, 4)] == [
        10, 20, 40, 40]


def test_describe_issued_splits_the_chain(tmp_path):
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def make(cn, issuer_key, key):
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        now = dt.datetime.now(UTC)
        return (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(key.public_key()).serial_number(0xABC)
                .not_valid_before(now).not_valid_after(now + timedelta(days=90))
                .sign(issuer_key, hashes.SHA256()))

    k1, k2 = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    leaf, inter = make("leaf", k2, k1), make("inter", k2, k2)
    pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (leaf, inter)).decode()
    info = issued.describe_issued(pem)
    assert info["serial"] == "abc"
    assert info["certificate_pem"] == leaf.public_bytes(serialization.Encoding.PEM).decode()
    assert info["chain_pem"] == inter.public_bytes(serialization.Encoding.PEM).decode()
    assert info["fullchain_pem"] == pem
    assert info["issuer"] == "CN=leaf"
    assert len(info["fingerprint_sha256"]) == 64
