"""The built-in provider: RFC 2136 dynamic updates signed with TSIG (BIND, Knot,
PowerDNS...). The TSIG secret is read from the environment variable the config names."""

from __future__ import annotations

import base64
import os
from typing import Any

from app.acme.dns import lookup
from app.acme.dns.config import ChallengeConfig
from app.errors import ValidationFailed


class Rfc2136Provider:
    def __init__(self, config: ChallengeConfig, timeout: float = 10.0) -> None:
        self.config = config
        self.timeout = timeout

    def _secret(self) -> str:
        env = self.config["tsig_secret_env"]
        secret = os.environ.get(env)
        if not secret:
            raise ValidationFailed(f"{env} is not set in this worker's environment (the "
                                   "TSIG secret for dns-01)")
        try:
            base64.b64decode(secret, validate=True)
        except ValueError:
            raise ValidationFailed(f"{env} is not base64") from None
        return secret

    def check(self) -> None:
        self._secret()

    def zone_for(self, fqdn: str) -> str:
        return lookup.zone_for(fqdn, self.config)

    def _update(self, fqdn: str, value: str, add: bool) -> None:
        import dns.name
        import dns.query
        import dns.rcode
        import dns.tsig
        import dns.tsigkeyring
        import dns.update

        zone = dns.name.from_text(self.zone_for(fqdn))
        algorithm = {"hmac-sha256": dns.tsig.HMAC_SHA256, "hmac-sha384": dns.tsig.HMAC_SHA384,
                     "hmac-sha512": dns.tsig.HMAC_SHA512}[self.config["tsig_algorithm"]]
        keyring: Any = dns.tsigkeyring.from_text({self.config["tsig_key_name"]:
                                                  self._secret()})
        update = dns.update.Update(zone, keyring=keyring,
                                   keyname=dns.name.from_text(self.config["tsig_key_name"]),
                                   keyalgorithm=algorithm)
        relative = dns.name.from_text(fqdn).relativize(zone)
        if add:
            update.add(relative, 60, "TXT", f'"{value}"')
        else:
            update.delete(relative, "TXT", f'"{value}"')
        response = dns.query.tcp(update, self.config["server"], port=self.config["port"],
                                 timeout=self.timeout)
        if response.rcode() != dns.rcode.NOERROR:
            raise RuntimeError(f"dns-01 update refused by {self.config['server']}: "
                               f"{dns.rcode.to_text(response.rcode())}")

    def present(self, fqdn: str, value: str) -> None:
        self._update(fqdn, value, add=True)

    def cleanup(self, fqdn: str, value: str) -> None:
        self._update(fqdn, value, add=False)
