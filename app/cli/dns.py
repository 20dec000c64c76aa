"""``certautopilot dns test PROVIDER ZONE``: prove a dns-01 provider works from here by
creating a TXT record in ZONE, waiting until every authoritative server serves it, and
removing it again. Credentials come from the CAP_* variables named with
``--credential-env`` (never from the command line)."""

from __future__ import annotations

import secrets
import sys
import time
from typing import Any

import click

from app.cli.base import echo_json

TEST_LABEL = "_certautopilot-test"


def _pairs(values: tuple[str, ...], what: str) -> dict[str, str]:
    out = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.UsageError(f"{what} takes KEY=VALUE, not {item!r}")
        out[key] = value
    return out


def build_config(provider: str, zone: str, options: dict[str, str],
                 credentials: dict[str, str], resolvers: list[str],
                 timeout: float) -> dict[str, Any]:
    """The challenge spec a certificate would carry for these flags (validated)."""
    from app.acme.dns.config import BUILTIN, validate_dns01_config

    spec: dict[str, Any] = {"type": "dns-01", "provider": provider, "zone": zone,
                            "propagation_timeout": timeout, "follow_cname": False}
    if resolvers:
        spec["resolvers"] = resolvers
    if provider == BUILTIN:
        spec.update(options)
        if "port" in spec:
            try:
                spec["port"] = int(spec["port"])
            except ValueError:
                raise click.UsageError("--option port= takes a number") from None
        spec.update(credentials)
    else:
        spec.update(options=options, credentials_env=credentials)
    return validate_dns01_config(spec)


@click.group("dns")
def command() -> None:
    """DNS-01 providers."""


@command.command("test")
@click.argument("provider")
@click.argument("zone")
@click.option("--option", "options", multiple=True, metavar="KEY=VALUE",
              help="A provider setting (rfc2136: server, port, tsig_key_name, "
                   "tsig_algorithm; lexicon providers: their options).")
@click.option("--credential-env", "credentials", multiple=True, metavar="KEY=CAP_VAR",
              help="A credential option and the CAP_* variable holding it (rfc2136: "
                   "tsig_secret_env=CAP_...).")
@click.option("--resolver", "resolvers", multiple=True, metavar="IP",
              help="Resolver for the SOA/NS lookups (default: the system's).")
@click.option("--timeout", type=click.FloatRange(min=0, max=3600), default=120.0,
              show_default=True, help="Seconds to wait for every authoritative server.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def test(provider: str, zone: str, options: tuple[str, ...], credentials: tuple[str, ...],
         resolvers: tuple[str, ...], timeout: float, as_json: bool) -> None:
    """Create a TXT record in ZONE through PROVIDER, wait until every authoritative
    server serves it, and remove it. Exit 0 when all of that worked, 1 otherwise."""
    from app.acme.dns import lookup
    from app.acme.solvers import dns_provider

    config = build_config(provider, zone.rstrip(".").lower(),
                          _pairs(options, "--option"),
                          _pairs(credentials, "--credential-env"), list(resolvers), timeout)
    adapter = dns_provider(config)
    adapter.check()
    fqdn, value = f"{TEST_LABEL}.{config['zone']}", secrets.token_urlsafe(16)
    started = time.monotonic()
    adapter.present(fqdn, value)
    try:
        lookup.wait_propagated({fqdn: {value}}, config)
        served = time.monotonic() - started
    except lookup.PropagationTimeout as exc:
        click.echo(f"certautopilot: {exc}", err=True)
        adapter.cleanup(fqdn, value)
        sys.exit(1)
    except RuntimeError as exc:
        adapter.cleanup(fqdn, value)
        raise click.ClickException(str(exc)) from None
    adapter.cleanup(fqdn, value)
    result = {"ok": True, "provider": provider, "zone": config["zone"], "record": fqdn,
              "served_everywhere_seconds": round(served, 3)}
    if as_json:
        echo_json(result)
    else:
        click.echo(f"ok: {provider} created, served and removed TXT {fqdn} "
                   f"({served:.1f} s until every authoritative server served it)")
