"""The certificate a CA issued, as stored: leaf, chain, serial, validity, fingerprint."""

from __future__ import annotations

import hashlib

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from app.db import Doc
from app.errors import ValidationFailed


def split_chain(fullchain_pem: str) -> list[str]:
    marker = "-----END CERTIFICATE-----"
    parts = []
    for chunk in fullchain_pem.split(marker):
        start = chunk.find("-----BEGIN CERTIFICATE-----")
        if start >= 0:
            parts.append(chunk[start:] + marker + "\n")
    return parts


def describe_issued(fullchain_pem: str) -> Doc:
    """The stored fields of an issued chain: leaf, chain, serial, validity, fingerprint."""
    parts = split_chain(fullchain_pem)
    if not parts:
        raise ValidationFailed("the CA returned no certificate")
    leaf = x509.load_pem_x509_certificate(parts[0].encode())
    der = leaf.public_bytes(serialization.Encoding.DER)
    return {
        "certificate_pem": parts[0],
        "chain_pem": "".join(parts[1:]),
        "fullchain_pem": "".join(parts),
        "serial": format(leaf.serial_number, "x"),
        "not_before": leaf.not_valid_before_utc,
        "not_after": leaf.not_valid_after_utc,
        "fingerprint_sha256": hashlib.sha256(der).hexdigest(),
        "issuer": leaf.issuer.rfc4514_string(),
    }
