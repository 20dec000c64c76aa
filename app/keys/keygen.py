"""Private key generation and inspection (no database, no KEK)."""

from __future__ import annotations

import hashlib

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from app.errors import ValidationFailed

KEY_TYPES: tuple[str, ...] = ("ec256", "ec384", "rsa2048", "rsa3072", "rsa4096")

_CURVES: dict[str, ec.EllipticCurve] = {"ec256": ec.SECP256R1(), "ec384": ec.SECP384R1()}
_RSA_BITS: dict[str, int] = {"rsa2048": 2048, "rsa3072": 3072, "rsa4096": 4096}


def generate_private_key(key_type: str) -> bytes:
    """A new private key of ``key_type`` as unencrypted PKCS#8 PEM (keep it in memory only
    and hand it to ``seal_private_key``)."""
    key: PrivateKeyTypes
    if key_type in _CURVES:
        key = ec.generate_private_key(_CURVES[key_type])
    elif key_type in _RSA_BITS:
        key = rsa.generate_private_key(public_exponent=65537, key_size=_RSA_BITS[key_type])
    else:
        raise ValidationFailed(f"unknown key type {key_type!r}: expected one of "
                               + ", ".join(KEY_TYPES),
                               errors={"key_type": [f"one of {', '.join(KEY_TYPES)}"]})
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def load_private_key(private_key_pem: bytes) -> PrivateKeyTypes:
    """Parse an unencrypted PEM private key; a clear error (without the content) if not."""
    if not isinstance(private_key_pem, (bytes, bytearray)):
        raise ValidationFailed("a private key must be PEM bytes")
    try:
        return serialization.load_pem_private_key(bytes(private_key_pem), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        # The parser's message may quote the input: never pass it on.
        raise ValidationFailed("not an unencrypted PEM private key (PKCS#8 or traditional)",
                               errors={"private_key": ["not an unencrypted PEM private key"]}
                               ) from None


def key_type_of(key: PrivateKeyTypes) -> str:
    """The KEY_TYPES name of a parsed key, or a descriptive name for other kinds."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return {"secp256r1": "ec256", "secp384r1": "ec384"}.get(key.curve.name,
                                                               f"ec-{key.curve.name}")
    if isinstance(key, rsa.RSAPrivateKey):
        return {2048: "rsa2048", 3072: "rsa3072", 4096: "rsa4096"}.get(
            key.key_size, f"rsa{key.key_size}")
    return type(key).__name__.lower()


def public_key_sha256(key: PrivateKeyTypes) -> str:
    """SHA-256 (hex) of the DER SubjectPublicKeyInfo: matches a key to its certificate."""
    spki = key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()
