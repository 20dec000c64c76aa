"""``certautopilot ca ...``: the CA policy shared by every worker (rate-limit budgets)."""

from __future__ import annotations

from datetime import datetime

import click

from app.cli.base import CliContext, echo_json, pass_ctx


def _when(value: datetime | None) -> str:
    return f"{value:%Y-%m-%d %H:%M:%S} UTC" if value else "-"


@click.group("ca")
def command() -> None:
    """CA policy across the cluster: the shared rate-limit budget."""


@command.command("budgets")
@click.option("--ca", "directory", default=None, help="Only this ACME directory URL.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_ctx
def budgets_command(obj: CliContext, directory: str | None, as_json: bool) -> None:
    """Each shared bucket's level: tokens free of its capacity, and the next token."""
    from app.domain import budget

    rows = budget.levels(obj.db(), ca=directory)
    if as_json:
        echo_json(rows)
        return
    if not rows:
        click.echo("no CA budget used yet (buckets appear with the first order)")
        return
    click.echo(f"{'ca':<40} {'bucket':<34} {'subject':<30} {'tokens':>11}  next token")
    for row in rows:
        level = f"{row['tokens']}/{row['capacity']}"
        click.echo(f"{str(row['ca'])[:40]:<40} {row['bucket']:<34} "
                   f"{str(row['subject'])[:30]:<30} {level:>11}  "
                   f"{_when(row['next_token_at'])} (per {row['window_seconds']:g}s)")


@command.command("fallback")
@click.argument("project")
@click.argument("account_ids", nargs=-1)
@pass_ctx
def fallback_command(obj: CliContext, project: str, account_ids: tuple[str, ...]) -> None:
    """Set PROJECT's default CA fallback list: ACCOUNT_IDS of that project, used in order
    after a certificate's own account (for certificates without a list of their own).
    No account ids: clear it."""
    from app.audit import system_actor
    from app.domain import ca_fallback
    from app.domain.projects import find_project

    db = obj.db()
    project_id = find_project(db, project)["_id"]
    listed = ca_fallback.set_project_default(db, project_id, list(account_ids),
                                             system_actor("cli"))
    click.echo(f"project {project_id}: CA fallback {' -> '.join(listed) or 'none'}")
