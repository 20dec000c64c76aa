"""``certautopilot migrate``: apply pending schema/index migrations (the Helm hook Job)."""

from __future__ import annotations

import click

from app.cli.base import CliContext, echo_json, pass_ctx


@click.command("migrate")
@click.option("--status", "show_status", is_flag=True, help="List migrations and whether applied.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_ctx
def command(obj: CliContext, show_status: bool, as_json: bool) -> None:
    """Apply every migration not yet applied (safe to run concurrently)."""
    from app import migrations

    db = obj.db()
    if show_status:
        rows = migrations.status(db)
        if as_json:
            echo_json(rows)
            return
        for row in rows:
            state = f"applied {row['applied_at']:%Y-%m-%d %H:%M:%S}" if row["applied_at"] \
                else "pending"
            click.echo(f"{row['version']:04d}  {state:<28} {row['description']}")
        return
    applied = migrations.migrate(db)
    click.echo(f"applied {len(applied)} migration(s): {applied}" if applied
               else "database is up to date")
