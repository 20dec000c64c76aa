"""``certautopilot health``: every readiness check, for an operator or a DR drill."""

from __future__ import annotations

import sys

import click

from app.cli.base import CliContext, echo_json, pass_ctx


@click.command("health")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_ctx
def command(obj: CliContext, as_json: bool) -> None:
    """Check the database and every readiness check; exit 1 if any fails."""
    from app.health import readiness

    ready, detail = readiness(obj.db())
    if as_json:
        echo_json({"ready": ready, "checks": detail})
    else:
        for name, info in detail.items():
            flag = "ok  " if info.get("ok") else "FAIL"
            rest = ", ".join(f"{k}={v}" for k, v in info.items() if k != "ok")
            click.echo(f"{flag} {name}: {rest}")
    sys.exit(0 if ready else 1)
