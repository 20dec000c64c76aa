"""DNS lookups around a dns-01 record: where it is written and when it is served.

- ``record_name``: ``_acme-challenge.<name>``, following CNAMEs (chains; a loop or a
  chain longer than ``MAX_CNAME_HOPS`` is refused), so a delegated name's TXT is written
  in the zone it points to.
- ``zone_for``: the zone holding a name, from its SOA (never by guessing labels).
- ``wait_propagated``: ask every authoritative server of the zone directly (NS lookup,
  then each server's addresses) until all serve the values, with backoff and a deadline.

Lookups go through the config's ``resolvers`` (default: the system's resolver).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from app.acme.dns.config import ChallengeConfig
from app.errors import ValidationFailed

MAX_CNAME_HOPS = 8
LOOKUP_LIFETIME = 10.0
QUERY_TIMEOUT = 3.0


class PropagationTimeout(Exception):  # noqa: N818 - reads as what happened
    """Some authoritative server still did not serve the record at the deadline."""


def resolver(config: ChallengeConfig) -> Any:
    import dns.resolver

    if config.get("resolvers"):
        res = dns.resolver.Resolver(configure=False)
        res.nameservers = list(config["resolvers"])
    else:
        res = dns.resolver.Resolver()
    res.lifetime = LOOKUP_LIFETIME
    res.cache = None  # a record is watched change: never answer from a cache
    return res


def record_name(identifier: str, config: ChallengeConfig) -> str:
    """Where the TXT for ``identifier`` is written: ``_acme-challenge.<identifier>``, or
    the end of the CNAME chain starting there."""
    import dns.exception
    import dns.resolver

    name = f"_acme-challenge.{identifier}".lower().rstrip(".")
    if not config.get("follow_cname", False):  # specs stored before it: no lookups
        return name
    res = resolver(config)
    seen = [name]
    for _ in range(MAX_CNAME_HOPS):
        try:
            answer = res.resolve(name, "CNAME", raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            return name
        except dns.exception.DNSException as exc:
            raise RuntimeError(f"dns-01: CNAME lookup of {name} failed: {exc}") from None
        if answer.rrset is None:
            return name
        target = str(answer.rrset[0].target).lower().rstrip(".")
        if target in seen:
            raise ValidationFailed("dns-01: CNAME loop at _acme-challenge."
                                   f"{identifier}: {' -> '.join([*seen, target])}")
        seen.append(target)
        name = target
    raise ValidationFailed(f"dns-01: CNAME chain from _acme-challenge.{identifier} is "
                           f"longer than {MAX_CNAME_HOPS}: {' -> '.join(seen)}")


def zone_for(fqdn: str, config: ChallengeConfig) -> str:
    """The zone ``fqdn`` belongs to: the configured ``zone`` (which must contain it), else
    the closest enclosing SOA."""
    import dns.exception
    import dns.name
    import dns.resolver

    name = dns.name.from_text(fqdn)
    if config.get("zone"):
        if not name.is_subdomain(dns.name.from_text(config["zone"])):
            raise ValidationFailed(f"dns-01: {fqdn.rstrip('.')} is not inside the zone "
                                   f"{config['zone']}")
        return str(config["zone"])
    try:
        zone = dns.resolver.zone_for_name(name, resolver=resolver(config),
                                          lifetime=LOOKUP_LIFETIME)
    except dns.exception.DNSException as exc:
        raise RuntimeError(f"dns-01: no SOA found above {fqdn}: {exc}") from None
    return str(zone.to_text(omit_final_dot=True)).lower()


def authoritative_addresses(zone: str, config: ChallengeConfig) -> dict[str, str]:
    """address -> NS name, for every name server of ``zone``."""
    import dns.exception
    import dns.resolver

    res = resolver(config)
    try:
        ns_names = sorted(str(r.target).rstrip(".") for r in res.resolve(zone, "NS"))
    except dns.exception.DNSException as exc:
        raise RuntimeError(f"dns-01: NS lookup of {zone} failed: {exc}") from None
    found: dict[str, str] = {}
    for ns in ns_names:
        for rdtype in ("A", "AAAA"):
            try:
                for item in res.resolve(ns, rdtype):
                    found[str(item.address)] = ns
            except dns.exception.DNSException:
                continue
    if not found:
        raise RuntimeError(f"dns-01: no address for the name servers of {zone}: "
                           f"{', '.join(ns_names)}")
    return found


def served_values(address: str, fqdn: str) -> set[str] | None:
    """The TXT values ``address`` serves for ``fqdn`` (None: no usable answer)."""
    import dns.exception
    import dns.flags
    import dns.message
    import dns.query
    import dns.rdatatype

    query = dns.message.make_query(fqdn, dns.rdatatype.TXT)
    query.flags &= ~dns.flags.RD  # an authoritative answer, not a recursive one
    try:
        reply = dns.query.udp(query, address, timeout=QUERY_TIMEOUT)
        if reply.flags & dns.flags.TC:
            reply = dns.query.tcp(query, address, timeout=QUERY_TIMEOUT)
    except (dns.exception.DNSException, OSError):
        return None
    return {b"".join(item.strings).decode(errors="replace")
            for rrset in reply.answer if rrset.rdtype == dns.rdatatype.TXT
            for item in rrset}


Awaiting = dict[str, Any]


def wait_propagated(records: dict[str, set[str]], config: ChallengeConfig,
                    on_wait: Callable[[Awaiting], None] | None = None,
                    sleep: Callable[[float], None] = time.sleep) -> None:
    """Block until every authoritative server of each record's zone serves all its
    values (``records``: fqdn -> values), waiting at most ``propagation_timeout``
    seconds with backoff (0.5 s doubling to 10 s). ``on_wait`` is told what is still
    awaited each time that changes."""
    timeout = float(config.get("propagation_timeout", 0))
    if timeout <= 0 or not records:
        return
    servers = {fqdn: authoritative_addresses(zone_for(fqdn, config), config)
               for fqdn in records}
    deadline = time.monotonic() + timeout
    delay, last = 0.5, None
    while True:
        pending = sorted({f"{fqdn} @ {ns} ({address})"
                          for fqdn, addresses in servers.items()
                          for address, ns in addresses.items()
                          if not records[fqdn] <= (served_values(address, fqdn) or set())})
        if not pending:
            if last is not None and on_wait is not None:
                on_wait({})
            return
        if pending != last and on_wait is not None:
            on_wait({"what": "dns-01 TXT records on every authoritative server",
                     "pending": pending, "deadline_seconds": timeout})
        last = pending
        if time.monotonic() + delay > deadline:
            raise PropagationTimeout(f"dns-01: after {timeout:g} s these servers still do "
                                     f"not serve the TXT record: {', '.join(pending)}")
        sleep(delay)
        delay = min(delay * 2, 10.0)
