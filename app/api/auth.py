"""Bearer-token authentication, scopes, and the per-token rate limit.

Every view under ``/api/v1`` declares the scope it needs with ``@scope(...)``. Before
the view runs (and before its body is parsed), ``authorize_request`` checks, in order:
a valid token (else 401), the scope (else 403), and the token's request rate (else 429).
A view without a declared scope is refused with 500 and caught by the route test, so a
new route cannot be left open by mistake. Objects of another project are answered with
404 by the views (``common.ensure_visible``), never 403.
"""

from __future__ import annotations

from collections.abc import Callable
from copy import deepcopy
from typing import Any, TypeVar

from flask import Flask, current_app, g, request

from app.api.common import API_PREFIX
from app.api.ratelimit import RateLimiter
from app.domain.tokens import ADMIN, KEYS_EXPORT, READ, SCOPES, WRITE, authenticate
from app.errors import Forbidden

F = TypeVar("F", bound=Callable[..., Any])

SECURITY_SCHEME = {"type": "http", "scheme": "bearer", "bearerFormat": "cap_<43 chars>",
                   "description": "An API token (`certautopilot tokens create`)."}

__all__ = ["ADMIN", "KEYS_EXPORT", "READ", "WRITE", "scope", "required_scope"]


def scope(name: str) -> Callable[[F], F]:
    """Declare the scope a view needs (read, write, keys:export or admin)."""
    if name not in SCOPES:
        raise ValueError(f"unknown scope {name!r}")

    def decorator(fn: F) -> F:
        fn._cap_scope = name  # type: ignore[attr-defined]
        apidoc = deepcopy(getattr(fn, "_apidoc", {}))
        manual = apidoc.setdefault("manual_doc", {})
        manual["security"] = [{"bearerAuth": []}]
        manual.setdefault("x-scope", name)
        fn._apidoc = apidoc  # type: ignore[attr-defined]
        return fn

    return decorator


def _view_function() -> Any:
    view = current_app.view_functions.get(request.endpoint or "")
    view_class = getattr(view, "view_class", None)
    if view_class is not None:
        method = request.method.lower()
        if method == "head":
            method = "get"
        return getattr(view_class, method, None)
    return view


def required_scope() -> str | None:
    return getattr(_view_function(), "_cap_scope", None)


def is_api_request() -> bool:
    return request.path == API_PREFIX or request.path.startswith(API_PREFIX + "/")


def authorize_request() -> None:
    """before_request: 401 / 403 / 429 for API routes; probes and /metrics are open."""
    if not is_api_request() or request.url_rule is None or request.method == "OPTIONS":
        return  # unknown routes fall through to 404/405
    needed = required_scope()
    if needed is None:
        raise RuntimeError(f"route {request.url_rule.rule} {request.method} declares no "
                           "scope")
    from app.api.common import current_db

    header = request.headers.get("Authorization", "")
    kind, _, presented = header.partition(" ")
    token = presented.strip() if kind.lower() == "bearer" else None
    db = current_db()
    caller = authenticate(db, token)
    g.principal = caller
    if not caller.has(needed):
        raise Forbidden(f"this token lacks the {needed!r} scope",
                        errors={"required_scope": needed})
    limiter: RateLimiter = current_app.extensions["cap_rate_limiter"]
    limiter.check(db, caller.token_id)


def init_auth(app: Flask) -> None:
    settings = app.extensions["cap_settings"]
    app.extensions["cap_rate_limiter"] = RateLimiter(settings.api_rate_limit,
                                                     settings.api_rate_window_seconds)
    app.before_request(authorize_request)
