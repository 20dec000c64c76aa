"""Certificate names: validation and normalisation before anything reaches a CA.

A name is a DNS name (IDNA 2008; Unicode names are converted to A-labels), a wildcard
``*.<name>`` (only when the challenge type can validate wildcards: dns-01), or an IP
literal (only when the challenge type can validate IPs: http-01, RFC 8738). Anything
else is refused with a message naming the offending value.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

import idna

from app.errors import ValidationFailed

MAX_NAMES = 100
MAX_NAME_LENGTH = 253
MAX_LABEL_LENGTH = 63

_LDH = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")

# What each challenge type can prove (RFC 8555 section 8, RFC 8738).
CHALLENGE_ALLOWS_WILDCARD = {"http-01": False, "dns-01": True, "tls-alpn-01": False}
CHALLENGE_ALLOWS_IP = {"http-01": True, "dns-01": False, "tls-alpn-01": False}


@dataclass(frozen=True)
class Identifier:
    type: str  # "dns" or "ip"
    value: str

    def as_doc(self) -> dict[str, str]:
        return {"type": self.type, "value": self.value}


class InvalidName(ValidationFailed):
    def __init__(self, name: object, reason: str) -> None:
        self.name = name
        shown = repr(name) if not isinstance(name, str) else repr(name[:300])
        super().__init__(f"invalid name {shown}: {reason}",
                         errors={"names": [f"{shown}: {reason}"]})


def _ip(value: str) -> str | None:
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        return None
    return address.compressed


def _dns_name(raw: str, original: str) -> str:
    if raw.endswith("."):
        raw = raw[:-1]  # an absolute name: same identifier
    if not raw:
        raise InvalidName(original, "empty name")
    labels = raw.split(".")
    if any(not label for label in labels):
        raise InvalidName(original, "empty label (two dots in a row, or a leading dot)")
    ascii_labels = []
    for label in labels:
        if len(label) > MAX_LABEL_LENGTH and label.isascii():
            raise InvalidName(original, f"label {label[:20]!r}... is longer than "
                                        f"{MAX_LABEL_LENGTH} characters")
        if label.isascii():
            lowered = label.lower()
            if lowered.startswith("xn--"):
                try:
                    idna.decode(lowered)
                except (idna.IDNAError, UnicodeError, ValueError) as exc:
                    raise InvalidName(original, f"label {label!r} is not valid IDNA "
                                                f"({exc})") from None
            elif len(lowered) >= 4 and lowered[2:4] == "--":
                raise InvalidName(original, f"label {label!r} has '--' in positions 3-4 "
                                            "(reserved for IDNA)")
            ascii_label = lowered
        else:
            try:
                ascii_label = idna.encode(label, uts46=True).decode("ascii")
            except (idna.IDNAError, UnicodeError, ValueError) as exc:
                raise InvalidName(original, f"label {label!r} is not valid IDNA "
                                            f"({exc})") from None
        if len(ascii_label) > MAX_LABEL_LENGTH:
            raise InvalidName(original, f"label {label[:20]!r} is longer than "
                                        f"{MAX_LABEL_LENGTH} characters")
        if not _LDH.match(ascii_label):
            raise InvalidName(original, f"label {label!r} may hold only letters, digits and "
                                        "inner hyphens")
        ascii_labels.append(ascii_label)
    name = ".".join(ascii_labels)
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidName(original, f"longer than {MAX_NAME_LENGTH} characters")
    if len(ascii_labels) < 2:
        raise InvalidName(original, "a certificate name needs at least two labels")
    if ascii_labels[-1].isdigit():
        raise InvalidName(original, "the top-level label cannot be all digits")
    return name


def normalize_name(name: object, *, allow_wildcard: bool, allow_ip: bool) -> Identifier:
    """One name → an ACME identifier, or ``InvalidName``."""
    if not isinstance(name, str):
        raise InvalidName(name, "must be a string")
    raw = name.strip()
    if raw != name or not raw:
        raise InvalidName(name, "empty, or surrounded by spaces")
    if len(raw) > 2 * MAX_NAME_LENGTH:
        raise InvalidName(name, f"longer than {MAX_NAME_LENGTH} characters")
    if any(ch.isspace() or ord(ch) < 0x20 for ch in raw):
        raise InvalidName(name, "contains white space or control characters")
    candidate = raw[1:-1] if raw.startswith("[") and raw.endswith("]") else raw
    ip = _ip(candidate)
    if ip is not None:
        if not allow_ip:
            raise InvalidName(name, "IP addresses are not allowed with this challenge type")
        return Identifier("ip", ip)
    if "*" in raw:
        if not raw.startswith("*.") or "*" in raw[2:]:
            raise InvalidName(name, "a wildcard may only be the whole leftmost label ('*.')")
        if not allow_wildcard:
            raise InvalidName(name, "wildcards need the dns-01 challenge")
        return Identifier("dns", "*." + _dns_name(raw[2:], name))
    return Identifier("dns", _dns_name(raw, name))


def normalize_names(names: object, challenge_type: str) -> list[Identifier]:
    """Validate a list of names for ``challenge_type``; duplicates are merged, order kept."""
    if not isinstance(names, (list, tuple)) or not names:
        raise ValidationFailed("names must be a non-empty list of DNS names",
                               errors={"names": ["a non-empty list is required"]})
    if len(names) > MAX_NAMES:
        raise ValidationFailed(f"at most {MAX_NAMES} names per certificate",
                               errors={"names": [f"{len(names)} given, {MAX_NAMES} allowed"]})
    allow_wildcard = CHALLENGE_ALLOWS_WILDCARD.get(challenge_type, False)
    allow_ip = CHALLENGE_ALLOWS_IP.get(challenge_type, False)
    seen: dict[tuple[str, str], Identifier] = {}
    for name in names:
        identifier = normalize_name(name, allow_wildcard=allow_wildcard, allow_ip=allow_ip)
        seen.setdefault((identifier.type, identifier.value), identifier)
    return list(seen.values())
