"""The leak detector of tests/helpers/key_leak.py finds what it must, and only that."""

from __future__ import annotations

import base64
import os

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from app.keys import KEY_TYPES, envelope, generate_private_key, load_private_key
from tests.helpers.key_leak import KeyLeakWatch, Needles, secret_needles


@pytest.mark.parametrize("kind", KEY_TYPES)
def test_finds_pem_der_raw_secret_and_base64_body(kind) -> None:
    pem = generate_private_key(kind)
    needles = Needles()
    needles.add_pem(pem)
    assert len(needles) == 2
    key = load_private_key(pem)
    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    traditional = key.private_bytes(serialization.Encoding.DER,
                                    serialization.PrivateFormat.TraditionalOpenSSL,
                                    serialization.NoEncryption())
    body = b"".join(pem.splitlines()[1:-1])
    for offset in range(0, 20):
        pad = os.urandom(offset)
        assert needles.found_in(pad + der + pad)
        assert needles.found_in(pad + traditional)
        assert needles.found_in(pad + body)  # a PEM without its header lines
        assert needles.found_anywhere(pad + pem)
        assert needles.found_anywhere(pad + pem.replace(b"\n", b"\\n"))  # in a JSON log
        assert needles.found_in(pad + base64.b64encode(der))


def test_ignores_sealed_records_public_keys_and_other_keys() -> None:
    pem = generate_private_key("rsa2048")
    needles = Needles()
    needles.add_pem(pem)
    sealed = envelope.seal(pem, key_id="k", project_id="p", kek=AESGCM(os.urandom(32)),
                           kek_version=1)
    public = load_private_key(pem).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    for blob in (sealed.ciphertext, sealed.wrapped_dek, public, generate_private_key("ec256"),
                 os.urandom(100_000)):
        assert not needles.found_in(blob)


def test_pem_block_and_redacted_marker() -> None:
    watch = KeyLeakWatch()
    watch.scan_bytes(b'{"message": "[REDACTED PRIVATE KEY]"}', "log")
    assert watch.findings == []
    watch.scan_bytes(b"x -----BEGIN EC PRIVATE KEY-----\nAAAA", "log")
    assert [f.what for f in watch.findings] == ["a PEM private key block"]


def test_garbage_is_not_a_key() -> None:
    assert secret_needles(b"not a key") == []
