"""The TLS-ALPN-01 responder as the api role runs it: gunicorn with 2 workers and
CAP_TLS_ALPN_PORT, every worker listening on the port (SO_REUSEPORT), answering from the
challenge records in MongoDB."""

from __future__ import annotations

import hashlib
import socket
import ssl

import pytest
from cryptography import x509

from app import db as dbm
from app.acme.tlsalpn import ACME_TLS_1, ID_PE_ACME_IDENTIFIER
from devstack.embedded import free_port
from tests.helpers import wait_for


def handshake(port: int, name: str) -> x509.Certificate:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols([ACME_TLS_1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname=name) as tls:
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der)


def test_every_api_worker_answers_tls_alpn_01(migrated_db, cap_env, procs):
    port = free_port()
    env = {**cap_env, "CAP_TLS_ALPN_PORT": str(port)}
    api = procs.api(env, f"127.0.0.1:{free_port()}", workers=2)
    migrated_db[dbm.CHALLENGES].insert_one({
        "_id": "tok-e2e", "token": "tok-e2e", "type": "tls-alpn-01",
        "identifier": "alpn.e2e.test", "key_authorization": "tok-e2e.thumb"})

    def served() -> x509.Certificate | None:
        try:
            return handshake(port, "alpn.e2e.test")
        except OSError:
            return None

    cert = wait_for(served, timeout=60, message=f"the tls-alpn-01 responder\n{api.log()}")
    extension = cert.extensions.get_extension_for_oid(ID_PE_ACME_IDENTIFIER)
    assert extension.critical
    assert extension.value.value == b"\x04\x20" + hashlib.sha256(b"tok-e2e.thumb").digest()
    for _ in range(20):  # whichever worker the kernel picks answers the same
        handshake(port, "alpn.e2e.test")
    with pytest.raises(ssl.SSLError):
        handshake(port, "unknown.e2e.test")
    wait_for(lambda: api.log().count("tls-alpn-01 responder listening") == 2, timeout=60,
             message="both workers' responders")
