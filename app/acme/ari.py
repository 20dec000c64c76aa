"""ACME Renewal Information (RFC 9773), the protocol part: the CA's suggested window.

``cert_id()`` builds the certificate's ARI identifier (also sent as ``replaces`` on the
renewal's newOrder); ``parse_renewal_info()`` reads a ``renewalInfo`` answer (fetched by
``AcmeClient.renewal_info``). What to do with the window is renewal policy:
``app.domain.renewal``.
"""

from __future__ import annotations

import base64
import datetime as dt
from dataclasses import dataclass
from typing import Any

from cryptography import x509

from app.acme.errors import AcmeProtocolError


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def cert_id(cert: x509.Certificate) -> str:
    """``base64url(AKI keyIdentifier) "." base64url(DER serial)`` (RFC 9773 section 4.1)."""
    try:
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    except x509.ExtensionNotFound:
        raise AcmeProtocolError("certificate has no Authority Key Identifier: no ARI "
                                "CertID") from None
    if aki.key_identifier is None:
        raise AcmeProtocolError("Authority Key Identifier has no keyIdentifier")
    serial = cert.serial_number
    length = (serial.bit_length() + 8) // 8  # room for the sign bit, as DER does
    return f"{_b64url(aki.key_identifier)}.{_b64url(serial.to_bytes(length, 'big'))}"


def cert_id_from_pem(pem: bytes | str) -> str:
    data = pem.encode() if isinstance(pem, str) else pem
    return cert_id(x509.load_pem_x509_certificate(data))


@dataclass(frozen=True)
class RenewalWindow:
    start: dt.datetime
    end: dt.datetime
    explanation_url: str | None = None


def parse_time(value: object, field: str) -> dt.datetime:
    """An RFC 3339 time of a renewalInfo (or order) field, in UTC."""
    if not isinstance(value, str):
        raise AcmeProtocolError(f"renewalInfo suggestedWindow.{field} is missing")
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    # RFC 3339 allows more fractional digits than Python reads: keep microseconds.
    if "." in text:
        head, _, tail = text.partition(".")
        digits = ""
        while tail and tail[0].isdigit():
            digits, tail = digits + tail[0], tail[1:]
        text = f"{head}.{(digits + '000000')[:6]}{tail}"
    try:
        parsed = dt.datetime.fromisoformat(text)
    except ValueError:
        raise AcmeProtocolError(f"renewalInfo suggestedWindow.{field} is not an RFC 3339 "
                                f"time: {value!r}") from None
    if parsed.tzinfo is None:
        raise AcmeProtocolError(f"renewalInfo suggestedWindow.{field} has no time zone")
    return parsed.astimezone(dt.UTC)


def parse_renewal_info(body: dict[str, Any]) -> RenewalWindow:
    window = body.get("suggestedWindow")
    if not isinstance(window, dict):
        raise AcmeProtocolError("renewalInfo has no suggestedWindow")
    start = parse_time(window.get("start"), "start")
    end = parse_time(window.get("end"), "end")
    if end < start:
        raise AcmeProtocolError("renewalInfo suggestedWindow ends before it starts")
    explanation = body.get("explanationURL")
    return RenewalWindow(start, end, str(explanation) if isinstance(explanation, str) else None)
