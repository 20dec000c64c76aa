"""Envelope encryption, in memory (no database): the crypto of a sealed key record.

A private key is encrypted with AES-256-GCM under its own random 256-bit DEK and a random
96-bit nonce; the associated data binds the ciphertext to its record id and project, so a
ciphertext copied into another record does not open. The DEK is wrapped (AES-256-GCM
again, its own nonce) by a KEK version; that wrapping's associated data binds the record
id, the project and the KEK version. Re-wrapping under a new KEK touches only the DEK.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

FORMAT = 1
NONCE_BYTES = 12
DEK_BYTES = 32
ALGORITHM = "AES-256-GCM"


class EnvelopeError(Exception):
    """Authentication failed (internal; ``app.keys.store`` turns it into a domain error)."""


class DekUnwrapFailed(EnvelopeError):
    """The wrapped DEK did not authenticate under the KEK: wrong KEK, or the wrapped DEK,
    its nonce, the KEK version or the bound record fields were altered."""


class CiphertextInvalid(EnvelopeError):
    """The DEK opened but the key ciphertext did not authenticate (altered or moved)."""


@dataclass(frozen=True)
class Sealed:
    """The stored, encrypted fields of one key record (safe to persist and log)."""

    nonce: bytes
    ciphertext: bytes
    kek_version: int
    dek_nonce: bytes
    wrapped_dek: bytes

    def __repr__(self) -> str:
        return f"Sealed(kek_version={self.kek_version}, ciphertext={len(self.ciphertext)} bytes)"


def _aad(*parts: object) -> bytes:
    # JSON of a list: unambiguous (no separator games between id and project).
    return json.dumps(list(parts), separators=(",", ":")).encode()


def key_aad(key_id: str, project_id: str) -> bytes:
    return _aad("certautopilot.key", FORMAT, key_id, project_id)


def dek_aad(key_id: str, project_id: str, kek_version: int) -> bytes:
    return _aad("certautopilot.dek", FORMAT, key_id, project_id, int(kek_version))


def wrap_dek(dek: bytes, *, kek: AESGCM, kek_version: int, key_id: str,
             project_id: str) -> tuple[bytes, bytes]:
    """(nonce, wrapped DEK) under ``kek``."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce, kek.encrypt(nonce, dek, dek_aad(key_id, project_id, kek_version))


def unwrap_dek(*, kek: AESGCM, kek_version: int, dek_nonce: bytes, wrapped_dek: bytes,
               key_id: str, project_id: str) -> bytes:
    try:
        dek = kek.decrypt(bytes(dek_nonce), bytes(wrapped_dek),
                          dek_aad(key_id, project_id, kek_version))
    except (InvalidTag, ValueError):
        raise DekUnwrapFailed(f"wrapped DEK of key {key_id} does not authenticate under "
                              f"KEK v{kek_version}") from None
    if len(dek) != DEK_BYTES:
        raise DekUnwrapFailed(f"wrapped DEK of key {key_id} has the wrong length")
    return dek


def seal(plaintext: bytes, *, key_id: str, project_id: str, kek: AESGCM,
         kek_version: int) -> Sealed:
    """Encrypt ``plaintext`` under a fresh DEK, and wrap the DEK under ``kek``."""
    dek = AESGCM.generate_key(bit_length=DEK_BYTES * 8)
    nonce = os.urandom(NONCE_BYTES)
    ciphertext = AESGCM(dek).encrypt(nonce, bytes(plaintext), key_aad(key_id, project_id))
    dek_nonce, wrapped = wrap_dek(dek, kek=kek, kek_version=kek_version, key_id=key_id,
                                  project_id=project_id)
    return Sealed(nonce, ciphertext, int(kek_version), dek_nonce, wrapped)


def open_sealed(sealed: Sealed, *, key_id: str, project_id: str, kek: AESGCM) -> bytes:
    """The plaintext; DekUnwrapFailed or CiphertextInvalid if anything does not match."""
    dek = unwrap_dek(kek=kek, kek_version=sealed.kek_version, dek_nonce=sealed.dek_nonce,
                     wrapped_dek=sealed.wrapped_dek, key_id=key_id, project_id=project_id)
    try:
        return AESGCM(dek).decrypt(bytes(sealed.nonce), bytes(sealed.ciphertext),
                                   key_aad(key_id, project_id))
    except (InvalidTag, ValueError):
        raise CiphertextInvalid(f"ciphertext of key {key_id} does not authenticate") from None


def rewrap(sealed: Sealed, *, key_id: str, project_id: str, old_kek: AESGCM,
           new_kek: AESGCM, new_version: int) -> Sealed:
    """The same key under ``new_kek``: only the DEK is unwrapped and wrapped again."""
    dek = unwrap_dek(kek=old_kek, kek_version=sealed.kek_version, dek_nonce=sealed.dek_nonce,
                     wrapped_dek=sealed.wrapped_dek, key_id=key_id, project_id=project_id)
    dek_nonce, wrapped = wrap_dek(dek, kek=new_kek, kek_version=new_version, key_id=key_id,
                                  project_id=project_id)
    return Sealed(sealed.nonce, sealed.ciphertext, int(new_version), dek_nonce, wrapped)
