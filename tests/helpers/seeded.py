"""Certificates made "issued" without a CA, for tests whose subject is what comes after
the first issuance (renewals under a budget, bulk renewal): issuing 60 or 100
certificates through Pebble first costs minutes and tests nothing those tests assert.

Each certificate gets what an issuance stores (``app.domain.issuance``): a fresh key of
its type sealed under the KEK, a leaf for its names signed by a local CA
(``tests.helpers.receivers.CertFactory``, named by the caller), the fields
``describe_issued`` derives, status ``issued``, one issue, a renewal time well ahead,
and no ARI CertID (so a renewal sends no ``replaces``: the CA never issued it)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from app import db as dbm
from app.domain.issued import describe_issued
from app.keys import generate_private_key, seal_private_key
from tests.helpers.receivers import CertFactory


def issue_locally(db: Any, certificate_ids: list[str], *, issuer_cn: str,
                  directory: Path) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    ca = CertFactory(directory, issuer_cn)
    for cert in db[dbm.CERTIFICATES].find({"_id": {"$in": certificate_ids}}):
        key_pem = generate_private_key(cert["key_type"])
        leaf = ca.leaf(cert["names"][0], key_pem=key_pem, names=cert["names"])
        key_id = seal_private_key(db, key_pem, project_id=cert["project_id"],
                                  purpose="certificate")
        db[dbm.CERTIFICATES].update_one({"_id": cert["_id"]}, {
            "$set": {**describe_issued(leaf.cert_path.read_text()), "status": "issued",
                     "key_id": key_id, "key_type_issued": cert["key_type"],
                     "issued_at": now, "failure": None, "updated_at": now,
                     "ari_cert_id": None, "ari": None,
                     "next_renewal_at": now + timedelta(days=60),
                     "renewal_source": "lifetime"},
            "$inc": {"version": 1, "issue_count": 1}})
