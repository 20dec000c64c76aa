"""The HTTP API: flask-smorest setup, the one error envelope, and the resource registry.

Each resource is a package ``app/api/<name>/`` with ``resources.py`` (a ``blp``
Blueprint, thin views) and ``schemas.py``. ``RESOURCES`` lists them; ``register_api``
registers each blueprint in a loop.

Every request gets a request id (the caller's ``X-Request-ID`` when it is sane, else a
new one), put in ``app.logs.request_id_var`` (so logs and audit entries carry it) and
echoed in the ``X-Request-ID`` answer header (gunicorn's access log reads it there).
Resources live under ``/api/v1`` and need a bearer token (``app.api.auth``); the probes,
``/metrics``, ``/openapi.json`` and ``/docs`` do not.
"""

from __future__ import annotations

import importlib
import logging
import re
import time
import uuid
from typing import Any

from flask import Flask, Response, g, jsonify, request
from flask_smorest import Api
from pymongo.errors import ConnectionFailure, DuplicateKeyError, PyMongoError
from werkzeug.exceptions import HTTPException

from app.api.common import ErrorSchema
from app.errors import CertAutoPilotError

log = logging.getLogger(__name__)

# Resource packages, registered in this order. Add new resources here.
RESOURCES: list[str] = [
    "app.api.health",
    "app.api.metrics",
    "app.api.projects",
    "app.api.tokens",
    "app.api.certificates",
    "app.api.accounts",
    "app.api.orders",
    "app.api.jobs",
    "app.api.audit",
    "app.api.status",
    "app.api.renewals",
    "app.api.alerts",
]

REQUEST_ID_HEADER = "X-Request-ID"
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")
MAX_BODY_BYTES = 1024 * 1024


def error_body(status: int, code: str, message: str,
               errors: dict[str, Any] | None = None) -> dict[str, Any]:
    """The one error envelope of every API error."""
    return {"code": code, "status": status, "message": message, "errors": errors or {}}


def error_response(status: int, code: str, message: str,
                   errors: dict[str, Any] | None = None,
                   retry_after: float | None = None) -> Response:
    response = jsonify(error_body(status, code, message, errors))
    response.status_code = status
    if retry_after is not None:
        response.headers["Retry-After"] = str(max(1, int(retry_after)))
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="certautopilot"'
    return response


def _http_code(exc: HTTPException) -> str:
    return (exc.name or "error").lower().replace(" ", "_")


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(CertAutoPilotError)
    def _domain(exc: CertAutoPilotError) -> Response:
        return error_response(exc.status, exc.code, exc.message, exc.errors, exc.retry_after)

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException) -> Response:
        status = exc.code or 500
        errors: dict[str, Any] = {}
        data = getattr(exc, "data", None)  # webargs puts validation messages here
        if isinstance(data, dict) and "messages" in data:
            errors = data["messages"]
        message = exc.description or exc.name
        code = _http_code(exc)
        if status == 422:  # webargs' validation errors: the same code as the domain's
            code, message = "validation_failed", "invalid input: see errors"
        response = error_response(status, code, str(message), errors)
        for key, value in exc.get_headers():  # e.g. Allow on 405
            if key.lower() != "content-type":
                response.headers[key] = value
        for key, value in ((data if isinstance(data, dict) else {}).get("headers")
                           or {}).items():
            response.headers[key] = value
        return response

    @app.errorhandler(DuplicateKeyError)
    def _duplicate(exc: DuplicateKeyError) -> Response:
        return error_response(409, "conflict", "an object with the same unique key exists")

    @app.errorhandler(PyMongoError)
    def _database(exc: PyMongoError) -> Response:
        from app.db import is_transient

        if isinstance(exc, ConnectionFailure) or is_transient(exc):
            log.warning("database unavailable during a request",
                        extra={"error": f"{exc.__class__.__name__}"})
            return error_response(503, "database_unavailable",
                                  "the database is unavailable; retry later", retry_after=5)
        app.logger.exception("database error")
        return error_response(500, "internal_error", "internal server error")

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        app.logger.exception("unhandled error")
        return error_response(500, "internal_error", "internal server error")


def _start_request() -> None:
    from app.logs import request_id_var

    rid = request.headers.get(REQUEST_ID_HEADER, "")
    if not _REQUEST_ID_RE.match(rid):
        rid = uuid.uuid4().hex
    g.request_id = rid
    g.request_id_token = request_id_var.set(rid)
    g.started = time.perf_counter()


def _idempotency_begin() -> Response | None:
    if request.method != "POST" or g.get("principal") is None:
        return None
    from app.api import idempotency
    from app.api.common import current_db

    return idempotency.begin(current_db(), g.principal.token_id)


def _finish_request(response: Response) -> Response:
    from app.metrics import HTTP_REQUEST_DURATION, HTTP_REQUESTS

    if g.get("idempotency_id"):
        from app.api import idempotency
        from app.api.common import current_db

        try:
            idempotency.finish(current_db(), response)
        except Exception:  # noqa: BLE001 - the answer stands; the key expires by TTL
            log.exception("could not store the idempotent answer")
    rid = g.get("request_id")
    if rid:
        response.headers[REQUEST_ID_HEADER] = rid
    route = request.url_rule.rule if request.url_rule is not None else "unmatched"
    HTTP_REQUESTS.labels(request.method, route, str(response.status_code)).inc()
    started = g.get("started")
    if started is not None:
        HTTP_REQUEST_DURATION.labels(request.method, route).observe(
            time.perf_counter() - started)
    return response


def _end_request(exc: BaseException | None) -> None:
    from app.logs import request_id_var

    token = g.pop("request_id_token", None)
    if token is not None:
        try:
            request_id_var.reset(token)
        except ValueError:  # set in another context (should not happen); clear it
            request_id_var.set(None)


class CapApi(Api):
    """flask-smorest's Api documenting our error envelope."""

    ERROR_SCHEMA = ErrorSchema


def register_api(app: Flask) -> Api:
    app.config.setdefault("API_TITLE", "CertAutoPilot")
    app.config.setdefault("API_VERSION", "v1")
    app.config.setdefault("OPENAPI_VERSION", "3.0.3")
    app.config.setdefault("OPENAPI_URL_PREFIX", "/")
    app.config.setdefault("OPENAPI_JSON_PATH", "openapi.json")
    app.config.setdefault("OPENAPI_SWAGGER_UI_PATH", "/docs")
    app.config.setdefault("OPENAPI_SWAGGER_UI_URL", "/docs/static/")
    app.config.setdefault("MAX_CONTENT_LENGTH", MAX_BODY_BYTES)
    app.config.setdefault("API_SPEC_OPTIONS", {"info": {"description": API_DESCRIPTION}})
    from app.api.auth import init_auth
    from app.api.openapi import document_errors_and_security, register_components

    api = CapApi(app)
    register_components(api)
    app.before_request(_start_request)
    init_auth(app)
    app.before_request(_idempotency_begin)
    app.after_request(_finish_request)
    app.teardown_request(_end_request)
    for module_name in RESOURCES:
        module = importlib.import_module(f"{module_name}.resources")
        api.register_blueprint(module.blp)
    document_errors_and_security(api)
    register_error_handlers(app)
    return api


API_DESCRIPTION = """\
ACME certificates for many projects, kept renewed.

**Authentication**: `Authorization: Bearer cap_...`. A token belongs to one project and
carries scopes: `read` (GET), `write` (changes), `keys:export` (private-key export);
admin tokens (scope `admin`) belong to no project and may act on every project. Objects
of another project answer 404. The first admin token comes from
`certautopilot tokens create --admin`.

**Errors**: every error is `{code, status, message, errors}`; 429 and 503 carry
`Retry-After`.

**Retries**: every POST accepts `Idempotency-Key`; **lists** are cursor-paginated
(`limit`, `cursor` → `next_cursor`); certificate reads carry an `ETag`
(`If-None-Match` → 304, `If-Match` on changes → 412).
"""
