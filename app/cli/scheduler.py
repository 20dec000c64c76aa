"""``certautopilot scheduler ...``: what the leader-elected scheduler is doing."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import click

from app.cli.base import CliContext, echo_json, pass_ctx


def _when(value: datetime | None) -> str:
    return f"{value:%Y-%m-%d %H:%M:%S} UTC" if value else "-"


def _seconds(value: float | None) -> str:
    if value is None:
        return ""
    return f"in {value:.1f}s" if value >= 0 else f"{-value:.1f}s overdue"


@click.group("scheduler")
def command() -> None:
    """Inspect the scheduler lease and the schedule."""


@command.command("status")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--fires", type=click.IntRange(0, 1000), default=0, show_default=True,
              help="Also list the last N fired slots.")
@pass_ctx
def status_command(obj: CliContext, as_json: bool, fires: int) -> None:
    """Lease holder, term, expiry, last renewal, and every entry with its next run."""
    from app.db.schedule import status

    result: dict[str, Any] = status(obj.db(), fires=fires)
    if as_json:
        echo_json(result)
        return
    lease = result["lease"]
    click.echo(f"lease:        {lease['state']}")
    click.echo(f"holder:       {lease['holder'] or '-'}")
    click.echo(f"term:         {lease['term']}")
    click.echo(f"expires:      {_when(lease['expires_at'])} {_seconds(lease['expires_in_s'])}")
    click.echo(f"last renewal: {_when(lease['renewed_at'])}")
    click.echo(f"acquired:     {_when(lease['acquired_at'])}")
    click.echo(f"server time:  {_when(lease['server_time'])}")
    click.echo("")
    entries = result["entries"]
    if not entries:
        click.echo("no schedule entries yet (the leader writes them on its first tick)")
    else:
        click.echo(f"{'entry':<32} {'kind':<28} {'every':>8} {'next run':<26} "
                   f"{'':<16} {'runs':>6}  last run")
        for row in entries:
            every = f"{row['every_seconds']:g}s" if row["every_seconds"] is not None \
                else "cron"
            click.echo(f"{row['name']:<32} {row['kind'] or '-':<28} {every:>8} "
                       f"{_when(row['next_run_at']):<26} {_seconds(row['next_run_in_s']):<16} "
                       f"{row['total_run_count']:>6}  {_when(row['last_run_at'])}")
    for fire in result.get("recent_fires", []):
        click.echo(f"fired {fire['entry']} slot {_when(fire['slot'])} term {fire['term']} "
                   f"by {fire['holder']} -> "
                   f"{'joined queued job' if fire.get('coalesced') else 'job'} {fire['job_id']}")
