"""``certautopilot accounts``: the ACME accounts (per project and CA directory)."""

from __future__ import annotations

from typing import Any

import click

from app.cli.base import CliContext, echo_json, pass_ctx


def _project_id(obj: CliContext, project: str | None) -> str | None:
    from app.domain import projects

    return None if project is None else str(projects.find_project(obj.db(), project)["_id"])


def _public(doc: dict[str, Any]) -> dict[str, Any]:
    from app.domain.accounts import public_view

    view = public_view(doc)
    view.pop("key_id", None)  # a reference to the sealed key; nothing an operator uses
    return view


@click.group("accounts")
def command() -> None:
    """ACME accounts: list, show."""


@command.command("list")
@click.option("--project", metavar="ID_OR_NAME", help="Only this project's accounts.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_ctx
def list_cmd(obj: CliContext, project: str | None, as_json: bool) -> None:
    """Accounts, oldest first: id, status, project, name, directory."""
    from app.domain import accounts

    rows = accounts.list_accounts(obj.db(), _project_id(obj, project))
    if as_json:
        echo_json([_public(row) for row in rows])
        return
    for row in rows:
        click.echo(f"{row['_id']}  {row.get('status', '-'):<11} {row['project_id']:<21} "
                   f"{row.get('name', '-'):<16} {row.get('directory_url')}")


@command.command("show")
@click.argument("account_id")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_ctx
def show_cmd(obj: CliContext, account_id: str, as_json: bool) -> None:
    """One account: directory, account URL, contact, terms, EAB kid, last error."""
    from app.domain import accounts

    view = _public(accounts.get_account(obj.db(), account_id))
    if as_json:
        echo_json(view)
        return
    for key, value in view.items():
        click.echo(f"{key + ':':<16}{value if value not in (None, '', []) else '-'}")
