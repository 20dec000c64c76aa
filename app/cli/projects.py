"""``certautopilot projects``: create and list projects."""

from __future__ import annotations

import click

from app.cli.base import CliContext, echo_json, pass_ctx


@click.group("projects")
def command() -> None:
    """Projects (tenants): create, list, delete."""


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


@command.command("delete")
@click.argument("project", metavar="ID_OR_NAME")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@pass_ctx
def delete(obj: CliContext, project: str, yes: bool) -> None:
    """Delete an empty project and revoke its tokens (refused while it owns certificates
    or ACME accounts)."""
    from app.audit import system_actor
    from app.domain import projects

    db = obj.db()
    doc = projects.find_project(db, project)
    if not yes:
        click.confirm(f"Delete project {doc['name']} ({doc['_id']}) and revoke its tokens?",
                      abort=True)
    projects.delete_project(db, str(doc["_id"]), actor=system_actor("cli"))
    click.echo(f"deleted {doc['_id']}")
