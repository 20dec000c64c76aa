"""The one base class of CertAutoPilot's domain errors, and its HTTP mapping.

Every error a caller can act on derives from ``CertAutoPilotError``; each carries the
HTTP status and a stable code, so the API maps them in one place and the CLI prints
``str(exc)`` and exits non-zero.
"""

from __future__ import annotations

from typing import Any


class CertAutoPilotError(Exception):
    status: int = 400
    code: str = "bad_request"

    def __init__(self, message: str, *, errors: dict[str, Any] | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.errors = errors or {}
        self.retry_after = retry_after


class ValidationFailed(CertAutoPilotError):
    status, code = 422, "validation_failed"


class NotFound(CertAutoPilotError):
    status, code = 404, "not_found"


class Conflict(CertAutoPilotError):
    status, code = 409, "conflict"


class PreconditionFailed(CertAutoPilotError):
    status, code = 412, "precondition_failed"


class Forbidden(CertAutoPilotError):
    status, code = 403, "forbidden"


class Unauthorized(CertAutoPilotError):
    status, code = 401, "unauthorized"


class RateLimited(CertAutoPilotError):
    status, code = 429, "rate_limited"


class Unavailable(CertAutoPilotError):
    """A dependency (the database, the KEK) cannot be reached; retry later."""

    status, code = 503, "unavailable"


class DatabaseUnavailable(Unavailable):
    code = "database_unavailable"


class ConfigError(Exception):
    """A CAP_* variable holds a value the process cannot start with (raised while the
    settings are read, before anything runs: not an API error)."""

    def __init__(self, variable: str, value: object, expected: str) -> None:
        self.variable = variable
        self.value = value
        self.expected = expected
        super().__init__(f"{variable}={value!r} is invalid: expected {expected}")
