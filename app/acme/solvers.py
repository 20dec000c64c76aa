"""Challenge solvers: make the CA's validation request succeed, then clean up.

- ``http-01``: the key authorization is handed to a record store (``Http01Store``; the
  application's is ``app.domain.challenges.Http01Records``) that every api replica's
  responder reads from (``app.acme.responder``).
- ``dns-01``: a TXT record at ``_acme-challenge.<name>`` (or where its CNAME chain
  ends) through a provider adapter (``app.acme.dns``: RFC 2136 or a dns-lexicon hosted
  provider), answered only once every authoritative server serves it. Secrets are never
  stored: the spec names the environment variables that hold them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from app.acme.dns import DnsProvider, lookup
from app.acme.dns.config import BUILTIN, ChallengeConfig, validate_dns01_config
from app.errors import ValidationFailed

__all__ = ["ChallengeConfig", "validate_dns01_config", "solver_for", "Challenge"]

TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{1,256}$")
# Told what a solver still waits for before the CA may validate ({} once nothing).
OnWait = Callable[[dict[str, Any]], None]


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

    def check(self, identifiers: list[str]) -> None:
        """Refuse (ValidationFailed) what would fail anyway, before the CA is asked:
        a missing credential, a CNAME loop."""

    def provision(self, challenge: Challenge) -> None: ...

    def ready(self, challenges: list[Challenge], on_wait: OnWait | None = None) -> None: ...

    def cleanup(self, challenges: list[Challenge]) -> None: ...


class Http01Store(Protocol):
    """Where http-01 key authorizations are kept for the responder to serve."""

    def put(self, challenge: Challenge) -> None: ...

    def remove(self, tokens: list[str]) -> None: ...


class Http01Solver:
    type = "http-01"

    def __init__(self, store: Http01Store) -> None:
        self.store = store

    def check(self, identifiers: list[str]) -> None:
        pass

    def ready(self, challenges: list[Challenge], on_wait: OnWait | None = None) -> None:
        pass  # the record store is read by every replica as soon as it is written

    def provision(self, challenge: Challenge) -> None:
        if not TOKEN_RE.match(challenge.token):
            raise ValidationFailed("the CA sent a challenge token outside the base64url "
                                   "alphabet")
        self.store.put(challenge)

    def cleanup(self, challenges: list[Challenge]) -> None:
        self.store.remove([c.token for c in challenges])


def dns_provider(config: ChallengeConfig) -> DnsProvider:
    """The adapter for a validated dns-01 config (``app.acme.dns.config``)."""
    if config.get("provider") == BUILTIN:
        from app.acme.dns.rfc2136 import Rfc2136Provider

        return Rfc2136Provider(config)
    from app.acme.dns.hosted import LexiconProvider

    return LexiconProvider(config)


class Dns01Solver:
    """dns-01 through a provider adapter: the TXT goes where ``_acme-challenge.<name>``
    points (CNAMEs followed), and ``ready`` waits until every authoritative server of
    that zone serves it."""

    type = "dns-01"

    def __init__(self, config: ChallengeConfig) -> None:
        self.config = config
        self.provider = dns_provider(config)
        self._records: dict[str, str] = {}  # identifier -> where its TXT goes

    def check(self, identifiers: list[str]) -> None:
        self.provider.check()
        for identifier in identifiers:
            # a CNAME loop, or a target outside the configured zone, is refused here
            self.provider.zone_for(self._record_for(identifier))

    def _record_for(self, identifier: str) -> str:
        base = identifier.removeprefix("*.")
        if base not in self._records:
            self._records[base] = lookup.record_name(base, self.config)
        return self._records[base]

    def _record(self, challenge: Challenge) -> str:
        return self._record_for(challenge.identifier)

    def provision(self, challenge: Challenge) -> None:
        if not challenge.dns_value:
            raise ValidationFailed("dns-01 challenge without a TXT value")
        self.provider.present(self._record(challenge), challenge.dns_value)

    def ready(self, challenges: list[Challenge], on_wait: OnWait | None = None) -> None:
        records: dict[str, set[str]] = {}
        for challenge in challenges:
            if challenge.dns_value:
                records.setdefault(self._record(challenge), set()).add(challenge.dns_value)
        lookup.wait_propagated(records, self.config, on_wait)

    def cleanup(self, challenges: list[Challenge]) -> None:
        errors = []
        for challenge in challenges:
            if not challenge.dns_value:
                continue
            try:
                self.provider.cleanup(self._record(challenge), challenge.dns_value)
            except Exception as exc:  # noqa: BLE001 - remove the others, then report
                errors.append(str(exc)[:200])
        if errors:
            raise RuntimeError("; ".join(errors))


class TlsAlpn01Solver(Http01Solver):
    """tls-alpn-01: the key authorization goes to the same shared record store; the api
    role's responder (``app.acme.tlsalpn``) answers for the record's identifier."""

    type = "tls-alpn-01"


def solver_for(config: ChallengeConfig, http01: Http01Store) -> Solver:
    if config.get("type") == "http-01":
        return Http01Solver(http01)
    if config.get("type") == "tls-alpn-01":
        return TlsAlpn01Solver(http01)
    if config.get("type") == "dns-01":
        return Dns01Solver(config)
    raise ValidationFailed(f"no solver for challenge {config.get('type')!r}")
