"""Certificates: the views are thin; the work is in ``app.domain.certificates``.

Reads carry an ``ETag`` (a hash of the representation): ``If-None-Match`` answers 304,
``If-Match`` on a change answers 412 when the certificate changed since it was read.
The private key is exported only with the ``keys:export`` scope, is audited, and its
answer is never cached.
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Response
from flask.views import MethodView

from app import db as dbm
from app.api import idempotency
from app.api.auth import KEYS_EXPORT, READ, WRITE, scope
from app.api.certificates.schemas import (
    CertificateCreateSchema,
    CertificateListArgsSchema,
    CertificatePageSchema,
    CertificateSchema,
    CertificateUpdateSchema,
    IssueAcceptedSchema,
    RevokeSchema,
)
from app.api.common import (
    API_PREFIX,
    ETAG_HEADER,
    IF_MATCH_PARAM,
    IF_NONE_MATCH_PARAM,
    Blueprint,
    check_if_match,
    current_db,
    ensure_visible,
    etag_of,
    not_modified,
    principal,
    project_scope,
    required_project,
    windowed_paginate,
)
from app.domain import certificates, drift, revocation
from app.errors import Conflict, NotFound, ValidationFailed

log = logging.getLogger(__name__)

blp = Blueprint("certificates", __name__, url_prefix=f"{API_PREFIX}/certificates",
                description="Managed certificates: spec, issuance, renewal, revocation, "
                            "downloads.")

PEM_CHAIN = "application/pem-certificate-chain"
# A list shows no PEM (the downloads do): leaving the chains in the database saves
# reading and decoding ~4 kB per certificate listed.
LIST_PROJECTION = {"certificate_pem": 0, "chain_pem": 0, "fullchain_pem": 0}
_SCHEMA = CertificateSchema()


def _load(certificate_id: str) -> dict[str, Any]:
    """The certificate if the caller's project owns it (admins: any), else 404.

    The same answer as ``certificates.get_certificate(..., project_id=...)``, read by
    ``_id`` alone (the cheapest lookup; the hot path of the API) from the primary."""
    if len(certificate_id) > 100:
        raise NotFound("certificate not found")
    db = dbm.primary(current_db())
    doc = dbm.retry(lambda: db[dbm.CERTIFICATES].find_one({"_id": certificate_id}),
                    what="read certificate")
    if doc is None or doc.get("deleted_at") is not None:
        doc = None
    return _with_endpoints(ensure_visible(doc, "certificate", certificate_id))


def _with_endpoints(doc: dict[str, Any]) -> dict[str, Any]:
    """The certificate with what each of its endpoints served at its last scan."""
    if doc.get("endpoints"):
        doc["endpoint_status"] = drift.endpoint_status(current_db(), doc)
    return doc


def _etag(doc: dict[str, Any]) -> str:
    return etag_of(_SCHEMA.dump(doc))


@blp.route("")
class Certificates(MethodView):
    @scope(READ)
    @blp.arguments(CertificateListArgsSchema, location="query")
    @blp.response(200, CertificatePageSchema)
    def get(self, args: dict[str, Any]) -> dict[str, Any]:
        """List certificates, filtered by status, name or expiry (with expiring_before:
        soonest expiry first; otherwise in creation order)."""
        project_id = project_scope(args.get("project_id"))
        query: dict[str, Any] = {"deleted_at": None}
        if project_id is not None:
            query["project_id"] = project_id
        if args.get("status"):
            query["status"] = args["status"]
        if args.get("name"):  # on the (project_id, names) index
            query["names"] = args["name"].lower().rstrip(".")
        keys = ("created_at", "_id")
        if args.get("expiring_before"):
            # Soonest expiry first: the page is a range of the (.., not_after, _id)
            # index instead of a sort of every certificate expiring before the date.
            query["not_after"] = {"$lt": args["expiring_before"]}
            keys = ("not_after", "_id")
        # Bounded ranges of the date key: on the embedded server a page then costs its
        # own documents, not every certificate the filter matches.
        return windowed_paginate(current_db()[dbm.CERTIFICATES], query,
                                 limit=args["limit"], cursor=args["cursor"], keys=keys,
                                 projection=LIST_PROJECTION)

    @scope(WRITE)
    @blp.arguments(CertificateCreateSchema)
    @blp.response(201, CertificateSchema, headers=ETAG_HEADER)
    def post(self, data: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
        """Create a managed certificate and enqueue its first issuance."""
        project_id = required_project(data.pop("project_id", None))
        issue = data.pop("issue", True)
        caller = principal()
        db = current_db()
        _merge_endpoints(data)
        key = idempotency.current_key()
        retaken = idempotency.retaken_key()
        if retaken is not None:
            # The first request with this key died after its commit, maybe: answer with
            # what it created. Its first issuance was enqueued then, or the renewal scan
            # enqueues it (the certificate is due at creation); a second would order twice.
            made = certificates.made_under(db, project_id, data, retaken)
            if made is not None:
                made = _with_endpoints(made)
                return made, {"ETag": _etag(made)}
        try:
            doc = certificates.create_certificate(db, project_id, data, caller.actor,
                                                  request_key=key)
        except ValidationFailed as exc:
            # The schema states every rule on the request itself; what is left depends
            # on the project's accounts.
            if exc.errors and set(exc.errors) <= STATE_FIELDS:
                raise Conflict(exc.message, errors=exc.errors) from None
            raise
        if issue:
            try:
                certificates.request_issuance(db, doc["_id"], caller.actor, "initial",
                                              project_id=project_id)
            except Exception:  # noqa: BLE001 - the renewal scan enqueues it within a minute
                log.exception("could not enqueue the first issuance; the scan will",
                              extra={"certificate_id": doc["_id"]})
        doc = _with_endpoints(doc)
        return doc, {"ETag": _etag(doc)}


# Rules on a spec that depend on stored state (the project's accounts), not the request.
STATE_FIELDS = {"account_id", "ca_fallback"}


def _merge_endpoints(data: dict[str, Any]) -> None:
    """The same endpoint twice (host, port, SNI and STARTTLS, case aside) is one: no
    schema can say that two objects are the same endpoint, so the API merges them."""
    if not data.get("endpoints"):
        return
    seen: dict[str, Any] = {}
    for item in data["endpoints"]:
        seen.setdefault(drift.parse_endpoint(item).key, item)
    data["endpoints"] = list(seen.values())


@blp.route("/<string:certificate_id>")
class CertificateById(MethodView):
    @scope(READ)
    @blp.doc(parameters=[IF_NONE_MATCH_PARAM])
    @blp.response(200, CertificateSchema, headers=ETAG_HEADER)
    @blp.alt_response(304, description="Not modified (If-None-Match matched the ETag)")
    def get(self, certificate_id: str) -> Any:
        """Read a certificate (with its ETag)."""
        doc = _load(certificate_id)
        etag = _etag(doc)
        return not_modified(etag) or (doc, {"ETag": etag})

    @scope(WRITE)
    @blp.doc(parameters=[IF_MATCH_PARAM])
    @blp.arguments(CertificateUpdateSchema)
    @blp.response(200, CertificateSchema, headers=ETAG_HEADER)
    def patch(self, data: dict[str, Any],
              certificate_id: str) -> tuple[dict[str, Any], dict[str, str]]:
        """Change a certificate's spec (a change of names, key, challenge, account or
        profile re-issues it)."""
        current = _load(certificate_id)
        check_if_match(_etag(current))
        if not data:  # a merge patch that changes nothing (RFC 7396): no write, no audit
            return current, {"ETag": _etag(current)}
        _merge_endpoints(data)
        try:
            doc = certificates.update_certificate(
                current_db(), certificate_id, data, principal().actor,
                project_id=current["project_id"], expected_version=current.get("version"))
        except ValidationFailed as exc:
            # The change is valid by itself (the schema's rules); it does not suit the
            # stored spec (e.g. a wildcard name for an http-01 certificate) or the
            # project's accounts.
            raise Conflict("the change does not suit the certificate's stored spec: "
                           + exc.message, errors=exc.errors) from None
        doc = _with_endpoints(doc)
        return doc, {"ETag": _etag(doc)}

    @scope(WRITE)
    @blp.doc(parameters=[IF_MATCH_PARAM])
    @blp.response(204)
    def delete(self, certificate_id: str) -> None:
        """Stop managing a certificate (its orders and audit trail stay)."""
        current = _load(certificate_id)
        check_if_match(_etag(current))
        certificates.delete_certificate(current_db(), certificate_id, principal().actor,
                                        project_id=current["project_id"])


def _request(certificate_id: str, reason: str) -> tuple[dict[str, Any], int]:
    current = _load(certificate_id)
    check_if_match(_etag(current))
    if current.get("status") == certificates.STATUS_REVOKED and reason == "renew_now":
        raise Conflict("a revoked certificate is not renewed; use issue to get a new one")
    retaken = idempotency.retaken_key()
    made = None if retaken is None else certificates.job_made_under(
        current_db(), certificate_id, retaken)
    job = made or certificates.request_issuance(
        current_db(), certificate_id, principal().actor, reason,
        project_id=current["project_id"], request_key=idempotency.current_key())
    return {"certificate_id": certificate_id, "job": job}, 202


@blp.route("/<string:certificate_id>/issue")
class IssueNow(MethodView):
    @scope(WRITE)
    @blp.doc(parameters=[IF_MATCH_PARAM])
    @blp.response(202, IssueAcceptedSchema)
    def post(self, certificate_id: str) -> tuple[dict[str, Any], int]:
        """Issue now: enqueue an issuance job (or return the one already active)."""
        return _request(certificate_id, "manual")


@blp.route("/<string:certificate_id>/renew")
class RenewNow(MethodView):
    @scope(WRITE)
    @blp.doc(parameters=[IF_MATCH_PARAM])
    @blp.response(202, IssueAcceptedSchema)
    def post(self, certificate_id: str) -> tuple[dict[str, Any], int]:
        """Renew now: enqueue a renewal job (or return the one already active); the
        CA's ARI window does not postpone it (it applies to scheduled renewals only)."""
        return _request(certificate_id, "renew_now")


@blp.route("/<string:certificate_id>/revoke")
class Revoke(MethodView):
    @scope(WRITE)
    @blp.doc(parameters=[IF_MATCH_PARAM])
    @blp.arguments(RevokeSchema)
    @blp.response(200, CertificateSchema, headers=ETAG_HEADER)
    @blp.alt_response(502, response="BadGateway")
    def post(self, data: dict[str, Any],
             certificate_id: str) -> tuple[dict[str, Any], dict[str, str]]:
        """Revoke the issued certificate at its CA (renewals stop)."""
        current = _load(certificate_id)
        check_if_match(_etag(current))
        doc = revocation.revoke_certificate(current_db(), certificate_id, principal().actor,
                                              data["reason_code"],
                                              project_id=current["project_id"])
        doc = _with_endpoints(doc)
        return doc, {"ETag": _etag(doc)}


def _pem_view(part: str, field: str, summary: str) -> type[MethodView]:
    class PemDownload(MethodView):
        @scope(READ)
        @blp.doc(parameters=[IF_NONE_MATCH_PARAM], summary=summary)
        @blp.response(200, content_type=PEM_CHAIN, headers=ETAG_HEADER,
                      description="PEM (RFC 8555 application/pem-certificate-chain)")
        @blp.alt_response(304, description="Not modified")
        def get(self, certificate_id: str) -> Response:
            doc = _load(certificate_id)
            pem = doc.get(field)
            if not pem:
                raise Conflict(f"certificate {certificate_id} has no {part} yet (not issued)")
            etag = etag_of(pem)
            cached = not_modified(etag)
            if cached is not None:
                return cached
            response = Response(pem, mimetype=PEM_CHAIN)
            response.headers["ETag"] = etag
            response.headers["Content-Disposition"] = (
                f'attachment; filename="{certificate_id}-{part}.pem"')
            return response

    PemDownload.__name__ = f"Pem{part.title()}"
    return PemDownload


for _part, _field, _summary in (
        ("leaf", "certificate_pem", "Download the leaf certificate (PEM)."),
        ("chain", "chain_pem", "Download the issuer chain without the leaf (PEM)."),
        ("fullchain", "fullchain_pem", "Download the leaf followed by its chain (PEM).")):
    blp.route(f"/<string:certificate_id>/{_part}.pem", endpoint=f"pem_{_part}")(
        _pem_view(_part, _field, _summary))


@blp.route("/<string:certificate_id>/private-key")
class PrivateKey(MethodView):
    @scope(KEYS_EXPORT)
    @blp.response(200, content_type="application/x-pem-file",
                  headers={"Cache-Control": {"schema": {"type": "string"},
                                             "description": "Always no-store"}},
                  description="The private key, PKCS#8 PEM. Audited; never cached.")
    def get(self, certificate_id: str) -> Response:
        """Export the certificate's private key (scope keys:export; audited)."""
        doc = _load(certificate_id)
        pem = certificates.export_private_key(current_db(), certificate_id, principal().actor,
                                              project_id=doc["project_id"])
        response = Response(pem, mimetype="application/x-pem-file")
        response.headers["Cache-Control"] = "no-store, max-age=0"
        response.headers["Pragma"] = "no-cache"
        response.headers["Content-Disposition"] = (
            f'attachment; filename="{certificate_id}-key.pem"')
        return response
