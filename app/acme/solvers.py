"""Challenge solvers: make the CA's validation request succeed, then clean up.

- ``http-01``: the key authorization is handed to a record store (``Http01Store``; the
  application's is ``app.domain.challenges.Http01Records``) that every api replica's
  responder reads from (``app.acme.responder``).
- ``dns-01`` (``provider: rfc2136``): a TXT record at ``_acme-challenge.<name>`` through
  an RFC 2136 dynamic update signed with TSIG. The TSIG secret is never stored: the spec
  names the environment variable that holds it (``tsig_secret_env``).
"""

from __future__ import annotations

import base64
import os
import re
from dataclasses import dataclass
from typing import Any, Protocol

from app.errors import ValidationFailed

# A certificate's challenge spec (``{"type": "dns-01", "provider": "rfc2136", ...}``).
ChallengeConfig = dict[str, Any]

TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{1,256}$")
_HOST = re.compile(r"^[A-Za-z0-9.:-]{1,253}$")
_ENV = re.compile(r"^CAP_[A-Z0-9_]{1,100}$")
_KEYNAME = re.compile(r"^[A-Za-z0-9._-]{1,253}\.?$")
TSIG_ALGORITHMS = ("hmac-sha256", "hmac-sha384", "hmac-sha512")


@dataclass(frozen=True)
class Challenge:
    """What a solver needs to provision one authorization's challenge."""

    type: str
    token: str
    identifier: str          # the name or IP being validated (without "*.")
    key_authorization: str   # http-01 body; for dns-01 the TXT value is derived from it
    dns_value: str | None
    order_id: str
    certificate_id: str
    project_id: str


class Solver(Protocol):
    type: str

    def provision(self, challenge: Challenge) -> None: ...

    def cleanup(self, challenges: list[Challenge]) -> None: ...


class Http01Store(Protocol):
    """Where http-01 key authorizations are kept for the responder to serve."""

    def put(self, challenge: Challenge) -> None: ...

    def remove(self, tokens: list[str]) -> None: ...


class Http01Solver:
    type = "http-01"

    def __init__(self, store: Http01Store) -> None:
        self.store = store

    def provision(self, challenge: Challenge) -> None:
        if not TOKEN_RE.match(challenge.token):
            raise ValidationFailed("the CA sent a challenge token outside the base64url "
                                   "alphabet")
        self.store.put(challenge)

    def cleanup(self, challenges: list[Challenge]) -> None:
        self.store.remove([c.token for c in challenges])


def validate_dns01_config(value: ChallengeConfig) -> ChallengeConfig:
    """Check a dns-01 challenge spec; return it normalised."""
    allowed = {"type", "provider", "server", "port", "zone", "tsig_key_name",
               "tsig_algorithm", "tsig_secret_env"}
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise ValidationFailed(f"unknown dns-01 options: {', '.join(unknown)}")
    if value.get("provider") != "rfc2136":
        raise ValidationFailed("dns-01 needs provider 'rfc2136'")
    server = value.get("server")
    if not isinstance(server, str) or not _HOST.match(server):
        raise ValidationFailed("dns-01 rfc2136: server must be a host name or IP address")
    port = value.get("port", 53)
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ValidationFailed("dns-01 rfc2136: port must be between 1 and 65535")
    zone = value.get("zone")
    if not isinstance(zone, str) or not _KEYNAME.match(zone) or "." not in zone.strip("."):
        raise ValidationFailed("dns-01 rfc2136: zone must be a DNS name")
    key_name = value.get("tsig_key_name")
    if not isinstance(key_name, str) or not _KEYNAME.match(key_name):
        raise ValidationFailed("dns-01 rfc2136: tsig_key_name must be a key name")
    algorithm = value.get("tsig_algorithm", "hmac-sha256")
    if algorithm not in TSIG_ALGORITHMS:
        raise ValidationFailed(f"dns-01 rfc2136: tsig_algorithm one of "
                               f"{', '.join(TSIG_ALGORITHMS)}")
    secret_env = value.get("tsig_secret_env")
    if not isinstance(secret_env, str) or not _ENV.match(secret_env):
        raise ValidationFailed("dns-01 rfc2136: tsig_secret_env must name a CAP_* environment "
                               "variable holding the base64 TSIG secret (never the secret)")
    return {"type": "dns-01", "provider": "rfc2136", "server": server, "port": port,
            "zone": zone.rstrip(".").lower(), "tsig_key_name": key_name,
            "tsig_algorithm": algorithm, "tsig_secret_env": secret_env}


class Rfc2136Solver:
    """dns-01 via RFC 2136 dynamic updates (BIND, Knot, PowerDNS...)."""

    type = "dns-01"

    def __init__(self, config: ChallengeConfig, timeout: float = 10.0) -> None:
        self.config = config
        self.timeout = timeout

    def _keyring(self) -> Any:
        import dns.tsigkeyring

        secret = os.environ.get(self.config["tsig_secret_env"])
        if not secret:
            raise ValidationFailed(f"{self.config['tsig_secret_env']} is not set in this "
                                   "worker's environment (the TSIG secret for dns-01)")
        try:
            base64.b64decode(secret, validate=True)
        except ValueError:
            raise ValidationFailed(f"{self.config['tsig_secret_env']} is not base64") from None
        return dns.tsigkeyring.from_text({self.config["tsig_key_name"]: secret})

    def _update(self, challenges: list[Challenge], add: bool) -> None:
        import dns.name
        import dns.query
        import dns.rcode
        import dns.tsig
        import dns.update

        zone = dns.name.from_text(self.config["zone"])
        algorithm = {"hmac-sha256": dns.tsig.HMAC_SHA256, "hmac-sha384": dns.tsig.HMAC_SHA384,
                     "hmac-sha512": dns.tsig.HMAC_SHA512}[self.config["tsig_algorithm"]]
        update = dns.update.Update(zone, keyring=self._keyring(),
                                   keyname=dns.name.from_text(self.config["tsig_key_name"]),
                                   keyalgorithm=algorithm)
        for challenge in challenges:
            record = dns.name.from_text(f"_acme-challenge.{challenge.identifier}")
            if not record.is_subdomain(zone):
                raise ValidationFailed(f"{challenge.identifier} is not inside the dns-01 zone "
                                       f"{self.config['zone']}")
            relative = record.relativize(zone)
            if add:
                update.add(relative, 60, "TXT", f'"{challenge.dns_value}"')
            else:
                update.delete(relative, "TXT", f'"{challenge.dns_value}"')
        response = dns.query.tcp(update, self.config["server"], port=self.config["port"],
                                 timeout=self.timeout)
        if response.rcode() != dns.rcode.NOERROR:
            raise RuntimeError(f"dns-01 update refused by {self.config['server']}: "
                               f"{dns.rcode.to_text(response.rcode())}")

    def provision(self, challenge: Challenge) -> None:
        self._update([challenge], add=True)

    def cleanup(self, challenges: list[Challenge]) -> None:
        if challenges:
            self._update(challenges, add=False)


def solver_for(config: ChallengeConfig, http01: Http01Store) -> Solver:
    if config.get("type") == "http-01":
        return Http01Solver(http01)
    if config.get("type") == "dns-01" and config.get("provider") == "rfc2136":
        return Rfc2136Solver(config)
    raise ValidationFailed(f"no solver for challenge {config.get('type')!r}")
