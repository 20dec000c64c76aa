"""``certautopilot renewals ...``: emergency and bulk renewal as one tracked batch.

(The lead may fold ``renew`` into a ``certs`` group as ``certautopilot certs renew``.)
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from app.cli.base import CliContext, echo_json, pass_ctx
from app.errors import ValidationFailed


def _echo_batch(batch: dict[str, Any], as_json: bool) -> None:
    if as_json:
        echo_json(batch)
        return
    counts = batch["counts"]
    click.echo(f"batch {batch['_id']} ({batch['state']}): {counts['total']} certificates; "
               f"queued {counts['queued']} (running {counts['running']}), done "
               f"{counts['done']}, failed {counts['failed']}, cancelled {counts['cancelled']}")
    if batch.get("unmatched_serials"):
        click.echo(f"serials matching no live certificate: "
                   f"{', '.join(batch['unmatched_serials'][:20])}")


@click.group("renewals")
def command() -> None:
    """Emergency and bulk renewal (through the shared CA budget)."""


@command.command("renew")
@click.option("--all", "all_", is_flag=True, help="Every live issued certificate.")
@click.option("--issuer", help="Certificates whose issuer's name contains this.")
@click.option("--project", "project_id", help="Certificates of this project.")
@click.option("--expiring-before", type=click.DateTime(
    formats=["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M:%SZ"]),
    help="Certificates whose notAfter is before this UTC time.")
@click.option("--serial-file", type=click.Path(dir_okay=False, path_type=Path),
              help="A CA's notice: one serial (hex) per line; # comments.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_ctx
def renew_command(obj: CliContext, all_: bool, issuer: str | None, project_id: str | None,
                  expiring_before: datetime | None, serial_file: Path | None,
                  as_json: bool) -> None:
    """Renew the selected certificates now, as one tracked batch."""
    from app.audit import system_actor
    from app.domain import renewal_batches

    selector: dict[str, Any] = {}
    if all_:
        selector["all"] = True
    if issuer is not None:
        selector["issuer"] = issuer
    if project_id is not None:
        selector["project_id"] = project_id
    if expiring_before is not None:
        selector["expiring_before"] = expiring_before.replace(tzinfo=UTC)
    if serial_file is not None:
        try:
            lines = serial_file.read_text(errors="replace").splitlines()
        except OSError as exc:
            raise ValidationFailed(f"cannot read {serial_file}: {exc.strerror}") from None
        try:
            selector["serials"] = renewal_batches.parse_serial_lines(lines)
        except ValidationFailed as exc:
            raise ValidationFailed(f"{serial_file}: {exc.message}") from None
    batch = renewal_batches.start_batch(obj.db(), selector, system_actor("cli"))
    _echo_batch(batch, as_json)


@command.command("show")
@click.argument("batch_id")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_ctx
def show_command(obj: CliContext, batch_id: str, as_json: bool) -> None:
    """A batch's progress."""
    from app.domain import renewal_batches

    _echo_batch(renewal_batches.get_batch(obj.db(), batch_id), as_json)


@command.command("cancel")
@click.argument("batch_id")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_ctx
def cancel_command(obj: CliContext, batch_id: str, as_json: bool) -> None:
    """Cancel a batch: its queued renewals are cancelled; running ones finish."""
    from app.audit import system_actor
    from app.domain import renewal_batches

    _echo_batch(renewal_batches.cancel_batch(obj.db(), batch_id, system_actor("cli")),
                as_json)
