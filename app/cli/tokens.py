"""``certautopilot tokens``: create (the first admin token comes from here), list,
revoke. The token is printed once, alone on stdout (details go to stderr), so
``TOKEN=$(certautopilot tokens create --admin)`` works."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import click

from app.cli.base import CliContext, echo_json, pass_ctx


def _when(value: Any) -> str:
    return f"{value:%Y-%m-%d %H:%M}" if isinstance(value, datetime) else "-"


@click.group("tokens")
def command() -> None:
    """API tokens: create (shown once), list, revoke."""


@command.command("create")
@click.option("--admin", is_flag=True, help="An admin token: no project, every permission.")
@click.option("--project", "project", metavar="ID_OR_NAME", help="The token's project.")
@click.option("--scopes", default="read,write", show_default=True,
              help="Comma-separated among read, write, keys:export.")
@click.option("--name", default="", help="A label to recognise the token by.")
@click.option("--expires-in-days", type=click.IntRange(1, 3650), default=None,
              help="Expire the token after this many days (default: never).")
@click.option("--json", "as_json", is_flag=True, help="Print the token and its metadata "
                                                      "as JSON.")
@pass_ctx
def create(obj: CliContext, admin: bool, project: str | None, scopes: str, name: str,
           expires_in_days: int | None, as_json: bool) -> None:
    """Create a token and print it once (it is stored only as a hash)."""
    from app.audit import system_actor
    from app.domain import projects, tokens

    if admin == bool(project):
        raise click.UsageError("give exactly one of --admin or --project")
    db = obj.db()
    project_id = None
    scope_list = ["admin"]
    if project:
        project_id = projects.find_project(db, project)["_id"]
        scope_list = [s.strip() for s in scopes.split(",") if s.strip()]
    doc, plaintext = tokens.create_token(db, project_id=project_id, scopes=scope_list,
                                         actor=system_actor("cli"), name=name,
                                         expires_in_days=expires_in_days)
    if as_json:
        echo_json({**doc, "token": plaintext})
        return
    click.echo(f"created {'admin ' if admin else ''}token {doc['_id']} "
               f"(scopes {','.join(doc['scopes'])}"
               + (f", project {project_id}" if project_id else "")
               + "); it is shown once, store it now:", err=True)
    click.echo(plaintext)


@command.command("list")
@click.option("--project", "project", metavar="ID_OR_NAME", help="Only this project's.")
@click.option("--all", "show_all", is_flag=True, help="Include revoked tokens.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_ctx
def list_(obj: CliContext, project: str | None, show_all: bool, as_json: bool) -> None:
    """List tokens (never the tokens themselves)."""
    from app import db as dbm
    from app.domain import projects

    db = obj.db()
    query: dict[str, Any] = {}
    if project:
        query["project_id"] = projects.find_project(db, project)["_id"]
    if not show_all:
        query["revoked_at"] = None
    rows = list(db[dbm.API_TOKENS].find(query, {"token_hash": 0, "request_key": 0})
                .sort("_id", 1))
    if as_json:
        echo_json(rows)
        return
    for row in rows:
        state = "revoked" if row.get("revoked_at") else "active"
        click.echo(f"{row['_id']}  {row.get('hint', ''):<12} {state:<8} "
                   f"{row.get('project_id') or '(admin)':<21} {','.join(row['scopes']):<22} "
                   f"last used {_when(row.get('last_used_at'))}  {row.get('name', '')}")


@command.command("revoke")
@click.argument("token_id")
@pass_ctx
def revoke(obj: CliContext, token_id: str) -> None:
    """Revoke a token by id (tok_...)."""
    from app.audit import system_actor
    from app.domain import tokens

    tokens.revoke_token(obj.db(), token_id, actor=system_actor("cli"))
    click.echo(f"revoked {token_id}", err=True)
