"""What can go wrong when talking ACME, decided from RFC 8555 problem types.

Every error carries its context as attributes (problem type, detail, identifier, the URL
that answered, ``retry_after``) and says what happened in ``str()``. Callers decide
whether to retry, reschedule or give up from ``AcmeProblem.code`` (the short ACME error
code, e.g. ``rateLimited``) through ``classify()``, never by matching message text.
"""

from __future__ import annotations

import enum
from typing import Any

from app.errors import CertAutoPilotError

ERROR_PREFIX = "urn:ietf:params:acme:error:"

# Problems that describe a failed validation of an identifier: the CA could not
# confirm control of a name. Retrying at once would fail again; back off.
VALIDATION_CODES = frozenset({
    "unauthorized", "incorrectResponse", "dns", "connection", "tls", "caa",
})
# Problems where the CA refuses the request as such (names, CSR, policy): retrying the
# same request will not help until the operator changes something.
REFUSED_CODES = frozenset({
    "rejectedIdentifier", "unsupportedIdentifier", "malformed", "badCSR",
    "badSignatureAlgorithm", "badPublicKey", "badRevocationReason", "compound",
    "externalAccountRequired", "userActionRequired", "unsupportedContact",
    "invalidContact", "invalidProfile", "alreadyRevoked", "alreadyReplaced",
})


class Decision(enum.Enum):
    """What a caller should do about a problem."""

    RETRY_NOW = "retry_now"              # badNonce: resend at once with a fresh nonce
    RETRY_AFTER = "retry_after"          # rateLimited / Retry-After: reschedule then
    RECORD_AND_BACK_OFF = "back_off"     # validation failed or request refused
    ACCOUNT_MISSING = "account_missing"  # the account URL is unknown to the CA
    ORDER_NOT_READY = "order_not_ready"  # finalize raced the CA: poll the order again
    TRANSIENT = "transient"              # server trouble: retry with the job's backoff


class AcmeError(CertAutoPilotError):
    """Base class of errors talking to an ACME CA."""

    status, code = 502, "acme_error"


class AcmeProblem(AcmeError):
    """The CA answered with an RFC 7807 problem document."""

    def __init__(self, problem_type: str, detail: str | None = None, *,
                 http_status: int | None = None, url: str | None = None,
                 identifier: str | None = None, retry_after: float | None = None,
                 subproblems: list[dict[str, Any]] | None = None) -> None:
        self.problem_type = problem_type or "about:blank"
        self.detail = detail or ""
        self.http_status = http_status
        self.url = url
        self.identifier = identifier
        self.subproblems = subproblems or []
        text = f"ACME problem {self.problem_type}"
        if identifier:
            text += f" for {identifier}"
        if self.detail:
            text += f": {self.detail}"
        if http_status:
            text += f" (HTTP {http_status})"
        super().__init__(text, retry_after=retry_after)
        self.code = "acme_" + (self.problem_code or "problem")

    @property
    def problem_code(self) -> str | None:
        """The short ACME error code (``badNonce``, ``rateLimited``, ...), if standard."""
        if self.problem_type.startswith(ERROR_PREFIX):
            return self.problem_type[len(ERROR_PREFIX):]
        return None

    def as_doc(self) -> dict[str, Any]:
        """The problem as stored on a certificate or order (no secrets in it)."""
        doc: dict[str, Any] = {"type": self.problem_type, "detail": self.detail[:2000]}
        if self.http_status:
            doc["status"] = self.http_status
        if self.identifier:
            doc["identifier"] = self.identifier
        if self.subproblems:
            doc["subproblems"] = self.subproblems[:20]
        return doc

    @classmethod
    def from_json(cls, jobj: dict[str, Any], *, http_status: int | None = None,
                  url: str | None = None, retry_after: float | None = None) -> AcmeProblem:
        identifier = jobj.get("identifier")
        subproblems = []
        for sub in jobj.get("subproblems") or []:
            if isinstance(sub, dict):
                entry = {"type": str(sub.get("type", "")), "detail": str(sub.get("detail", ""))}
                if isinstance(sub.get("identifier"), dict):
                    entry["identifier"] = str(sub["identifier"].get("value", ""))
                subproblems.append(entry)
        return cls(
            str(jobj.get("type") or "about:blank"), str(jobj.get("detail") or ""),
            http_status=http_status or (int(jobj["status"]) if isinstance(
                jobj.get("status"), int) else None),
            url=url,
            identifier=str(identifier.get("value")) if isinstance(identifier, dict) else None,
            retry_after=retry_after, subproblems=subproblems)


class AcmeTimeout(AcmeError):
    """The CA did not reach the awaited state within the deadline."""

    code = "acme_timeout"

    def __init__(self, what: str, url: str | None = None) -> None:
        self.url = url
        super().__init__(f"timed out waiting for {what}" + (f" at {url}" if url else ""))


class AcmeProtocolError(AcmeError):
    """The CA's answer did not follow RFC 8555 (missing Location, unexpected state...)."""

    code = "acme_protocol_error"


class AcmeNetworkError(AcmeError):
    """No answer from the CA (connection refused, TLS failure, timeout)."""

    code = "acme_unreachable"


class ChallengeFailed(AcmeProblem):
    """An authorization became invalid: the CA could not validate an identifier."""


class OrderFailed(AcmeProblem):
    """The order became invalid at the CA (after finalize, or refused)."""


def classify(exc: BaseException) -> Decision:
    """Decide what to do about an error from its ACME problem type."""
    if isinstance(exc, (ChallengeFailed, OrderFailed)):
        return Decision.RECORD_AND_BACK_OFF
    if isinstance(exc, AcmeProblem):
        code = exc.problem_code
        if code == "badNonce":
            return Decision.RETRY_NOW
        if code == "rateLimited":
            return Decision.RETRY_AFTER
        if code == "accountDoesNotExist":
            return Decision.ACCOUNT_MISSING
        if code == "orderNotReady":
            return Decision.ORDER_NOT_READY
        if code in VALIDATION_CODES or code in REFUSED_CODES:
            return Decision.RECORD_AND_BACK_OFF
        if exc.retry_after is not None:
            return Decision.RETRY_AFTER
        return Decision.TRANSIENT
    return Decision.TRANSIENT
