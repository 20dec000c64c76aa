"""``certautopilot projects``: create and list projects."""

from __future__ import annotations

import click

from app.cli.base import CliContext, echo_json, pass_ctx


@click.group("projects")
def command() -> None:
    """Projects (tenants): create, list."""


@command.command("create")
@click.argument("name")
@click.option("--description", default="", help="Free text.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_ctx
def create(obj: CliContext, name: str, description: str, as_json: bool) -> None:
    """Create a project named NAME (lowercase letters, digits, '-'); prints its id."""
    from app.audit import system_actor
    from app.domain import projects

    doc = projects.create_project(obj.db(), name=name, description=description,
                                  actor=system_actor("cli"))
    if as_json:
        echo_json(doc)
        return
    click.echo(doc["_id"])


@command.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_ctx
def list_(obj: CliContext, as_json: bool) -> None:
    """List projects."""
    from app import db as dbm

    rows = list(obj.db()[dbm.PROJECTS].find().sort("name", 1))
    if as_json:
        echo_json(rows)
        return
    for row in rows:
        click.echo(f"{row['_id']}  {row['name']:<30} {row.get('description', '')}")
