"""dns-01 through a hosted provider adapter: dns-lexicon's PowerDNS provider against a
real Debian PowerDNS (sqlite backend, HTTP API), issuing a wildcard certificate from
Pebble end to end; and ``certautopilot dns test`` against the same server."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest

from app import db as dbm
from tests.helpers.dnsservers import PowerDns, Zone, free_loopback, start_powerdns, txt_at
from tests.helpers.pebble import start_pebble
from tests.integration.test_acme_helpers import issue_wildcard_at

ZONE = "pdns.test"
TOKEN_ENV = "CAP_TEST_PDNS_API_KEY"


@pytest.fixture
def powerdns(tmp_path):
    address = free_loopback()
    server = start_powerdns(tmp_path / "pdns", address, [Zone(ZONE, {f"ns1.{ZONE}": address})])
    try:
        yield server
    finally:
        server.stop()


def spec(pdns: PowerDns) -> dict:
    return {"type": "dns-01", "provider": "powerdns", "options": {"pdns_server": pdns.api_url},
            "credentials_env": {"auth_token": TOKEN_ENV}, "resolvers": [pdns.address]}


def test_wildcard_through_lexicon_powerdns(migrated_db, settings, tmp_path, monkeypatch,
                                           powerdns, caplog):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv(TOKEN_ENV, powerdns.api_key)
    pebble = start_pebble(tmp_path / "pebble", dns_server=f"{powerdns.address}:53")
    try:
        issue_wildcard_at(migrated_db, settings, pebble, ZONE, spec(powerdns),
                          dns_address=powerdns.address)
        # the API key is in no stored document and no log line
        for name in (dbm.CERTIFICATES, dbm.ORDERS, dbm.AUDIT):
            for doc in migrated_db[name].find():
                assert powerdns.api_key not in json.dumps(doc, default=str)
        assert powerdns.api_key not in caplog.text
    finally:
        pebble.stop()


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "app.cli", *args], capture_output=True,
                          text=True, env=env, timeout=120)


def test_dns_test_command(powerdns, cap_env):
    env = dict(cap_env, **{TOKEN_ENV: powerdns.api_key})
    args = ["dns", "test", "powerdns", ZONE, "--option", f"pdns_server={powerdns.api_url}",
            "--credential-env", f"auth_token={TOKEN_ENV}", "--resolver", powerdns.address,
            "--json"]
    done = cli(*args, env=env)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["ok"] and result["record"] == f"_certautopilot-test.{ZONE}"
    assert txt_at(powerdns.address, result["record"]) == []
    assert powerdns.api_key not in done.stdout + done.stderr

    env[TOKEN_ENV] = "wrong-" + powerdns.api_key
    done = cli(*args, env=env)
    assert done.returncode == 1
    assert "HTTP 401 from the provider's API" in done.stderr
    assert powerdns.api_key not in done.stdout + done.stderr

    del env[TOKEN_ENV]
    done = cli(*args, env=env)
    assert done.returncode == 1
    assert TOKEN_ENV in done.stderr and len(done.stderr.strip().splitlines()) == 1

    done = cli("dns", "test", "nosuchprovider", ZONE, env=env)
    assert done.returncode == 1
    assert "unknown dns-01 provider 'nosuchprovider'" in done.stderr
