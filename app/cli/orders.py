"""``certautopilot orders``: ACME orders in flight or finished, with their steps."""

from __future__ import annotations

from datetime import datetime

import click

from app.cli.base import CliContext, echo_json, pass_ctx


def _when(value: object) -> str:
    return f"{value:%Y-%m-%d %H:%M:%S}" if isinstance(value, datetime) else "-"


@click.group("orders")
def command() -> None:
    """ACME orders: list, show."""


@command.command("list")
@click.option("--certificate", "certificate_id", help="Only this certificate's orders.")
@click.option("--project", metavar="ID_OR_NAME", help="Only this project's orders.")
@click.option("--state", help="Only orders in this state (e.g. pending, completed, invalid).")
@click.option("--limit", type=click.IntRange(1, 500), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_ctx
def list_cmd(obj: CliContext, certificate_id: str | None, project: str | None,
             state: str | None, limit: int, as_json: bool) -> None:
    """Orders, newest first: id, state, created, certificate, reason."""
    from app.domain import orders, projects

    project_id = None if project is None else str(projects.find_project(obj.db(),
                                                                         project)["_id"])
    rows = orders.list_orders(obj.db(), certificate_id=certificate_id, project_id=project_id,
                              state=state, limit=limit)
    if as_json:
        echo_json([orders.public_view(row) for row in rows])
        return
    for row in rows:
        click.echo(f"{row['_id']}  {row.get('state', '-'):<10} {_when(row.get('created_at'))}  "
                   f"{row.get('certificate_id', '-')}  {row.get('reason', '-')}")


@command.command("show")
@click.argument("order_id")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_ctx
def show_cmd(obj: CliContext, order_id: str, as_json: bool) -> None:
    """One order with every step it went through."""
    from app.domain import orders

    view = orders.public_view(orders.get(obj.db(), order_id))
    if as_json:
        echo_json(view)
        return
    history = view.pop("history", []) or []
    for key, value in view.items():
        if not isinstance(value, (dict, list)):
            click.echo(f"{key + ':':<18}{value if value not in (None, '') else '-'}")
    click.echo("steps:")
    for step in history:
        click.echo(f"  {_when(step.get('at'))}  {step.get('state')}"
                   + (f"  {step['detail']}" if step.get("detail") else ""))
