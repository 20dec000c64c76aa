"""Debian's pebble + pebble-challtestsrv on free ports: the local test CA of
``certautopilot dev`` and of the ACME integration tests.

pebble-challtestsrv serves Pebble's DNS (every A query → 127.0.0.1, TXT records set via
its management API) and leaves ``http_port`` free: that is where Pebble's VA fetches
HTTP-01 answers, so the test starts CertAutoPilot's api (the HTTP-01 responder) there.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import ssl
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from devstack.embedded import free_port


def write_tls_cert(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for localhost / 127.0.0.1 (Pebble's own listener)."""
    key = ec.generate_private_key(ec.SECP256R1())
    # A name of its own: two Pebbles' certificates in one CA bundle must not share a
    # subject, or OpenSSL may pick the wrong one to verify with.
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                         f"localhost pebble {os.urandom(4).hex()}")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "pebble-cert.pem", directory / "pebble-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


@dataclass
class Pebble:
    directory_url: str
    ca_cert: Path  # pass as verify= / CA bundle when talking to Pebble
    http_port: int  # where Pebble's VA fetches HTTP-01 (our api listens here)
    management_url: str
    challtestsrv_url: str
    dns_port: int
    log_path: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def set_txt(self, host: str, value: str) -> None:
        self._challtest("set-txt", {"host": host, "value": value})

    def clear_txt(self, host: str) -> None:
        self._challtest("clear-txt", {"host": host})

    def _challtest(self, path: str, body: dict[str, str]) -> None:
        request = urllib.request.Request(f"{self.challtestsrv_url}/{path}",
                                         data=json.dumps(body).encode(), method="POST")
        with urllib.request.urlopen(request, timeout=5):
            pass


def start_pebble(directory: Path, env_extra: dict[str, str] | None = None,
                 eab_required: bool = False, http_port: int | None = None,
                 port: int | None = None, ocsp_responder_url: str = "",
                 dns_server: str | None = None, tls_port: int | None = None) -> Pebble:
    """Start both. ``http_port`` is where the VA fetches HTTP-01 answers and ``port`` the
    directory's port: free ports unless given (the dev stack passes its api's port, and
    keeps the directory URL stable across restarts so its stored account still matches).
    ``ocsp_responder_url`` goes into the certificates' AIA (Pebble runs no responder).
    ``dns_server`` (``host:port``): Pebble resolves through it instead of
    pebble-challtestsrv, which is then not started (the dns-01 tests' own servers).
    ``tls_port``: where the VA connects for TLS-ALPN-01."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = write_tls_cert(directory)
    mgmt, tls_port = free_port(), tls_port or free_port()
    port = port or free_port()
    http_port = http_port or free_port()
    dns_port, chall_mgmt = free_port(), free_port()
    config = {"pebble": {
        "listenAddress": f"127.0.0.1:{port}",
        "managementListenAddress": f"127.0.0.1:{mgmt}",
        "certificate": str(cert), "privateKey": str(key),
        "httpPort": http_port, "tlsPort": tls_port,
        "ocspResponderURL": ocsp_responder_url, "externalAccountBindingRequired": eab_required,
        "externalAccountMACKeys": {
            "kid-1": "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W"},
    }}
    config_path = directory / "pebble-config.json"
    config_path.write_text(json.dumps(config))
    log_path = directory / "pebble.log"
    out = open(log_path, "ab")  # noqa: SIM115 - owned by the processes until stop()
    env = dict(os.environ, PEBBLE_VA_NOSLEEP="1", PEBBLE_VA_ALWAYS_VALID="0",
               **(env_extra or {}))
    procs = []
    if dns_server is None:
        procs.append(subprocess.Popen(
            ["pebble-challtestsrv", "-dns01", f"127.0.0.1:{dns_port}", "-http01", "",
             "-https01", "", "-tlsalpn01", "", "-management",
             f"127.0.0.1:{chall_mgmt}", "-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""],
            stdout=out, stderr=out))
    peb = subprocess.Popen(["pebble", "-config", str(config_path), "-dnsserver",
                            dns_server or f"127.0.0.1:{dns_port}"], stdout=out, stderr=out,
                           env=env)
    procs.append(peb)
    out.close()
    instance = Pebble(f"https://127.0.0.1:{port}/dir", cert, http_port,
                      f"https://127.0.0.1:{mgmt}", f"http://127.0.0.1:{chall_mgmt}",
                      dns_port, log_path, procs)
    context = ssl.create_default_context(cafile=str(cert))
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(instance.directory_url, context=context, timeout=2):
                break
        except OSError:
            if time.monotonic() > deadline or peb.poll() is not None:
                instance.stop()
                raise RuntimeError(f"pebble did not start; log:\n{instance.log()}") from None
            time.sleep(0.1)
    return instance


def unlimited_budget(directory_url: str) -> str:
    """``CAP_CA_BUDGETS`` for a Pebble: it has none of Let's Encrypt's limits (the default
    budget), so the per-account, per-domain and failed-validation buckets are off for its
    directory (hundreds of test names under one domain must not wait a week); the pace
    stays."""
    return json.dumps({directory_url: {
        "new_orders_per_account": "off", "new_certificates_per_domain": "off",
        "failed_validations_per_identifier": "off"}})

