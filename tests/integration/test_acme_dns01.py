"""dns-01 through RFC 2136 against a real authoritative server (Debian's knot), with a
wildcard: Pebble validates the TXT records our solver adds, and they are removed after.

Needs ``knotd`` (Debian package ``knot``); Pebble here resolves through knot instead of
pebble-challtestsrv, so this test starts its own Pebble."""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path

import dns.message
import dns.query
import dns.rdatatype
import pytest
from cryptography import x509

from app.domain import accounts, certificates
from app.domain.issuance import run_issuance
from devstack.embedded import free_port
from tests.helpers.fences import LocalFence
from tests.helpers.pebble import write_tls_cert
from tests.integration.test_acme_helpers import ACTOR, make_project

ZONE = "dns01.test"
KEY_NAME = "cap-key"

if shutil.which("knotd") is None:  # scripts/test installs it; a missing server is a failure
    pytest.fail("needs knotd: run scripts/test or apt-get install knot", pytrace=False)


def start_knot(directory: Path, secret: str) -> tuple[subprocess.Popen[bytes], int]:
    directory.mkdir(parents=True)
    port = free_port()
    (directory / f"{ZONE}.zone").write_text(
        f"$ORIGIN {ZONE}.\n$TTL 60\n"
        f"@ SOA ns.{ZONE}. hostmaster.{ZONE}. 1 3600 600 86400 60\n"
        f"@ NS ns.{ZONE}.\nns A 127.0.0.1\n")
    (directory / "knot.conf").write_text(f"""
server:
    listen: 127.0.0.1@{port}
    rundir: {directory}
    user: root
database:
    storage: {directory}
key:
  - id: {KEY_NAME}
    algorithm: hmac-sha256
    secret: {secret}
acl:
  - id: update
    key: {KEY_NAME}
    action: update
zone:
  - domain: {ZONE}
    file: {directory}/{ZONE}.zone
    acl: update
""")
    log = open(directory / "knot.log", "ab")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(["knotd", "-c", str(directory / "knot.conf")], stdout=log,
                            stderr=log)
    log.close()
    deadline = time.monotonic() + 20
    while True:
        try:
            query = dns.message.make_query(f"ns.{ZONE}", dns.rdatatype.A)
            dns.query.udp(query, "127.0.0.1", port=port, timeout=0.5)
            return proc, port
        except Exception:  # noqa: BLE001 - not up yet
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError((directory / "knot.log").read_text()) from None
            time.sleep(0.1)


def start_pebble_on(directory: Path, dns_port: int) -> tuple[subprocess.Popen[bytes], str,
                                                             Path]:
    directory.mkdir(parents=True)
    cert, key = write_tls_cert(directory)
    port = free_port()
    config = {"pebble": {
        "listenAddress": f"127.0.0.1:{port}", "managementListenAddress":
            f"127.0.0.1:{free_port()}", "certificate": str(cert), "privateKey": str(key),
        "httpPort": free_port(), "tlsPort": free_port(), "ocspResponderURL": "",
        "externalAccountBindingRequired": False}}
    (directory / "pebble.json").write_text(json.dumps(config))
    log = open(directory / "pebble.log", "ab")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(["pebble", "-config", str(directory / "pebble.json"),
                             "-dnsserver", f"127.0.0.1:{dns_port}"], stdout=log, stderr=log,
                            env=dict(os.environ, PEBBLE_VA_NOSLEEP="1",
                                     PEBBLE_WFE_NONCEREJECT="0"))
    log.close()
    url = f"https://127.0.0.1:{port}/dir"
    context = ssl.create_default_context(cafile=str(cert))
    deadline = time.monotonic() + 20
    while True:
        try:
            with urllib.request.urlopen(url, context=context, timeout=1):
                return proc, url, cert
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError((directory / "pebble.log").read_text()) from None
            time.sleep(0.1)


def txt_records(port: int, name: str) -> list[str]:
    answer = dns.query.udp(dns.message.make_query(name, dns.rdatatype.TXT), "127.0.0.1",
                           port=port, timeout=2)
    return [item.to_text() for rrset in answer.answer for item in rrset]


def test_wildcard_through_rfc2136(migrated_db, settings, tmp_path, monkeypatch):
    secret = base64.b64encode(secrets.token_bytes(32)).decode()
    monkeypatch.setenv("CAP_TEST_TSIG_SECRET", secret)
    knot, dns_port = start_knot(tmp_path / "knot", secret)
    pebble, directory_url, ca_cert = start_pebble_on(tmp_path / "pebble", dns_port)
    try:
        s = settings.with_overrides(acme_directory_url=directory_url, acme_ca_bundle=ca_cert,
                                    acme_order_timeout_seconds=30.0)
        project_id = make_project(migrated_db)
        accounts.create_account(migrated_db, project_id, {"terms_agreed": True}, ACTOR,
                                settings=s)
        cert = certificates.create_certificate(migrated_db, project_id, {
            "names": [f"*.{ZONE}", ZONE],
            "challenge": {"type": "dns-01", "provider": "rfc2136", "server": "127.0.0.1",
                          "port": dns_port, "zone": ZONE, "tsig_key_name": KEY_NAME,
                          "tsig_secret_env": "CAP_TEST_TSIG_SECRET"}}, ACTOR, settings=s)
        assert secret not in json.dumps(cert, default=str)
        result = run_issuance(migrated_db, LocalFence(migrated_db, "job-dns01"), cert["_id"],
                              reason="initial", settings=s)
        assert result["outcome"] == "issued"
        stored = certificates.get_certificate(migrated_db, cert["_id"])
        leaf = x509.load_pem_x509_certificate(stored["certificate_pem"].encode())
        sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert sorted(sans.get_values_for_type(x509.DNSName)) == [f"*.{ZONE}", ZONE]
        assert txt_records(dns_port, f"_acme-challenge.{ZONE}") == []  # cleaned up
    finally:
        pebble.terminate()
        knot.terminate()
        for proc in (pebble, knot):
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
