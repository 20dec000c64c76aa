"""Completes the generated OpenAPI document: the bearer security scheme, one response
component per error status (all the same envelope), and on every operation the errors
it can answer, plus the ``Idempotency-Key`` header on every POST."""

from __future__ import annotations

from typing import Any

from flask_smorest import Api

from app.api.auth import SECURITY_SCHEME
from app.api.common import API_PREFIX, ErrorSchema
from app.api.idempotency import HEADER_PARAM

_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying",
                                "schema": {"type": "integer"}}}

ERRORS: dict[int, tuple[str, str, dict[str, Any] | None]] = {
    400: ("BadRequest", "Malformed request (bad JSON, header or cursor)", None),
    401: ("Unauthorized", "Missing, invalid, revoked or expired bearer token", None),
    403: ("Forbidden", "The token lacks the scope this operation needs", None),
    404: ("NotFound", "No such object in the token's project", None),
    409: ("Conflict", "Conflicts with the current state (or the same Idempotency-Key is "
                      "still running)", _RETRY_AFTER),
    412: ("PreconditionFailed", "If-Match does not match the current ETag", None),
    422: ("UnprocessableEntity", "Invalid input (details in errors), or an "
                                 "Idempotency-Key reused with another request", None),
    429: ("TooManyRequests", "The token exceeded its request rate", _RETRY_AFTER),
    502: ("BadGateway", "The ACME CA refused the request or could not be reached", None),
    503: ("ServiceUnavailable", "The database or the KEK is unavailable; retry later",
          _RETRY_AFTER),
}


def _error_component(description: str, headers: dict[str, Any] | None) -> dict[str, Any]:
    component: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }
    if headers:
        component["headers"] = headers
    return component


def _errors_for(path: str, method: str, operation: dict[str, Any]) -> list[int]:
    codes = [400, 503]
    if path.startswith(API_PREFIX):
        codes += [401, 403, 404, 422, 429]
        if method in ("post", "put", "patch", "delete"):
            codes.append(409)
    params = [p.get("name") for p in operation.get("parameters", []) if isinstance(p, dict)]
    if "If-Match" in params:
        codes.append(412)
    return sorted(set(codes))


def _merge_schema_meta_extras(api: Api) -> None:
    """A schema's ``Meta.openapi_extra`` (JSON Schema keywords marshmallow cannot say,
    e.g. a ``not`` over two fields) is merged into its component, so the document states
    every rule the server enforces."""
    converter = api.ma_plugin.converter
    original = converter.schema2jsonschema

    def schema2jsonschema(schema: Any) -> dict[str, Any]:
        jsonschema: dict[str, Any] = original(schema)
        extra = getattr(getattr(schema, "Meta", None), "openapi_extra", None)
        if extra:
            jsonschema.update(extra)
        return jsonschema

    converter.schema2jsonschema = schema2jsonschema


def register_components(api: Api) -> None:
    """Before the blueprints: the components their docs may refer to."""
    _merge_schema_meta_extras(api)
    spec = api.spec
    spec.components.security_scheme("bearerAuth", SECURITY_SCHEME)
    if "Error" not in spec.components.schemas:
        spec.components.schema("Error", schema=ErrorSchema)
    for name, description, headers in ERRORS.values():
        if name not in spec.components.responses:
            spec.components.response(name, _error_component(description, headers))


def document_errors_and_security(api: Api) -> None:
    """After the blueprints: every operation lists the errors it can answer."""
    spec = api.spec
    for path, operations in spec._paths.items():  # noqa: SLF001 - apispec keeps them here
        for method, operation in operations.items():
            if method not in ("get", "post", "put", "patch", "delete"):
                continue
            responses = operation.setdefault("responses", {})
            for status in _errors_for(path, method, operation):
                responses.setdefault(str(status),
                                     {"$ref": f"#/components/responses/{ERRORS[status][0]}"})
            if method == "post" and path.startswith(API_PREFIX):
                parameters = operation.setdefault("parameters", [])
                if not any(isinstance(p, dict) and p.get("name") == HEADER_PARAM["name"]
                           for p in parameters):
                    parameters.append(dict(HEADER_PARAM))
