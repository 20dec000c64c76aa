"""Revoked behind our back, or an ARI window moved into the past: the daily check of
every current certificate.

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
counted as ``unknown`` in the job's result. The same check asks the CA's renewalInfo
(ARI, when the CA offers it and the certificate uses it) and renews at once a
certificate whose window has started while it is scheduled later
(``certificate.ari_window_passed``). (Let's Encrypt ended OCSP in 2025 and
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
from app.acme import ari
from app.acme.client import AcmeClient
from app.acme.errors import AcmeError
from app.config import Settings
from app.db import Doc
from app.domain import accounts, certificates
from app.jobs import JobContext

log = logging.getLogger(__name__)

JOB_KIND = "certificates.revocation_check"
REASON = "emergency"
BATCH = 200
TIMEOUT_SECONDS = 10.0
GOOD, REVOKED, UNKNOWN = "good", "revoked", "unknown"
ARI_PASSED = "ari_window_passed"


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


def ari_window_passed(cert: Doc, client: AcmeClient, now: datetime) -> bool:
    """The CA's renewalInfo window for the current certificate has started already while
    the certificate is scheduled later (the CA moved it, e.g. ahead of a revocation)."""
    renewal_policy = cert.get("renewal") or {}
    if not (cert.get("ari_cert_id") and renewal_policy.get("use_ari", True)):
        return False
    scheduled = cert.get("next_renewal_at")
    if scheduled is not None and scheduled <= now:
        return False  # due anyway: the scan enqueues it
    try:
        if not client.has_renewal_info():
            return False
        body, _ = client.renewal_info(cert["ari_cert_id"])
        window = ari.parse_renewal_info(body)
    except AcmeError as exc:
        log.info("renewalInfo unavailable", extra={"certificate_id": cert["_id"],
                                                   "error": str(exc)[:200]})
        return False
    return window.start <= now


def _renew_now(db: Database[Doc], cert: Doc, revoked_at: datetime | None,
               actor: audit.Actor, *, why: str = REVOKED) -> str:
    from app.jobs import enqueue, publish_wakeup

    now = dbm.server_now(db)

    def save(session: ClientSession) -> str:
        job = enqueue(db, certificates.ISSUE_JOB_KIND,
                      {"certificate_id": cert["_id"], "reason": REASON},
                      dedupe_key=certificates.dedupe_key(cert["_id"]),
                      project_id=cert["project_id"], session=session, publish=False)
        fields: Doc = {"next_renewal_at": now, "renewal_source": why}
        if why == REVOKED:
            fields["revocation_check"] = {"status": REVOKED, "checked_at": now,
                                          "revoked_at": revoked_at,
                                          "serial": cert.get("serial")}
        certificates.store_schedule(db, session, cert["_id"], fields)
        audit.record(db, session, actor=actor, action="certificate.revocation_detected"
                     if why == REVOKED else "certificate.ari_window_passed",
                     target=f"certificate:{cert['_id']}", project_id=cert["project_id"],
                     details={"serial": cert.get("serial"), "job_id": str(job["_id"]),
                              "revoked_at": revoked_at.isoformat() if revoked_at else None})
        return str(job["_id"])

    job_id = dbm.transaction(db, save, what="renew a revoked certificate")
    publish_wakeup(job_id)
    return job_id


def _ari_client(db: Database[Doc], cert: Doc, settings: Settings | None,
                clients: dict[str, AcmeClient | None]) -> AcmeClient | None:
    if settings is None or not cert.get("ari_cert_id") or not cert.get("account_id"):
        return None
    account_id = str(cert["account_id"])
    if account_id not in clients:
        try:
            clients[account_id] = accounts.client_for(
                db, accounts.get_account(db, account_id), settings)
        except Exception as exc:  # noqa: BLE001 - a missing account or key: skip ARI
            log.info("no ACME client for the ARI check", extra={
                "account_id": account_id, "error": str(exc)[:200]})
            clients[account_id] = None
    return clients[account_id]


def check_all(db: Database[Doc], *, ca_bundle: str | None = None,
              fence: JobContext | None = None, settings: Settings | None = None) -> Doc:
    """Check every live issued certificate; renew at once the revoked ones and (with
    ``settings``, to reach the CA) those whose ARI window has moved into the past."""
    actor = audit.system_actor("worker")
    counts = {GOOD: 0, REVOKED: 0, UNKNOWN: 0, ARI_PASSED: 0}
    clients: dict[str, AcmeClient | None] = {}
    last_id = ""
    coll = dbm.primary(db)[dbm.CERTIFICATES]

    def next_page(after: str) -> list[Doc]:
        return list(coll.find(
            {"_id": {"$gt": after}, "deleted_at": None, "status": certificates.STATUS_ISSUED,
             "certificate_pem": {"$nin": [None, ""]}},
            {"_id": 1, "project_id": 1, "serial": 1, "certificate_pem": 1, "chain_pem": 1,
             "account_id": 1, "ari_cert_id": 1, "renewal": 1, "next_renewal_at": 1},
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
                continue
            client = _ari_client(db, cert, settings, clients)
            if client is not None and ari_window_passed(cert, client, dbm.server_now(db)):
                counts[ARI_PASSED] += 1
                _renew_now(db, cert, None, actor, why=ARI_PASSED)
        last_id = page[-1]["_id"]
    return counts


def check_handler(ctx: JobContext) -> dict[str, Any] | None:
    """The ``certificates.revocation_check`` job (timed work)."""
    bundle = ctx.settings.acme_ca_bundle
    return check_all(ctx.db, ca_bundle=str(bundle) if bundle else None, fence=ctx,
                     settings=ctx.settings)
