"""Check a dns-01 challenge spec before anything is stored or asked of the CA.

``{"type": "dns-01", "provider": NAME, ...}`` where NAME is ``rfc2136`` or one of the
providers dns-lexicon bundles. Common options: ``zone`` (else found by SOA lookup),
``resolvers`` (IP addresses of the recursive resolvers used for CNAME, SOA and NS
lookups; default the system's), ``propagation_timeout`` (seconds to wait for every
authoritative server to serve the record; 0 skips the check), ``follow_cname``.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from app.errors import ValidationFailed

ChallengeConfig = dict[str, Any]

BUILTIN = "rfc2136"
HOST_RE = re.compile(r"^[A-Za-z0-9.:-]{1,253}$")
ENV_RE = re.compile(r"^CAP_[A-Z0-9_]{1,100}$")
NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,253}\.?$")
_OPTION = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
TSIG_ALGORITHMS = ("hmac-sha256", "hmac-sha384", "hmac-sha512")
COMMON = {"type", "provider", "zone", "resolvers", "propagation_timeout", "follow_cname"}
RFC2136 = {"server", "port", "tsig_key_name", "tsig_algorithm", "tsig_secret_env"}
HOSTED = {"options", "credentials_env"}
DEFAULT_PROPAGATION_TIMEOUT = 120


def hosted_providers() -> list[str]:
    """The provider names dns-lexicon bundles (its modules; nothing is imported)."""
    import pkgutil

    from lexicon._private import providers

    return sorted(m.name for m in pkgutil.iter_modules(providers.__path__)
                  if m.name not in ("base", "auto"))


def _env_name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not ENV_RE.match(value):
        raise ValidationFailed(f"dns-01: {what} must name a CAP_* environment variable "
                               "holding the secret (never the secret itself)")
    return value


def _common(value: ChallengeConfig, provider: str) -> ChallengeConfig:
    out: ChallengeConfig = {"type": "dns-01", "provider": provider}
    zone = value.get("zone")
    if zone is not None:
        if not isinstance(zone, str) or not NAME_RE.match(zone) or "." not in zone.strip("."):
            raise ValidationFailed("dns-01: zone must be a DNS name")
        out["zone"] = zone.rstrip(".").lower()
    resolvers = value.get("resolvers")
    if resolvers is not None:
        if not isinstance(resolvers, list) or not 0 < len(resolvers) <= 8:
            raise ValidationFailed("dns-01: resolvers must be a list of 1-8 IP addresses")
        for item in resolvers:
            try:
                if not isinstance(item, str):
                    raise TypeError(item)
                ipaddress.ip_address(item)
            except (TypeError, ValueError):
                raise ValidationFailed(f"dns-01: resolver {item!r} is not an IP address") \
                    from None
        out["resolvers"] = list(resolvers)
    timeout = value.get("propagation_timeout", DEFAULT_PROPAGATION_TIMEOUT)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or \
            not 0 <= timeout <= 3600:
        raise ValidationFailed("dns-01: propagation_timeout must be 0-3600 seconds")
    out["propagation_timeout"] = timeout
    follow = value.get("follow_cname", True)
    if not isinstance(follow, bool):
        raise ValidationFailed("dns-01: follow_cname must be true or false")
    out["follow_cname"] = follow
    return out


def _rfc2136(value: ChallengeConfig, out: ChallengeConfig) -> ChallengeConfig:
    server = value.get("server")
    if not isinstance(server, str) or not HOST_RE.match(server):
        raise ValidationFailed("dns-01 rfc2136: server must be a host name or IP address")
    port = value.get("port", 53)
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ValidationFailed("dns-01 rfc2136: port must be between 1 and 65535")
    key_name = value.get("tsig_key_name")
    if not isinstance(key_name, str) or not NAME_RE.match(key_name):
        raise ValidationFailed("dns-01 rfc2136: tsig_key_name must be a key name")
    algorithm = value.get("tsig_algorithm", "hmac-sha256")
    if algorithm not in TSIG_ALGORITHMS:
        raise ValidationFailed(f"dns-01 rfc2136: tsig_algorithm one of "
                               f"{', '.join(TSIG_ALGORITHMS)}")
    out.update(server=server, port=port, tsig_key_name=key_name, tsig_algorithm=algorithm,
               tsig_secret_env=_env_name(value.get("tsig_secret_env"),
                                         "rfc2136 tsig_secret_env"))
    return out


def _hosted(value: ChallengeConfig, out: ChallengeConfig) -> ChallengeConfig:
    options = value.get("options", {})
    if not isinstance(options, dict) or len(options) > 32:
        raise ValidationFailed("dns-01: options must be an object of provider settings")
    for key, item in options.items():
        if not _OPTION.match(str(key)) or isinstance(item, (dict, list)) or \
                (isinstance(item, str) and len(item) > 1000):
            raise ValidationFailed(f"dns-01: option {key!r} is not a provider setting")
        if str(key).startswith("auth"):
            # lexicon's credential options are auth_*: they belong in credentials_env
            raise ValidationFailed(f"dns-01: {key} is a credential: name the CAP_* "
                                   "variable holding it in credentials_env instead")
    credentials = value.get("credentials_env", {})
    if not isinstance(credentials, dict) or len(credentials) > 16:
        raise ValidationFailed("dns-01: credentials_env maps provider options to CAP_* "
                               "environment variable names")
    for key, env in credentials.items():
        if not _OPTION.match(str(key)):
            raise ValidationFailed(f"dns-01: credential option {key!r} is not a provider "
                                   "setting")
        _env_name(env, f"credentials_env.{key}")
    out.update(options=dict(options), credentials_env=dict(credentials))
    return out


def validate_dns01_config(value: ChallengeConfig) -> ChallengeConfig:
    """Check a dns-01 challenge spec; return it normalised."""
    provider = value.get("provider")
    if not isinstance(provider, str) or not provider:
        raise ValidationFailed("dns-01 needs a provider: rfc2136 or a dns-lexicon provider "
                               "name (e.g. powerdns, cloudflare, route53)")
    hosted = provider != BUILTIN
    if hosted and provider not in hosted_providers():
        raise ValidationFailed(f"unknown dns-01 provider {provider!r}: use rfc2136 or one "
                               "of dns-lexicon's providers (`lexicon --help` lists them)")
    allowed = COMMON | (HOSTED if hosted else RFC2136)
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise ValidationFailed(f"unknown dns-01 {provider} options: {', '.join(unknown)}")
    out = _common(value, provider)
    return _hosted(value, out) if hosted else _rfc2136(value, out)
