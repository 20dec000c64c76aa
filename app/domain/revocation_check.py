"""Revoked behind our back: the daily OCSP check of every current certificate.

A CA may revoke certificates (a mass-revocation incident, a key compromise report) and
tell nobody in time. The ``certificates.revocation_check`` job (timed work, every
CAP_REVOCATION_CHECK_SECONDS, a day by default) asks the OCSP responder named in each
live certificate's Authority Information Access for its status. A certificate the CA
reports revoked is renewed at once, ahead of the scan: an issuance job (reason
``emergency``, which goes through the shared CA budget like every order) is enqueued
and its ``next_renewal_at`` set to now, in one transaction with an audit entry
``certificate.revocation_detected``.

The OCSP answer is trusted only when signed by the certificate's issuer (the chain's
first certificate) and about this very serial; anything else (no responder, a network
error, a delegated responder, a bad signature) leaves the certificate alone and is
counted as ``unknown`` in the job's result. (Let's Encrypt ended OCSP in 2025 and
publishes CRLs instead; a CRL check is not part of this yet.)
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

import requests
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509 import ocsp
from cryptography.x509.oid import AuthorityInformationAccessOID
from pymongo.client_session import ClientSession
from pymongo.database import Database

from app import audit
from app import db as dbm
from app.db import Doc
from app.domain import certificates
from app.jobs import JobContext

log = logging.getLogger(__name__)

JOB_KIND = "certificates.revocation_check"
REASON = "emergency"
BATCH = 200
TIMEOUT_SECONDS = 10.0
GOOD, REVOKED, UNKNOWN = "good", "revoked", "unknown"


def _ocsp_url(cert: x509.Certificate) -> str | None:
    try:
        aia = cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    except x509.ExtensionNotFound:
        return None
    for desc in aia:
        if desc.access_method == AuthorityInformationAccessOID.OCSP:
            return str(desc.access_location.value)
    return None


def _signed_by(response: ocsp.OCSPResponse, issuer: x509.Certificate) -> bool:
    key = issuer.public_key()
    algorithm = response.signature_hash_algorithm
    try:
        if isinstance(key, rsa.RSAPublicKey) and algorithm is not None:
            key.verify(response.signature, response.tbs_response_bytes, padding.PKCS1v15(),
                       algorithm)
        elif isinstance(key, ec.EllipticCurvePublicKey) and algorithm is not None:
            key.verify(response.signature, response.tbs_response_bytes,
                       ec.ECDSA(algorithm))
        else:
            return False
    except InvalidSignature:
        return False
    return True


def ocsp_status(certificate_pem: str, chain_pem: str, *,
                ca_bundle: str | None = None) -> tuple[str, datetime | None]:
    """(good | revoked | unknown, revocation time) from the certificate's OCSP responder."""
    leaf = x509.load_pem_x509_certificate(certificate_pem.encode())
    try:
        issuer = x509.load_pem_x509_certificates(chain_pem.encode())[0]
    except (ValueError, IndexError):
        return UNKNOWN, None
    url = _ocsp_url(leaf)
    if not url:
        return UNKNOWN, None
    request = ocsp.OCSPRequestBuilder().add_certificate(leaf, issuer, hashes.SHA1()).build()
    try:
        answer = requests.post(url, data=request.public_bytes(serialization.Encoding.DER),
                               headers={"Content-Type": "application/ocsp-request"},
                               timeout=TIMEOUT_SECONDS, verify=ca_bundle or True)
        answer.raise_for_status()
        response = ocsp.load_der_ocsp_response(answer.content)
    except (requests.RequestException, ValueError) as exc:
        log.info("OCSP check failed", extra={"url": url, "error": str(exc)[:200]})
        return UNKNOWN, None
    if response.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL \
            or response.serial_number != leaf.serial_number or not _signed_by(response,
                                                                              issuer):
        return UNKNOWN, None
    if response.certificate_status == ocsp.OCSPCertStatus.REVOKED:
        return REVOKED, response.revocation_time_utc
    if response.certificate_status == ocsp.OCSPCertStatus.GOOD:
        return GOOD, None
    return UNKNOWN, None


def _renew_now(db: Database[Doc], cert: Doc, revoked_at: datetime | None,
               actor: audit.Actor) -> str:
    from app.jobs import enqueue, publish_wakeup

    now = dbm.server_now(db)

    def save(session: ClientSession) -> str:
        job = enqueue(db, certificates.ISSUE_JOB_KIND,
                      {"certificate_id": cert["_id"], "reason": REASON},
                      dedupe_key=certificates.dedupe_key(cert["_id"]),
                      project_id=cert["project_id"], session=session, publish=False)
        certificates.store_schedule(db, session, cert["_id"], {
            "next_renewal_at": now, "renewal_source": "revoked",
            "revocation_check": {"status": REVOKED, "checked_at": now,
                                 "revoked_at": revoked_at, "serial": cert.get("serial")}})
        audit.record(db, session, actor=actor, action="certificate.revocation_detected",
                     target=f"certificate:{cert['_id']}", project_id=cert["project_id"],
                     details={"serial": cert.get("serial"), "job_id": str(job["_id"]),
                              "revoked_at": revoked_at.isoformat() if revoked_at else None})
        return str(job["_id"])

    job_id = dbm.transaction(db, save, what="renew a revoked certificate")
    publish_wakeup(job_id)
    return job_id


def check_all(db: Database[Doc], *, ca_bundle: str | None = None,
              fence: JobContext | None = None) -> Doc:
    """Check every live issued certificate; renew the revoked ones at once."""
    actor = audit.system_actor("worker")
    counts = {GOOD: 0, REVOKED: 0, UNKNOWN: 0}
    last_id = ""
    coll = dbm.primary(db)[dbm.CERTIFICATES]

    def next_page(after: str) -> list[Doc]:
        return list(coll.find(
            {"_id": {"$gt": after}, "deleted_at": None, "status": certificates.STATUS_ISSUED,
             "certificate_pem": {"$nin": [None, ""]}},
            {"_id": 1, "project_id": 1, "serial": 1, "certificate_pem": 1, "chain_pem": 1},
            sort=[("_id", 1)], limit=BATCH))

    while True:
        after = last_id
        page: list[Doc] = dbm.retry(lambda: next_page(after),  # noqa: B023 - called now
                                    what="read certificates to check")
        if not page:
            break
        for cert in page:
            if fence is not None:
                fence.check_lease()
            status, revoked_at = ocsp_status(cert["certificate_pem"],
                                             cert.get("chain_pem") or "",
                                             ca_bundle=ca_bundle)
            counts[status] += 1
            if status == REVOKED:
                job_id = _renew_now(db, cert, revoked_at, actor)
                log.warning("certificate revoked by its CA; renewing now", extra={
                    "certificate_id": cert["_id"], "serial": cert.get("serial"),
                    "job_id": job_id, "event": "certificate.revocation_detected"})
        last_id = page[-1]["_id"]
    return counts


def check_handler(ctx: JobContext) -> dict[str, Any] | None:
    """The ``certificates.revocation_check`` job (timed work)."""
    bundle = ctx.settings.acme_ca_bundle
    return check_all(ctx.db, ca_bundle=str(bundle) if bundle else None, fence=ctx)
