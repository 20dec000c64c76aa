"""The spec of a managed certificate: what the user asks for, checked and normalised.

A spec names the identifiers (DNS names, IP addresses, wildcards with dns-01), the key
type, the challenge (http-01, tls-alpn-01, or dns-01 through a provider adapter), the
issuer account, an optional ACME profile, the renewal policy (``renew_before_days``,
``use_ari``, ``reuse_key``), the CA fallback accounts and the endpoints where it is served
(drift scans). ``validate_spec`` names every bad field in one ValidationFailed.
"""

from __future__ import annotations

import re
from typing import Any

from app.acme import solvers
from app.acme.identifiers import normalize_names
from app.db import Doc
from app.domain import drift
from app.errors import ValidationFailed

KEY_TYPES = ("ec256", "ec384", "rsa2048", "rsa3072", "rsa4096")
CHALLENGE_TYPES = ("http-01", "dns-01", "tls-alpn-01")
SPEC_FIELDS = {"name", "names", "key_type", "challenge", "account_id", "profile", "renewal",
               "ca_fallback", "endpoints"}
RENEWAL_FIELDS = {"renew_before_days", "use_ari", "reuse_key"}

_LABEL = re.compile(r"^[\w .:@/-]{1,200}$")
_PROFILE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def _validate_challenge(value: Any, errors: dict[str, list[str]]) -> Doc:
    if value is None:
        return {"type": "http-01"}
    if isinstance(value, str):
        value = {"type": value}
    if not isinstance(value, dict) or value.get("type") not in CHALLENGE_TYPES:
        errors["challenge"] = [f"an object with type one of {', '.join(CHALLENGE_TYPES)}"]
        return {}
    if value["type"] in ("http-01", "tls-alpn-01"):
        if set(value) - {"type"}:
            errors["challenge"] = [f"{value['type']} takes no options"]
        return {"type": value["type"]}
    try:
        return solvers.validate_dns01_config(value)
    except ValidationFailed as exc:
        errors["challenge"] = [exc.message]
        return {}


def _validate_renewal(value: Any, errors: dict[str, list[str]]) -> Doc:
    policy: Doc = {"renew_before_days": None, "use_ari": True, "reuse_key": False}
    if value is None:
        return policy
    if not isinstance(value, dict) or set(value) - RENEWAL_FIELDS:
        errors["renewal"] = [f"an object with only {', '.join(sorted(RENEWAL_FIELDS))}"]
        return policy
    days = value.get("renew_before_days")
    if days is not None and (isinstance(days, bool) or not isinstance(days, (int, float))
                             or not 0 < days <= 365):
        errors.setdefault("renewal", []).append("renew_before_days: a number in (0, 365]")
    else:
        policy["renew_before_days"] = float(days) if days is not None else None
    for flag in ("use_ari", "reuse_key"):
        if flag in value:
            if not isinstance(value[flag], bool):
                errors.setdefault("renewal", []).append(f"{flag}: true or false")
            else:
                policy[flag] = value[flag]
    return policy


def validate_spec(spec: Any, *, current: Doc | None = None) -> Doc:
    """Check a certificate spec (or, with ``current``, a partial change of one) and
    return the normalised fields. Raises ValidationFailed naming every bad field."""
    if not isinstance(spec, dict):
        raise ValidationFailed("a certificate spec must be an object")
    unknown = sorted(set(spec) - SPEC_FIELDS)
    if unknown:
        raise ValidationFailed(f"unknown certificate fields: {', '.join(unknown)}",
                               errors={k: ["unknown field"] for k in unknown})
    merged = dict(current or {})
    merged.update(spec)
    errors: dict[str, list[str]] = {}
    key_type = merged.get("key_type", "ec256")
    if key_type not in KEY_TYPES:
        errors["key_type"] = [f"one of {', '.join(KEY_TYPES)}"]
    challenge = _validate_challenge(merged.get("challenge"), errors)
    identifiers: list[Doc] = []
    if "names" not in merged:
        errors["names"] = ["required"]
    elif challenge:
        try:
            identifiers = [i.as_doc() for i in normalize_names(merged["names"],
                                                               challenge["type"])]
        except ValidationFailed as exc:
            errors["names"] = exc.errors.get("names") or [exc.message]
    profile = merged.get("profile")
    if profile is not None and (not isinstance(profile, str) or not _PROFILE.match(profile)):
        errors["profile"] = ["1-64 letters, digits, '.', '_' or '-'"]
    account_id = merged.get("account_id")
    if account_id is not None and (not isinstance(account_id, str) or not account_id
                                   or len(account_id) > 100):
        errors["account_id"] = ["an account id"]
    label = merged.get("name")
    if label is not None and (not isinstance(label, str) or not _LABEL.match(label)):
        errors["name"] = ["1-200 printable characters"]
    renewal = _validate_renewal(merged.get("renewal"), errors)
    fallback = merged.get("ca_fallback") or []
    if not isinstance(fallback, list) or len(fallback) > 5 or not all(
            isinstance(a, str) and 0 < len(a) <= 100 for a in fallback):
        errors["ca_fallback"] = ["a list of at most 5 ACME account ids (used in order "
                                 "after account_id)"]
    elif len(set(fallback)) != len(fallback):
        errors["ca_fallback"] = ["an account is listed twice"]
    endpoints: list[Doc] = []
    try:  # where the certificate is served, for drift scans (app/domain/drift.py)
        endpoints = drift.validate_endpoints(merged.get("endpoints"))
    except ValidationFailed as exc:
        errors["endpoints"] = exc.errors.get("endpoints") or [exc.message]
    if errors:
        raise ValidationFailed("invalid certificate: " + "; ".join(
            f"{k}: {', '.join(v)}" for k, v in errors.items()), errors=errors)
    return {
        "name": label or identifiers[0]["value"],
        "names": [i["value"] for i in identifiers],
        "identifiers": identifiers,
        "key_type": key_type,
        "challenge": challenge,
        "account_id": account_id,
        "profile": profile,
        "renewal": renewal,
        "ca_fallback": list(fallback),
        "endpoints": endpoints,
    }

