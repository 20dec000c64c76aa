"""TLS-ALPN-01 (RFC 8737): Pebble's VA validates against the api role's responder, which
answers from the shared challenge records in MongoDB."""

from __future__ import annotations

import socket
import ssl

import pytest
from cryptography import x509

from app import db as dbm
from app import start_tls_alpn_responder
from app.acme.tlsalpn import ACME_TLS_1, ID_PE_ACME_IDENTIFIER
from app.domain import accounts, certificates
from app.domain.issuance import run_issuance
from devstack.embedded import free_port
from tests.helpers.fences import LocalFence
from tests.helpers.pebble import start_pebble
from tests.integration.test_acme_helpers import ACTOR, make_project


@pytest.fixture
def alpn(settings, tmp_path):
    port = free_port()
    pebble = start_pebble(tmp_path / "pebble", tls_port=port)
    s = settings.with_overrides(acme_directory_url=pebble.directory_url,
                                acme_ca_bundle=pebble.ca_cert, acme_order_timeout_seconds=60.0,
                                tls_alpn_port=port, api_bind="127.0.0.1:8000")
    responder = start_tls_alpn_responder(s)
    try:
        yield s, port
    finally:
        responder.shutdown()
        responder.server_close()
        pebble.stop()


def handshake(port: int, name: str) -> x509.Certificate:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols([ACME_TLS_1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname=name) as tls:
        der = tls.getpeercert(binary_form=True)
        assert der is not None and tls.selected_alpn_protocol() == ACME_TLS_1
        return x509.load_der_x509_certificate(der)


def test_issue_with_tls_alpn_01(migrated_db, alpn):
    s, port = alpn
    project_id = make_project(migrated_db)
    accounts.create_account(migrated_db, project_id, {"terms_agreed": True}, ACTOR,
                            settings=s)
    names = ["alpn.example.test", "www.alpn.example.test"]
    cert = certificates.create_certificate(migrated_db, project_id, {
        "names": names, "challenge": "tls-alpn-01"}, ACTOR, settings=s)
    result = run_issuance(migrated_db, LocalFence(migrated_db, "job-alpn"), cert["_id"],
                          reason="initial", settings=s)
    assert result["outcome"] == "issued"
    stored = certificates.get_certificate(migrated_db, cert["_id"])
    leaf = x509.load_pem_x509_certificate(stored["certificate_pem"].encode())
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sorted(sans.get_values_for_type(x509.DNSName)) == names
    assert migrated_db[dbm.CHALLENGES].count_documents({}) == 0  # removed after use


def test_answers_pending_names_only(migrated_db, alpn):
    _, port = alpn
    migrated_db[dbm.CHALLENGES].insert_one({
        "_id": "tok", "token": "tok", "type": "tls-alpn-01", "identifier": "pending.test",
        "key_authorization": "tok.thumbprint"})
    served = handshake(port, "pending.test")
    extension = served.extensions.get_extension_for_oid(ID_PE_ACME_IDENTIFIER)
    assert extension.critical
    with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
        handshake(port, "unknown.test")


def test_off_by_default(settings):
    assert settings.tls_alpn_port == 0
    assert start_tls_alpn_responder(settings) is None
