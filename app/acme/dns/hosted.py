"""Hosted DNS providers through ``dns-lexicon`` (Cloudflare, Route 53, PowerDNS's API,
OVH, Gandi... every provider lexicon bundles).

The non-secret settings come from the config's ``options``; each credential comes from
the CAP_* environment variable ``credentials_env`` names for it, read when a record is
written and handed only to the provider object (never logged or stored). lexicon's
``Client`` would guess the zone from the public suffix list (``tldextract``, which
downloads it); the provider is built directly with the zone found by SOA lookup instead.
"""

from __future__ import annotations

import importlib
import logging
import os
from typing import Any

from app.acme.dns import lookup
from app.acme.dns.config import ChallengeConfig
from app.errors import ValidationFailed

TXT_TTL = 60

# lexicon's providers log requests and responses at DEBUG; a credential can be in them.
logging.getLogger("lexicon").setLevel(logging.INFO)


class LexiconProvider:
    def __init__(self, config: ChallengeConfig) -> None:
        self.config = config
        self.name = str(config["provider"])

    def _credentials(self) -> dict[str, str]:
        values = {}
        for option, env in sorted(self.config.get("credentials_env", {}).items()):
            value = os.environ.get(env)
            if not value:
                raise ValidationFailed(f"{env} is not set in this worker's environment (the "
                                       f"{option} of dns-01 provider {self.name})")
            values[option] = value
        return values

    def check(self) -> None:
        self._credentials()

    def zone_for(self, fqdn: str) -> str:
        return lookup.zone_for(fqdn, self.config)

    def _provider(self, zone: str) -> Any:
        from lexicon.config import ConfigResolver

        module = importlib.import_module(f"lexicon._private.providers.{self.name}")
        settings = {**self.config.get("options", {}), **self._credentials()}
        resolver = ConfigResolver().with_dict({
            "provider_name": self.name, "domain": zone, "ttl": TXT_TTL,
            self.name: settings})
        provider = module.Provider(resolver)
        provider.authenticate()
        return provider

    def _run(self, fqdn: str, value: str, add: bool) -> None:
        zone = self.zone_for(fqdn)
        try:
            provider = self._provider(zone)
            try:
                if add:
                    provider.create_record("TXT", fqdn, value)
                else:
                    provider.delete_record(None, "TXT", fqdn, value)
            finally:
                provider.cleanup()
        except ValidationFailed:
            raise
        except Exception as exc:
            raise RuntimeError(f"dns-01 provider {self.name} could not "
                               f"{'add' if add else 'remove'} the TXT record {fqdn} in "
                               f"zone {zone}: {_describe(exc)}") from None

    def present(self, fqdn: str, value: str) -> None:
        self._run(fqdn, value, add=True)

    def cleanup(self, fqdn: str, value: str) -> None:
        self._run(fqdn, value, add=False)


def _describe(exc: Exception) -> str:
    """What went wrong, without the request: an HTTP error's text holds its URL, and some
    providers put a credential in the query string."""
    import requests

    if isinstance(exc, requests.HTTPError):
        status = exc.response.status_code if exc.response is not None else "?"
        return f"HTTP {status} from the provider's API"
    if isinstance(exc, requests.RequestException):
        return f"{type(exc).__name__} (the provider's API did not answer)"
    return f"{type(exc).__name__}: {str(exc)[:200]}"
