"""Drift and alert pieces without any server: endpoint specs, channel definitions
(bad ones refused with a clear error), settings, message bodies and signatures."""

from __future__ import annotations

import hashlib
import hmac
import json
from datetime import UTC, datetime, timedelta

import pytest

from app.config import ConfigError, load_settings
from app.config.watch import WatchSettings
from app.domain import drift
from app.errors import ValidationFailed
from app.ops.alerts import channels, engine, senders


def test_endpoints_parse_from_strings_and_objects() -> None:
    assert drift.parse_endpoint("WWW.Example.com:443") == drift.Endpoint("www.example.com", 443)
    assert drift.parse_endpoint("[::1]:8443") == drift.Endpoint("::1", 8443)
    assert drift.parse_endpoint({"host": "mail.example.com", "port": 25, "starttls": "smtp",
                                 "sni": "mx.example.com"}).key == \
        "mail.example.com:25/mx.example.com+smtp"
    assert drift.Endpoint("::1", 5432, None, "postgres").key == "[::1]:5432+postgres"


@pytest.mark.parametrize("bad, why", [
    ("example.com", "host:port"), ("example.com:0", "port"), ("example.com:70000", "port"),
    ({"host": "a b", "port": 443}, "host"), ({"host": "x.com", "port": "443"}, "port"),
    ({"host": "x.com", "port": 443, "starttls": "pop3"}, "starttls"),
    ({"host": "x.com", "port": 443, "sni": "10.0.0.1"}, "sni"),
    ({"host": "x.com", "port": 443, "proto": "tls"}, "unknown"),
    ({"host": "x.com", "port": 443, "sni": "x.com\n"}, "sni"),
    ({"host": "x.com\nEVIL", "port": 443}, "host"),
])
def test_bad_endpoints_are_refused_with_the_reason(bad: object, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        drift.parse_endpoint(bad)


def test_endpoint_lists_refuse_duplicates_and_too_many() -> None:
    assert drift.validate_endpoints(None) == []
    with pytest.raises(ValidationFailed, match="listed twice"):
        drift.validate_endpoints(["a.com:443", {"host": "A.com", "port": 443}])
    with pytest.raises(ValidationFailed, match="at most 50"):
        drift.validate_endpoints([f"h{i}.com:443" for i in range(51)])
    with pytest.raises(ValidationFailed, match=r"endpoints\[1\]"):
        drift.validate_endpoints(["a.com:443", "nope"])


def test_scan_offsets_spread_endpoints_over_the_interval() -> None:
    offsets = [drift._offset(f"crt_x|h{i}.example.com:443", 3600).total_seconds()
               for i in range(1000)]
    assert all(0 <= o < 3600 for o in offsets)
    # Spread: every 6-minute tenth of the hour gets a share (about 100 each).
    buckets = [0] * 10
    for o in offsets:
        buckets[int(o // 360)] += 1
    assert min(buckets) > 50, buckets
    assert drift._offset("same", 3600) == drift._offset("same", 3600)


def _served(fp: str, serial: str, days: float) -> drift.Served:
    now = datetime.now(UTC)
    return drift.Served(fp, serial, now - timedelta(days=1), now + timedelta(days=days),
                        "CN=x", "CN=y")


def test_classification() -> None:
    cert = {"_id": "crt_1", "fingerprint_sha256": "aa"}
    now, watch = datetime.now(UTC), WatchSettings()
    ours = {"0ld": "crt_1", "0th": "crt_2"}
    assert drift.classify(cert, _served("aa", "1", 80), ours, now, watch) == ("ok", [])
    assert drift.classify(cert, _served("aa", "1", 20), ours, now, watch) == \
        ("ok", ["expiring"])
    assert drift.classify(cert, _served("bb", "0ld", 80), ours, now, watch)[0] == "stale"
    assert drift.classify(cert, _served("bb", "0th", 80), ours, now, watch)[0] == "foreign"
    assert drift.classify(cert, _served("cc", "9", 80), ours, now, watch)[0] == "foreign"
    assert drift.classify(cert, None, ours, now, watch)[0] == "unreachable"


# ------------------------------------------------------------------ channel definitions
def _validate(spec: dict[str, object]) -> dict[str, object]:
    return channels.validate(spec, rule_names=engine.RULES)[0]


@pytest.mark.parametrize("spec, message", [
    ({"name": "x", "url": "ftp://files.example.com/hook"}, "unknown scheme ftp://"),
    ({"name": "x", "url": "hooks.example.com/x"}, "unknown scheme"),
    ({"name": "x", "url": "http://hooks.example.com/x"}, "must use https://"),
    ({"name": "x", "url": "https://hooks.example.com/x", "secret_env": "HOME"},
     "CAP_ALERT_"),
    ({"name": "x", "url": "https://hooks.example.com/x", "secret": "short"}, "16-512"),
    ({"name": "x", "url": "https://u:p@hooks.example.com/x"}, "no user or password"),
    ({"name": "x", "url": "https://hooks.example.com/x", "format": "teams"}, "generic, slack"),
    ({"name": "x", "url": "smtp://alerts:pw@mail.example.com", "to": ["a@b.c"]},
     "no password in the URL"),
    ({"name": "x", "url": "smtp://alerts@mail.example.com", "to": ["a@b.c"]},
     "password_env: required"),
    ({"name": "x", "url": "smtps://mail.example.com"}, "to: 1-20 email addresses"),
    ({"name": "x", "url": "smtp://mail.example.com", "to": ["a@b.c"], "secret": "x" * 20},
     "only for webhook"),
    ({"name": "x", "url": "https://hooks.example.com/x", "to": ["a@b.c"]}, "only for smtp"),
    ({"name": "x", "url": "https://hooks.example.com/x", "rules": ["nope"]}, "rules"),
    ({"name": "bad name", "url": "https://hooks.example.com/x"}, "name"),
    ({"name": "x", "url": "https://hooks.example.com/x", "colour": "red"}, "unknown"),
    ({"name": "x", "url": "smtps://mail.example.com", "to": ["a@b.c\nBcc: x@y.z"]}, "to"),
    ({"name": "x", "url": "smtps://mail.example.com", "to": ["a@b.c"], "from": "f@g.h\n"},
     "from"),
])
def test_bad_channel_definitions_are_refused(spec: dict[str, object], message: str,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CAP_ALERT_MISSING", raising=False)
    with pytest.raises(ValidationFailed, match=message):
        _validate(spec)


@pytest.mark.parametrize("spec", [
    {"name": "x", "url": "https://hooks.example.com/x", "secret_env": "CAP_ALERT_MISSING"},
    {"name": "x", "url": "smtp://alerts@mail.example.com", "to": ["a@b.c"],
     "password_env": "CAP_ALERT_MISSING"},
    {"name": "x", "url": "https://hooks.example.com/x", "ca_file": "/nonexistent/ca.pem"},
])
def test_what_this_server_lacks_is_a_conflict(spec: dict[str, object],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A variable or CA file named by a well-formed definition but absent here: 409."""
    from app.errors import Conflict

    monkeypatch.delenv("CAP_ALERT_MISSING", raising=False)
    with pytest.raises(Conflict, match="CAP_ALERT_MISSING is not set|no readable file"):
        _validate(spec)


def test_good_channel_definitions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAP_ALERT_PW", "pw")
    monkeypatch.setenv("CAP_ALERT_HOOK_SECRET", "x" * 32)
    doc, sealed = channels.validate({"name": "ops", "url": "https://hooks.example.com/T0/B1/s3cr3t",
                                     "format": "slack"}, rule_names=engine.RULES)
    assert doc["type"] == "webhook" and doc["target"] == "https://hooks.example.com/…"
    assert sealed is not None and b"s3cr3t" in sealed and "s3cr3t" not in json.dumps(doc)
    plain = _validate({"name": "in", "url": "http://10.0.0.1:8080/x", "allow_http": True,
                       "secret_env": "CAP_ALERT_HOOK_SECRET"})
    assert plain["signed"] and plain["secret_env"] == "CAP_ALERT_HOOK_SECRET"
    mail = _validate({"name": "mail", "url": "smtp://alerts@mail.example.com",
                      "password_env": "CAP_ALERT_PW", "to": "ops@example.com"})
    assert (mail["tls"], mail["port"], mail["to"]) == ("starttls", 587, ["ops@example.com"])
    assert _validate({"name": "m2", "url": "smtps://mail.example.com", "to": ["a@b.c"]}
                     )["port"] == 465


def test_watch_settings_name_the_variable() -> None:
    assert load_settings({}).watch == WatchSettings()
    for name, value in (("CAP_ALERT_EXPIRY_DAYS", "30,x"), ("CAP_ALERT_EXPIRY_DAYS", "7,7"),
                        ("CAP_DRIFT_SCAN_INTERVAL_SECONDS", "5"),
                        ("CAP_ALERT_RENEWAL_FAILURES", "0"),
                        ("CAP_DRIFT_VERIFY_DELAY_SECONDS", "-1")):
        with pytest.raises(ConfigError, match=name):
            load_settings({name: value})
    with pytest.raises(ConfigError, match="CAP_ALERT_RETRY_MAX_SECONDS"):
        load_settings({"CAP_ALERT_RETRY_BASE_SECONDS": "10", "CAP_ALERT_RETRY_MAX_SECONDS": "5"})
    assert load_settings({"CAP_ALERT_EXPIRY_DAYS": "7, 21"}).watch.alert_expiry_days == (21, 7)


def test_webhook_bodies_and_signature() -> None:
    message = {"event": "firing", "summary": "certificate x expires", "rule": "r"}
    slack = json.loads(senders.webhook_body({"format": "slack"}, message))
    assert slack["text"] == "[CertAutoPilot FIRING] certificate x expires"
    assert set(slack) == {"text", "blocks"}
    generic = json.loads(senders.webhook_body({"format": "generic"}, message))
    assert generic["rule"] == "r" and generic["text"] == slack["text"]
    body = b'{"a":1}'
    expected = hmac.new(b"k" * 16, b"1700000000." + body, hashlib.sha256).hexdigest()
    assert senders.signature(b"k" * 16, "1700000000", body) == f"sha256={expected}"
