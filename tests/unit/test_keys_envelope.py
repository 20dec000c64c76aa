"""Envelope encryption in memory: round trips and every kind of tampering."""

from __future__ import annotations

import dataclasses
import os

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from app.errors import ValidationFailed
from app.keys import KEY_TYPES, envelope, generate_private_key, load_private_key
from app.keys.keygen import key_type_of, public_key_sha256

KEK1 = AESGCM(os.urandom(32))
KEK2 = AESGCM(os.urandom(32))


@pytest.fixture(scope="module")
def pems() -> dict[str, bytes]:
    return {kind: generate_private_key(kind) for kind in KEY_TYPES}


@pytest.mark.parametrize("kind", KEY_TYPES)
def test_round_trip_for_every_key_type(pems, kind) -> None:
    pem = pems[kind]
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    assert key_type_of(load_private_key(pem)) == kind
    sealed = envelope.seal(pem, key_id="k1", project_id="p1", kek=KEK1, kek_version=1)
    assert pem not in sealed.ciphertext and b"PRIVATE KEY" not in sealed.ciphertext
    assert len(sealed.nonce) == 12 and len(sealed.dek_nonce) == 12
    assert envelope.open_sealed(sealed, key_id="k1", project_id="p1", kek=KEK1) == pem


def test_each_seal_uses_a_fresh_dek_and_nonce(pems) -> None:
    a = envelope.seal(pems["ec256"], key_id="k", project_id="p", kek=KEK1, kek_version=1)
    b = envelope.seal(pems["ec256"], key_id="k", project_id="p", kek=KEK1, kek_version=1)
    assert a.nonce != b.nonce and a.ciphertext != b.ciphertext
    assert a.wrapped_dek != b.wrapped_dek


def _flip(data: bytes, index: int = 0) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1:]


@pytest.mark.parametrize(("field", "error"), [
    ("ciphertext", envelope.CiphertextInvalid),
    ("nonce", envelope.CiphertextInvalid),
    ("wrapped_dek", envelope.DekUnwrapFailed),
    ("dek_nonce", envelope.DekUnwrapFailed),
])
def test_tampered_field_is_refused(pems, field, error) -> None:
    sealed = envelope.seal(pems["ec384"], key_id="k1", project_id="p1", kek=KEK1, kek_version=1)
    for index in (0, len(getattr(sealed, field)) - 1):
        bad = dataclasses.replace(sealed, **{field: _flip(getattr(sealed, field), index)})
        with pytest.raises(error) as info:
            envelope.open_sealed(bad, key_id="k1", project_id="p1", kek=KEK1)
        assert "k1" in str(info.value)


@pytest.mark.parametrize(("key_id", "project_id"), [("k2", "p1"), ("k1", "p2"), ("k1p", "1")])
def test_ciphertext_bound_to_its_record_and_project(pems, key_id, project_id) -> None:
    sealed = envelope.seal(pems["ec256"], key_id="k1", project_id="p1", kek=KEK1, kek_version=1)
    with pytest.raises(envelope.EnvelopeError):
        envelope.open_sealed(sealed, key_id=key_id, project_id=project_id, kek=KEK1)


def test_ciphertext_moved_under_another_records_dek_is_refused(pems) -> None:
    a = envelope.seal(pems["ec256"], key_id="a", project_id="p", kek=KEK1, kek_version=1)
    b = envelope.seal(pems["rsa2048"], key_id="b", project_id="p", kek=KEK1, kek_version=1)
    moved = dataclasses.replace(b, nonce=a.nonce, ciphertext=a.ciphertext)
    with pytest.raises(envelope.CiphertextInvalid):
        envelope.open_sealed(moved, key_id="b", project_id="p", kek=KEK1)


def test_changed_kek_version_or_wrong_kek_is_refused(pems) -> None:
    sealed = envelope.seal(pems["ec256"], key_id="k", project_id="p", kek=KEK1, kek_version=1)
    with pytest.raises(envelope.DekUnwrapFailed):
        envelope.open_sealed(dataclasses.replace(sealed, kek_version=2), key_id="k",
                             project_id="p", kek=KEK1)
    with pytest.raises(envelope.DekUnwrapFailed):
        envelope.open_sealed(sealed, key_id="k", project_id="p", kek=KEK2)


def test_rewrap_changes_only_the_wrapped_dek(pems) -> None:
    sealed = envelope.seal(pems["rsa2048"], key_id="k", project_id="p", kek=KEK1, kek_version=1)
    new = envelope.rewrap(sealed, key_id="k", project_id="p", old_kek=KEK1, new_kek=KEK2,
                          new_version=2)
    assert (new.nonce, new.ciphertext) == (sealed.nonce, sealed.ciphertext)
    assert new.kek_version == 2 and new.wrapped_dek != sealed.wrapped_dek
    assert envelope.open_sealed(new, key_id="k", project_id="p", kek=KEK2) == pems["rsa2048"]
    with pytest.raises(envelope.DekUnwrapFailed):
        envelope.open_sealed(new, key_id="k", project_id="p", kek=KEK1)


def test_repr_and_errors_show_no_key_material(pems) -> None:
    sealed = envelope.seal(pems["ec256"], key_id="k", project_id="p", kek=KEK1, kek_version=1)
    assert sealed.ciphertext.hex() not in repr(sealed)
    try:
        envelope.open_sealed(sealed, key_id="k", project_id="p", kek=KEK2)
    except envelope.EnvelopeError as exc:
        assert exc.__cause__ is None and exc.__suppress_context__
        assert sealed.wrapped_dek.hex() not in str(exc)


def test_generate_rejects_unknown_type() -> None:
    with pytest.raises(ValidationFailed) as info:
        generate_private_key("dsa1024")
    assert "ec256" in info.value.message


def test_load_rejects_non_pem_without_echoing_it() -> None:
    secret = b"-----BEGIN PRIVATE KEY-----\nTOTALLYSECRETBYTES\n-----END PRIVATE KEY-----\n"
    with pytest.raises(ValidationFailed) as info:
        load_private_key(secret)
    assert "TOTALLYSECRET" not in str(info.value)
    assert info.value.__cause__ is None


def test_public_key_fingerprint_is_stable(pems) -> None:
    key = load_private_key(pems["ec256"])
    assert public_key_sha256(key) == public_key_sha256(load_private_key(pems["ec256"]))
    assert len(public_key_sha256(key)) == 64
