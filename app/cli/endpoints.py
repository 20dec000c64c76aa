"""``certautopilot endpoints``: where a certificate is served, and what is served there."""

from __future__ import annotations

from typing import Any

import click

from app.cli.base import CliContext, echo_json, pass_ctx


@click.group("endpoints")
def command() -> None:
    """Endpoints of a certificate (drift scans): list, add, remove, scan now."""


def _show(rows: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        echo_json(rows)
        return
    if not rows:
        click.echo("no endpoints")
    for row in rows:
        served = row.get("served") or {}
        flags = f" [{','.join(row['flags'])}]" if row.get("flags") else ""
        detail = row.get("error") or (
            f"serial {served.get('serial')} until {served.get('not_after')}" if served else "")
        click.echo(f"{row['endpoint']:<40} {row['state']:<12}{flags} {detail}")


def _edit(obj: CliContext, certificate_id: str, endpoint: str, sni: str | None,
          starttls: str | None, add: bool) -> None:
    from app.audit import system_actor
    from app.domain import certificates, drift
    from app.errors import NotFound, ValidationFailed

    db = obj.db()
    cert = certificates.get_certificate(db, certificate_id)
    try:
        wanted = drift.parse_endpoint(endpoint)
    except ValueError as exc:
        raise ValidationFailed(f"endpoint {exc}") from None
    wanted = drift.Endpoint(wanted.host, wanted.port, sni or None, starttls or None)
    current = [drift.Endpoint.from_doc(e) for e in cert.get("endpoints") or []]
    if add:
        if wanted.key in {e.key for e in current}:
            raise ValidationFailed(f"{wanted.key} is already an endpoint of {certificate_id}")
        current.append(wanted)
    else:
        if wanted.key not in {e.key for e in current}:
            raise NotFound(f"{wanted.key} is not an endpoint of {certificate_id}")
        current = [e for e in current if e.key != wanted.key]
    certificates.update_certificate(db, certificate_id,
                                    {"endpoints": [e.as_doc() for e in current]},
                                    system_actor("cli"), expected_version=cert.get("version"))
    click.echo(f"{'added' if add else 'removed'} {wanted.key}")


_sni = click.option("--sni", help="Server name to send (default: the host).")
_starttls = click.option("--starttls", type=click.Choice(["smtp", "imap", "postgres"]),
                         help="Plaintext protocol to upgrade before TLS.")


@command.command("add")
@click.argument("certificate_id")
@click.argument("endpoint")
@_sni
@_starttls
@pass_ctx
def add(obj: CliContext, certificate_id: str, endpoint: str, sni: str | None,
        starttls: str | None) -> None:
    """Add ENDPOINT (host:port) to CERTIFICATE_ID."""
    _edit(obj, certificate_id, endpoint, sni, starttls, add=True)


@command.command("remove")
@click.argument("certificate_id")
@click.argument("endpoint")
@_sni
@_starttls
@pass_ctx
def remove(obj: CliContext, certificate_id: str, endpoint: str, sni: str | None,
           starttls: str | None) -> None:
    """Remove ENDPOINT (host:port, with the same --sni/--starttls) from CERTIFICATE_ID."""
    _edit(obj, certificate_id, endpoint, sni, starttls, add=False)


@command.command("list")
@click.argument("certificate_id")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_ctx
def list_(obj: CliContext, certificate_id: str, as_json: bool) -> None:
    """Each endpoint of CERTIFICATE_ID with what it served at its last scan."""
    from app.domain import certificates, drift

    db = obj.db()
    _show(drift.endpoint_status(db, certificates.get_certificate(db, certificate_id)),
          as_json)


@command.command("scan")
@click.argument("certificate_id")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_ctx
def scan(obj: CliContext, certificate_id: str, as_json: bool) -> None:
    """Probe every endpoint of CERTIFICATE_ID now; exit 1 unless all serve it."""
    import sys

    from app.domain import certificates, drift

    db = obj.db()
    cert = certificates.get_certificate(db, certificate_id)
    results = drift.scan_certificate(db, cert, settings=obj.settings)
    _show(drift.endpoint_status(db, cert), as_json)
    sys.exit(0 if all(r.state == drift.OK for r in results) else 1)
