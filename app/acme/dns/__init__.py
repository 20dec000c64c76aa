"""DNS-01 provider adapters behind one interface, and the DNS lookups around them.

A provider writes and removes TXT records (``present``/``cleanup``) and knows the zone a
name belongs to (``zone_for``). Built in: ``rfc2136`` (dynamic updates signed with TSIG,
``app.acme.dns.rfc2136``); every other provider name is one of the hosted providers that
``dns-lexicon`` bundles (``app.acme.dns.hosted``). Credentials are never part of a
config: it names the CAP_* environment variables holding them, read when a record is
written. ``app.acme.dns.lookup`` follows ``_acme-challenge`` CNAMEs, finds zones by SOA
and checks that every authoritative server serves a record before the CA is asked.
"""

from __future__ import annotations

from typing import Protocol


class DnsProvider(Protocol):
    def check(self) -> None:
        """Raise ValidationFailed when something this worker needs (a credential
        variable) is missing: called before the CA is asked for anything."""

    def zone_for(self, fqdn: str) -> str: ...

    def present(self, fqdn: str, value: str) -> None: ...

    def cleanup(self, fqdn: str, value: str) -> None: ...
