"""``certautopilot alerts``: open alerts, test messages, channels."""

from __future__ import annotations

import sys
from typing import Any

import click

from app.cli.base import CliContext, echo_json, pass_ctx


def _project(db: Any, ident: str | None) -> str | None:
    from app.domain import projects

    return None if ident is None else str(projects.find_project(db, ident)["_id"])


@click.group("alerts")
def command() -> None:
    """Alerts: open alerts, test messages, channels (webhook, email)."""


@command.command("list")
@click.option("--all", "show_all", is_flag=True, help="Resolved alerts too.")
@click.option("--project", help="Only this project's alerts (id or name).")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 1000))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_ctx
def list_(obj: CliContext, show_all: bool, project: str | None, limit: int,
          as_json: bool) -> None:
    """Show open alerts (newest first)."""
    from app.ops.alerts import engine

    db = obj.db()
    rows = engine.list_alerts(db, project_id=_project(db, project),
                              state=None if show_all else engine.OPEN, limit=limit)
    if as_json:
        echo_json(rows)
        return
    if not rows:
        click.echo("no open alerts" if not show_all else "no alerts")
    for row in rows:
        threshold = f"[{row['threshold']}]" if row.get("threshold") else ""
        click.echo(f"{row['opened_at']:%Y-%m-%d %H:%M:%S}  {row['state']:<8} "
                   f"{row['rule']}{threshold}  {row['summary']}")


@command.command("test")
@click.argument("channel")
@click.option("--project", help="The project whose channel NAME is meant (id or name).")
@pass_ctx
def test(obj: CliContext, channel: str, project: str | None) -> None:
    """Send a test message to CHANNEL (id or name) now; exit 1 if it is not taken."""
    from app.audit import system_actor
    from app.ops.alerts import channels, engine

    db = obj.db()
    doc = channels.get_channel(db, channel, project_id=_project(db, project))
    result = engine.send_test(db, doc, system_actor("cli"), settings=obj.settings)
    click.echo(f"test message sent to {result['channel']} ({result['target']})")


@command.command("evaluate")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_ctx
def evaluate(obj: CliContext, as_json: bool) -> None:
    """Evaluate every alert rule now (what the scheduler does every 30 s)."""
    from app.audit import system_actor
    from app.ops.alerts import engine

    result = engine.evaluate(obj.db(), settings=obj.settings, actor=system_actor("cli"))
    if as_json:
        echo_json(result)
        return
    click.echo(f"opened {result['opened']}, resolved {result['resolved']}, "
               f"open {result['open']}")


@command.group("channels")
def channels_group() -> None:
    """Alert channels: add, list, remove."""


@channels_group.command("add")
@click.argument("name")
@click.option("--url", required=True,
              help="https://... (webhook), smtp://[user@]host[:587] (STARTTLS) or "
                   "smtps://[user@]host[:465] (TLS).")
@click.option("--project", help="The project (id or name).")
@click.option("--global", "is_global", is_flag=True, help="A global channel (all alerts).")
@click.option("--format", "fmt", type=click.Choice(["generic", "slack"]),
              help="Webhook body (default generic).")
@click.option("--secret-env", help="CAP_ALERT_* variable holding the webhook signing secret.")
@click.option("--secret-stdin", is_flag=True,
              help="Read the webhook signing secret from stdin (sealed under the KEK).")
@click.option("--password-env", help="CAP_ALERT_* variable holding the SMTP password.")
@click.option("--from", "sender", help="Email sender.")
@click.option("--to", "recipients", multiple=True, help="Email recipient (repeat).")
@click.option("--allow-http", is_flag=True, help="Allow a plain http:// webhook.")
@click.option("--ca-file", help="PEM file of CAs to trust for this channel.")
@click.option("--rule", "rules", multiple=True, help="Only these rules (repeat).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_ctx
def add(obj: CliContext, name: str, url: str, project: str | None, is_global: bool,
        fmt: str | None, secret_env: str | None, secret_stdin: bool,
        password_env: str | None, sender: str | None, recipients: tuple[str, ...],
        allow_http: bool, ca_file: str | None, rules: tuple[str, ...], as_json: bool) -> None:
    """Add an alert channel NAME; prints its id."""
    from app.audit import system_actor
    from app.errors import ValidationFailed
    from app.ops.alerts import channels, engine

    if is_global == bool(project):
        raise ValidationFailed("give --project P or --global (exactly one)")
    db = obj.db()
    spec: dict[str, Any] = {"name": name, "url": url}
    optional = {"format": fmt, "secret_env": secret_env, "password_env": password_env,
                "from": sender, "ca_file": ca_file}
    spec.update({k: v for k, v in optional.items() if v is not None})
    if secret_stdin:
        spec["secret"] = sys.stdin.readline().strip()
    if recipients:
        spec["to"] = list(recipients)
    if allow_http:
        spec["allow_http"] = True
    if rules:
        spec["rules"] = list(rules)
    doc = channels.create_channel(db, _project(db, project), spec, system_actor("cli"),
                                  rule_names=engine.RULES)
    if as_json:
        echo_json(channels.public_view(doc))
        return
    click.echo(doc["_id"])


@channels_group.command("list")
@click.option("--project", help="Only this project's channels, and the global ones.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_ctx
def list_channels(obj: CliContext, project: str | None, as_json: bool) -> None:
    """List alert channels with their delivery health."""
    from app.ops.alerts import channels

    db = obj.db()
    rows = [channels.public_view(d)
            for d in channels.list_channels(db, _project(db, project))]
    if as_json:
        echo_json(rows)
        return
    for row in rows:
        failure = row.get("failure") or {}
        health = f"failing x{failure.get('count')}: {failure.get('last_error')}" \
            if failure else "ok"
        scope = "global" if row["global"] else row["project_id"]
        click.echo(f"{row['id']}  {row['name']:<20} {scope:<20} {row['target']:<40} {health}")


@channels_group.command("remove")
@click.argument("channel")
@click.option("--project", help="The project whose channel NAME is meant (id or name).")
@pass_ctx
def remove(obj: CliContext, channel: str, project: str | None) -> None:
    """Remove an alert channel (its undelivered messages are dropped)."""
    from app.audit import system_actor
    from app.ops.alerts import channels

    db = obj.db()
    doc = channels.get_channel(db, channel, project_id=_project(db, project))
    channels.delete_channel(db, doc, system_actor("cli"))
    click.echo(f"removed {doc['_id']} ({doc['name']})")
