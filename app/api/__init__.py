"""The HTTP API: flask-smorest setup, the one error envelope, and the resource registry.

Each resource is a package ``app/api/<name>/`` with ``resources.py`` (a ``blp``
Blueprint, thin views) and ``schemas.py``. ``RESOURCES`` lists them; ``register_api``
registers each blueprint in a loop.
"""

from __future__ import annotations

import importlib
from typing import Any

from flask import Flask, Response, jsonify
from flask_smorest import Api
from werkzeug.exceptions import HTTPException

from app.errors import CertAutoPilotError

# Resource packages, registered in this order. Add new resources here.
RESOURCES: list[str] = [
    "app.api.health",
]


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
        response = error_response(status, _http_code(exc), str(message), errors)
        for key, value in (getattr(exc, "data", None) or {}).get("headers", {}).items():
            response.headers[key] = value
        return response

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        app.logger.exception("unhandled error")
        return error_response(500, "internal_error", "internal server error")


def register_api(app: Flask) -> Api:
    app.config.setdefault("API_TITLE", "CertAutoPilot")
    app.config.setdefault("API_VERSION", "v1")
    app.config.setdefault("OPENAPI_VERSION", "3.0.3")
    app.config.setdefault("OPENAPI_URL_PREFIX", "/")
    app.config.setdefault("OPENAPI_JSON_PATH", "openapi.json")
    app.config.setdefault("OPENAPI_SWAGGER_UI_PATH", "/docs")
    app.config.setdefault("OPENAPI_SWAGGER_UI_URL", "/docs/static/")
    api = Api(app)
    for module_name in RESOURCES:
        module = importlib.import_module(f"{module_name}.resources")
        api.register_blueprint(module.blp)
    register_error_handlers(app)
    return api
