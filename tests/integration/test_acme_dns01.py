"""dns-01 through RFC 2136 against a real authoritative server (Debian's knot), with a
wildcard: Pebble validates the TXT records our solver adds, and they are removed after.

Needs ``knotd`` (Debian package ``knot``); Pebble here resolves through knot instead of
pebble-challtestsrv."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.helpers.dnsservers import Zone, free_loopback, start_knot, txt_at
from tests.helpers.pebble import start_pebble
from tests.integration.test_acme_helpers import issue_wildcard_at

ZONE = "dns01.test"

if shutil.which("knotd") is None:  # scripts/test installs it; a missing server is a failure
    pytest.fail("needs knotd: run scripts/test or apt-get install knot", pytrace=False)


def test_wildcard_through_rfc2136(migrated_db, settings, tmp_path, monkeypatch):
    address = free_loopback()
    knot = start_knot(tmp_path / "knot", address, [Zone(ZONE, {f"ns.{ZONE}": address})])
    monkeypatch.setenv("CAP_TEST_TSIG_SECRET", knot.secret)
    pebble = start_pebble(tmp_path / "pebble", dns_server=f"{address}:53")
    try:
        cert, stored = issue_wildcard_at(migrated_db, settings, pebble, ZONE, {
            "type": "dns-01", "provider": "rfc2136", "server": address, "zone": ZONE,
            "tsig_key_name": knot.key_name, "tsig_secret_env": "CAP_TEST_TSIG_SECRET",
            "resolvers": [address]}, dns_address=address)
        assert knot.secret not in json.dumps(cert, default=str)
        assert stored.get("awaiting") is None
    finally:
        pebble.stop()
        knot.stop()


def test_dns_test_command_through_rfc2136(tmp_path, cap_env):
    import subprocess
    import sys

    zone = "cli.test"
    address = free_loopback()
    knot = start_knot(tmp_path / "knot", address, [Zone(zone, {f"ns.{zone}": address})])
    try:
        env = dict(cap_env, CAP_TEST_TSIG_SECRET=knot.secret)
        done = subprocess.run(
            [sys.executable, "-m", "app.cli", "dns", "test", "rfc2136", zone,
             "--option", f"server={address}", "--option", f"tsig_key_name={knot.key_name}",
             "--credential-env", "tsig_secret_env=CAP_TEST_TSIG_SECRET",
             "--resolver", address], capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(f"ok: rfc2136 created, served and removed TXT "
                                      f"_certautopilot-test.{zone}")
        assert txt_at(address, f"_certautopilot-test.{zone}") == []
        assert knot.secret not in done.stdout + done.stderr
    finally:
        knot.stop()
