"""Certificates made "issued" without a CA, for tests whose subject is what comes after
the first issuance (renewals under a budget, bulk renewal): issuing 60 or 100
certificates through Pebble first costs minutes and tests nothing those tests assert.

Each certificate gets what an issuance stores (``app.domain.issuance``): a fresh key
sealed under the KEK, a leaf for its names signed by a local CA (the issuer's name is
the caller's), the fields ``describe_issued`` derives, status ``issued``, one issue, a
renewal time well ahead, and no ARI CertID (so a renewal sends no ``replaces``: the CA
never issued it)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from app import db as dbm
from app.domain.issued import describe_issued
from app.keys import seal_private_key


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def issue_locally(db: Any, certificate_ids: list[str], *, issuer_cn: str) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_cn)])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - timedelta(days=1)).not_valid_after(now + timedelta(days=365))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    for cert in db[dbm.CERTIFICATES].find({"_id": {"$in": certificate_ids}}):
        key = ec.generate_private_key(ec.SECP256R1())
        key_pem = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        key_id = seal_private_key(db, key_pem, project_id=cert["project_id"],
                                  purpose="certificate")
        leaf = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                            cert["names"][0])]))
                .issuer_name(ca_name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - timedelta(hours=1))
                .not_valid_after(now + timedelta(days=90))
                .add_extension(x509.SubjectAlternativeName(
                    [x509.DNSName(n) for n in cert["names"]]), critical=False)
                .sign(ca_key, hashes.SHA256()))
        issued = describe_issued(_pem(leaf) + _pem(ca))
        db[dbm.CERTIFICATES].update_one({"_id": cert["_id"]}, {
            "$set": {**issued, "status": "issued", "key_id": key_id,
                     "key_type_issued": cert["key_type"], "issued_at": now,
                     "failure": None, "updated_at": now, "ari_cert_id": None, "ari": None,
                     "next_renewal_at": now + timedelta(days=60),
                     "renewal_source": "lifetime"},
            "$inc": {"version": 1, "issue_count": 1}})
