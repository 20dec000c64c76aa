"""``certautopilot health``: what an operator checks before sleeping (and a DR drill
after a restore)."""

from __future__ import annotations

import sys

import click

from app.cli.base import CliContext, echo_json, pass_ctx


@click.command("health")
@click.option("--max-queued-age", type=click.FloatRange(min=1), default=300.0,
              show_default=True, metavar="SECONDS",
              help="Fail when the oldest due job has waited longer than this.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_ctx
def command(obj: CliContext, max_queued_age: float, as_json: bool) -> None:
    """Check the database, the KEK, audit sinks, the scheduler leader, live workers, the
    queue's oldest due job and every ACME directory in use.

    Exit codes: 0 every check passed; 1 a check failed (named on stderr); 2 a
    configuration or usage error.
    """
    from app.ops.health import operator_health

    healthy, detail = operator_health(obj.db(), obj.settings, max_queued_age=max_queued_age)
    if as_json:
        echo_json({"healthy": healthy, "checks": detail})
    else:
        for name, info in detail.items():
            flag = "ok  " if info.get("ok") else "FAIL"
            rest = ", ".join(f"{k}={v}" for k, v in info.items() if k != "ok")
            click.echo(f"{flag} {name}: {rest}")
    if not healthy:
        failing = [f"{name} ({info.get('error', 'failed')})" for name, info in detail.items()
                   if not info.get("ok")]
        click.echo("certautopilot: unhealthy: " + "; ".join(failing), err=True)
    sys.exit(0 if healthy else 1)
