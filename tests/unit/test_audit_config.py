"""CAP_AUDIT_SINKS and CAP_AUDIT_HMAC_KEY: validated at start, errors name the variable and
never show a secret; audit details are plain JSON without secrets."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from bson import ObjectId

from app.audit.log import Actor, build_entry, canonical_json, entry_hash, plain_details
from app.config import ConfigError, load_settings

URI = "mongodb://m0/certautopilot?replicaSet=rs0"


def load(**env: str):
    return load_settings({"CAP_MONGO_URI": URI, **env})


def test_no_sinks_and_no_key_by_default() -> None:
    settings = load()
    assert settings.audit_sinks == () and settings.audit_hmac_key is None


def test_comma_list_of_every_kind(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    settings = load(CAP_AUDIT_SINKS=(
        f"syslog+tcp://siem.example:1514, syslog+tls://siem.example?ca={ca}&app_name=cap,"
        "https://splunk.example:8088/services/collector/event?token_env=SPLUNK_TOKEN&index=sec,"
        "file:///var/log/cap-audit.jsonl?batch=100"), SPLUNK_TOKEN="t0ken")
    tcp, tls, http, file = settings.audit_sinks
    assert (tcp.kind, tcp.host, tcp.port, tcp.name) == \
        ("syslog+tcp", "siem.example", 1514, "syslog+tcp:siem.example:1514")
    assert (tls.kind, tls.port, tls.ca, tls.app_name) == ("syslog+tls", 6514, str(ca), "cap")
    assert http.kind == "http" and http.url == \
        "https://splunk.example:8088/services/collector/event"
    assert http.token_env == "SPLUNK_TOKEN" and http.index == "sec"
    assert "t0ken" not in repr(settings)
    assert (file.kind, file.path, file.batch) == ("file", "/var/log/cap-audit.jsonl", 100)


def test_json_list_with_names_and_options() -> None:
    settings = load(CAP_AUDIT_SINKS='[{"url": "syslog+tcp://a:514", "name": "primary", '
                                    '"timeout": "3"}, "syslog+tcp://b"]')
    first, second = settings.audit_sinks
    assert (first.name, first.timeout) == ("primary", 3.0)
    assert second.name == "syslog+tcp:b:514"


def test_the_hmac_key_is_kept_out_of_repr() -> None:
    settings = load(CAP_AUDIT_HMAC_KEY="s" * 40)
    assert settings.audit_hmac_key == b"s" * 40
    assert "sss" not in repr(settings)


@pytest.mark.parametrize("value", [
    "syslog+udp://h:514",
    "syslog+tcp://:514",
    "syslog+tcp://h:99999",
    "syslog+tcp://h:514/path",
    "syslog+tcp://h?ack=maybe",
    "syslog+tls://h?ca=/nonexistent/ca.pem",
    "syslog+tls://h?cert=/etc/hostname",
    "https://h/collector?token_env=NOT_SET_ANYWHERE",
    "https://h/collector?token_env=1bad",
    "https://h/collector?colour=blue",
    "file://relative/path",
    "file:///",
    "syslog+tcp://h?batch=0",
    "syslog+tcp://h?timeout=abc",
    "syslog+tcp://h, syslog+tcp://h",
    "[not json",
    '{"url": "syslog+tcp://h"}',
    '[{"name": "no url"}]',
])
def test_bad_sinks_name_the_variable(value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(CAP_AUDIT_SINKS=value)
    assert info.value.variable == "CAP_AUDIT_SINKS"
    assert "CAP_AUDIT_SINKS" in str(info.value) and "expected" in str(info.value)


@pytest.mark.parametrize("value", [
    "https://h/collector?token=sekret-value",
    "https://user:sekret-value@h/collector",
    "https://h/collector?token_env=X&sekret-value",
])
def test_a_secret_in_the_sink_url_is_refused_without_being_echoed(value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(CAP_AUDIT_SINKS=value)
    assert "sekret-value" not in str(info.value)


@pytest.mark.parametrize("value", ["short", " " + "x" * 40])
def test_a_weak_hmac_key_is_refused_without_being_echoed(value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(CAP_AUDIT_HMAC_KEY=value)
    assert info.value.variable == "CAP_AUDIT_HMAC_KEY"
    assert value.strip() not in str(info.value)


def test_details_become_plain_json() -> None:
    oid = ObjectId()
    when = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    assert plain_details({"at": when, "id": oid, "names": ("a", "b"), "n": 1, "ok": True}) == \
        {"at": "2026-01-02T03:04:05.678+00:00", "id": str(oid), "names": ["a", "b"], "n": 1,
         "ok": True}


@pytest.mark.parametrize("details", [
    {"token": "abc"},
    {"nested": {"private_key": "x"}},
    {"eab_hmac_key": "x"},
    {"db_password": "x"},
    {"pem": "-----BEGIN EC PRIVATE KEY-----\nMHc...\n-----END EC PRIVATE KEY-----"},
    {"blob": b"raw bytes"},
    {"n": float("nan")},
    {1: "non-string key"},
])
def test_details_with_secrets_or_non_json_values_are_refused(details: dict) -> None:
    with pytest.raises(ValueError):
        plain_details(details)


def test_token_ids_and_key_ids_are_fine() -> None:
    assert plain_details({"token_id": "tok_1", "key_id": "k1", "kek_version": 2})


def test_entry_hash_is_over_prev_hash_and_canonical_json() -> None:
    entry = build_entry(seq=1, prev_hash="0" * 64, time=datetime(2026, 1, 1, tzinfo=UTC),
                        actor=Actor("token", "tok_1"), action="certificate.create",
                        target="certificate:c1", project_id="p1", details={"b": 1, "a": 2},
                        request_id="req-1", key=None)
    assert canonical_json(entry).startswith(b'{"action":"certificate.create","actor":')
    assert b'"time":"2026-01-01T00:00:00.000+00:00"' in canonical_json(entry)
    assert entry_hash("0" * 64, entry) == entry["hash"]
    keyed = build_entry(seq=1, prev_hash="0" * 64, time=datetime(2026, 1, 1, tzinfo=UTC),
                        actor=Actor("token", "tok_1"), action="certificate.create",
                        target="certificate:c1", project_id="p1", details={},
                        request_id=None, key=b"k" * 32)
    assert keyed["hash_alg"] == "hmac-sha256"
    assert entry_hash("0" * 64, keyed, b"k" * 32) == keyed["hash"]
    assert entry_hash("0" * 64, keyed, b"x" * 32) != keyed["hash"]


@pytest.mark.parametrize("action", ["Certificate.Create", "create", "a b.c", ""])
def test_actions_are_dotted_lower_case(action: str) -> None:
    with pytest.raises(ValueError):
        build_entry(seq=1, prev_hash="0" * 64, time=datetime.now(UTC), actor=Actor("t", "1"),
                    action=action, target="x:1", project_id=None, details={},
                    request_id=None, key=None)
