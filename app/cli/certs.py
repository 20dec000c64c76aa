"""``certautopilot certs``: list, show, issue, renew, revoke and export managed
certificates, through the same domain calls (and audit entries) as the API.

Exit codes: 0 done; 1 the operation failed (not found, refused, issuance failed or timed
out); 2 a configuration or usage error. Bad arguments change nothing.
"""

from __future__ import annotations

import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from app.cli.base import CliContext, echo_json, pass_ctx
from app.domain.certspec import CHALLENGE_TYPES, KEY_TYPES

ACTOR_KIND = "cli"
# A certificate in one of these states is done being issued (for --wait).
SETTLED = ("issued", "failed", "revoked")


def _actor() -> Any:
    from app.audit import system_actor

    return system_actor(ACTOR_KIND)


def _project_id(obj: CliContext, project: str | None) -> str | None:
    if project is None:
        return None
    from app.domain import projects

    return str(projects.find_project(obj.db(), project)["_id"])


def _when(value: Any) -> str:
    return f"{value:%Y-%m-%d %H:%M}" if isinstance(value, datetime) else "-"


def _row(doc: dict[str, Any]) -> str:
    names = ",".join(doc.get("names") or [])
    return (f"{doc['_id']}  {doc.get('status', '-'):<8} {_when(doc.get('not_after')):<17} "
            f"{doc.get('project_id', '-'):<21} {names}")


def _public(doc: dict[str, Any]) -> dict[str, Any]:
    from app.domain.certificates import public_view

    view = public_view(doc)
    for pem in ("certificate_pem", "chain_pem", "fullchain_pem"):
        view.pop(pem, None)  # `certs export` writes them; a listing stays readable
    return view


def _wait(obj: CliContext, certificate_id: str, *, serial_not: str | None,
          timeout: float) -> dict[str, Any]:
    """Poll until the certificate is issued with a new serial, failed or revoked; a
    one-line status on a terminal."""
    from app.domain import certificates

    deadline = time.monotonic() + timeout
    shown = ""
    while True:
        doc = certificates.get_certificate(obj.db(), certificate_id)
        done = doc.get("status") in SETTLED and not (
            doc.get("status") == "issued" and doc.get("serial") == serial_not)
        state = f"{certificate_id}: {doc.get('status')}"
        if sys.stderr.isatty() and state != shown:
            click.echo(f"\r{state:<60}", nl=False, err=True)
            shown = state
        if done or time.monotonic() > deadline:
            if shown:
                click.echo("", err=True)
            if not done:
                raise click.ClickException(f"{certificate_id} not issued within {timeout:.0f}s "
                                           f"(status {doc.get('status')}); see `certautopilot "
                                           f"certs show {certificate_id}`")
            return doc
        time.sleep(0.5)


def _report(doc: dict[str, Any], as_json: bool) -> None:
    if as_json:
        echo_json(_public(doc))
    else:
        click.echo(_row(doc))
    if doc.get("status") == "failed":
        failure = doc.get("failure") or {}
        click.echo(f"certautopilot: issuance failed: {failure.get('detail') or failure}",
                   err=True)
        sys.exit(1)


@click.group("certs")
def command() -> None:
    """Managed certificates: list, show, issue, renew, revoke, export."""


@command.command("list")
@click.option("--project", metavar="ID_OR_NAME", help="Only this project's certificates.")
@click.option("--status", type=click.Choice(["pending", "issued", "failed", "revoked"]))
@click.option("--name", help="Only certificates holding this DNS name.")
@click.option("--expiring-before", type=click.DateTime(["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S"]),
              help="Only certificates whose notAfter is before this UTC date.")
@click.option("--limit", type=click.IntRange(1, 1000), default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_ctx
def list_cmd(obj: CliContext, project: str | None, status: str | None, name: str | None,
             expiring_before: datetime | None, limit: int, as_json: bool) -> None:
    """Certificates, oldest first: id, status, notAfter, project, names."""
    from app.domain import certificates

    rows = certificates.list_certificates(
        obj.db(), _project_id(obj, project), status=status, name=name, limit=limit,
        expiring_before=expiring_before.replace(tzinfo=UTC) if expiring_before else None)
    if as_json:
        echo_json([_public(row) for row in rows])
        return
    for row in rows:
        click.echo(_row(row))


@command.command("show")
@click.argument("certificate_id")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_ctx
def show_cmd(obj: CliContext, certificate_id: str, as_json: bool) -> None:
    """One certificate: names, status, issuer, validity, next renewal and why, failure,
    and what a running issuance waits for (dns-01 propagation)."""
    from app.domain import certificates

    doc = certificates.get_certificate(obj.db(), certificate_id)
    if as_json:
        echo_json(_public(doc))
        return
    for label, key in (("names", "names"), ("project", "project_id"), ("status", "status"),
                       ("issuer", "issuer"), ("serial", "serial"), ("not before", "not_before"),
                       ("not after", "not_after"), ("next renewal", "next_renewal_at"),
                       ("renewal source", "renewal_source"), ("account", "account_id"),
                       ("challenge", "challenge"), ("key type", "key_type"),
                       ("failure", "failure"), ("awaiting", "awaiting")):
        value = doc.get(key)
        if isinstance(value, datetime):
            value = f"{value:%Y-%m-%d %H:%M:%S} UTC"
        elif isinstance(value, list):
            value = ", ".join(map(str, value))
        click.echo(f"{label + ':':<16}{value if value not in (None, '') else '-'}")


@command.command("issue")
@click.argument("names_or_id", nargs=-1, required=True)
@click.option("--project", metavar="ID_OR_NAME",
              help="Create a certificate for NAMES in this project and issue it; without "
                   "it, the single argument is an existing certificate's id to issue again.")
@click.option("--challenge", type=click.Choice(CHALLENGE_TYPES), default="http-01",
              show_default=True)
@click.option("--key-type", type=click.Choice(KEY_TYPES), default="ec256", show_default=True)
@click.option("--account", "account_id", help="ACME account id (when the project has several).")
@click.option("--wait/--no-wait", default=True, show_default=True,
              help="Wait until it is issued (or failed).")
@click.option("--timeout", type=click.FloatRange(1, 3600), default=180, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_ctx
def issue_cmd(obj: CliContext, names_or_id: tuple[str, ...], project: str | None,
              challenge: str, key_type: str, account_id: str | None, wait: bool,
              timeout: float, as_json: bool) -> None:
    """Issue a certificate: `certs issue --project demo www.example.test` creates and
    issues one; `certs issue crt_...` issues an existing one again."""
    from app.domain import certificates

    db = obj.db()
    if project is not None:
        spec: dict[str, Any] = {"names": list(names_or_id), "key_type": key_type,
                                "challenge": {"type": challenge}}
        if account_id:
            spec["account_id"] = account_id
        doc = certificates.create_certificate(db, str(_project_id(obj, project)), spec,
                                              _actor(), settings=obj.settings)
        reason, serial = "initial", None
    else:
        if len(names_or_id) != 1:
            raise click.UsageError("without --project, give exactly one certificate id")
        doc = certificates.get_certificate(db, names_or_id[0])
        reason, serial = "manual", doc.get("serial")
    certificates.request_issuance(db, doc["_id"], _actor(), reason,
                                  project_id=doc["project_id"])
    if wait:
        doc = _wait(obj, doc["_id"], serial_not=serial, timeout=timeout)
    _report(doc, as_json)


@command.command("renew")
@click.argument("certificate_id")
@click.option("--wait/--no-wait", default=True, show_default=True)
@click.option("--timeout", type=click.FloatRange(1, 3600), default=180, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_ctx
def renew_cmd(obj: CliContext, certificate_id: str, wait: bool, timeout: float,
              as_json: bool) -> None:
    """Renew now (the CA's ARI window postpones scheduled renewals only)."""
    from app.domain import certificates

    db = obj.db()
    doc = certificates.get_certificate(db, certificate_id)
    if doc.get("status") == certificates.STATUS_REVOKED:
        raise click.ClickException("a revoked certificate is not renewed; use "
                                   "`certs issue` to get a new one")
    certificates.request_issuance(db, certificate_id, _actor(), "renew_now",
                                  project_id=doc["project_id"])
    if wait:
        doc = _wait(obj, certificate_id, serial_not=doc.get("serial"), timeout=timeout)
    _report(doc, as_json)


@command.command("revoke")
@click.argument("certificate_id")
@click.option("--reason", "reason_code", type=click.IntRange(0, 10), default=0,
              show_default=True, help="RFC 5280 reason code (0 unspecified, 1 keyCompromise, "
                                      "4 superseded, 5 cessationOfOperation, ...).")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_ctx
def revoke_cmd(obj: CliContext, certificate_id: str, reason_code: int, yes: bool,
               as_json: bool) -> None:
    """Revoke the issued certificate at its CA (renewals stop)."""
    from app.domain import certificates, revocation

    db = obj.db()
    doc = certificates.get_certificate(db, certificate_id)
    if not yes:
        click.confirm(f"Revoke {certificate_id} ({', '.join(doc.get('names') or [])}) at its "
                      "CA? This cannot be undone", abort=True)
    doc = revocation.revoke_certificate(db, certificate_id, _actor(), reason_code,
                                        project_id=doc["project_id"])
    _report(doc, as_json)


def _write(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(path, mode)


@command.command("export")
@click.argument("certificate_id")
@click.option("--out", "out_dir", required=True,
              type=click.Path(file_okay=False, writable=True, path_type=Path),
              help="Directory for cert.pem, chain.pem, fullchain.pem (and key.pem).")
@click.option("--key", "with_key", is_flag=True,
              help="Also write the private key (key.pem, mode 0600; audited).")
@click.option("--yes", is_flag=True, help="Do not ask before writing the private key.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_ctx
def export_cmd(obj: CliContext, certificate_id: str, out_dir: Path, with_key: bool, yes: bool,
               as_json: bool) -> None:
    """Write the certificate chain (and, with --key, its private key) to files."""
    from app.domain import certificates

    db = obj.db()
    doc = certificates.get_certificate(db, certificate_id)
    if not doc.get("fullchain_pem"):
        raise click.ClickException(f"{certificate_id} has no certificate yet (not issued)")
    files = {"cert.pem": doc["certificate_pem"], "chain.pem": doc.get("chain_pem") or "",
             "fullchain.pem": doc["fullchain_pem"]}
    if with_key:
        files["key.pem"] = ""
    taken = [name for name in files if (out_dir / name).exists()]
    if taken:
        raise click.ClickException(f"{out_dir} already holds {', '.join(taken)}; nothing "
                                   "written (choose an empty directory)")
    if with_key and not yes:
        click.confirm(f"Write the PRIVATE KEY of {certificate_id} to {out_dir / 'key.pem'} "
                      "(mode 0600; the export is audited)?", abort=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, pem in files.items():
        if name == "key.pem":
            continue
        _write(out_dir / name, pem.encode(), 0o644)
        written.append(str(out_dir / name))
    if with_key:
        key = certificates.export_private_key(db, certificate_id, _actor(),
                                              project_id=doc["project_id"])
        _write(out_dir / "key.pem", key, 0o600)
        written.append(str(out_dir / "key.pem"))
    if as_json:
        echo_json({"certificate_id": certificate_id, "files": written})
    else:
        for path in written:
            click.echo(path)
