"""``certautopilot probe worker|scheduler``: exec probes for the roles without HTTP.

Reads only the state file the process in the same container keeps (app/probes.py):
no database call, so a probe is cheap and cannot hang. Exit 0 and one line on success;
one line on stderr and exit 1 when the process is stuck, gone or cut off from the
database.
"""

from __future__ import annotations

import sys

import click

from app.cli.base import CliContext, echo_json, pass_ctx


@click.command("probe")
@click.argument("role", type=click.Choice(["worker", "scheduler"]))
@click.option("--max-age", type=click.FloatRange(min=1.0), default=None,
              help="Seconds the recorded loop and database contact may be old "
                   "(default: three loop periods, at least 30).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_ctx
def command(obj: CliContext, role: str, max_age: float | None, as_json: bool) -> None:
    """Whether this container's worker or scheduler is alive and reaching the database."""
    from app.probes import ProbeFailed, check

    try:
        state = check(obj.settings, role, max_age)
    except ProbeFailed as exc:
        click.echo(f"certautopilot: probe {role} failed: {exc}", err=True)
        sys.exit(1)
    if as_json:
        echo_json(state)
        return
    click.echo(f"ok: {role} {state['pid']} {state.get('detail') or ''} loop "
               f"{state['tick_age_seconds']}s ago, database {state['ok_age_seconds']}s ago")
