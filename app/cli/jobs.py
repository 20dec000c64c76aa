"""``certautopilot jobs``: inspect the durable queue, reap, retry dead jobs, cancel queued.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import click

from app.cli.base import CliContext, echo_json, pass_ctx


@click.group("jobs")
def command() -> None:
    """Durable background jobs: list, show, reap, retry a dead one, cancel a queued one."""


def _when(value: Any) -> str:
    return f"{value:%Y-%m-%d %H:%M:%S}" if isinstance(value, datetime) else "-"


def _public(job: dict[str, Any]) -> dict[str, Any]:
    """A job for display: the lease token is a fencing credential, so only its tail; an
    API request's idempotency reservation (``request_key``) is not shown."""
    shown = dict(job)
    shown.pop("request_key", None)
    lease = shown.get("lease")
    if isinstance(lease, dict) and lease.get("token"):
        shown["lease"] = {**lease, "token": "…" + str(lease["token"])[-6:]}
    if isinstance(shown.get("lease"), dict):
        shown["lease"].pop("txn", None)
    return shown


@command.command("reap")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_ctx
def reap_cmd(obj: CliContext, as_json: bool) -> None:
    """One reaper pass: requeue jobs whose lease lapsed, re-publish lost wake-ups."""
    from app.jobs import reap

    counts = reap(obj.db(), settings=obj.settings)
    if as_json:
        echo_json(counts)
    else:
        click.echo(f"requeued {counts['requeued']} lapsed job(s), {counts['dead']} dead, "
                   f"re-published {counts['republished']} wake-up(s) "
                   f"({counts['stale']} queued job(s) past their wake-up time)")


@command.command("list")
@click.option("--state", type=click.Choice(["queued", "running", "succeeded", "dead",
                                            "cancelled"]), help="Only jobs in this state.")
@click.option("--kind", help="Only jobs of this kind.")
@click.option("--project", "project_id", help="Only jobs of this project.")
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_ctx
def list_cmd(obj: CliContext, state: str | None, kind: str | None, project_id: str | None,
             limit: int, as_json: bool) -> None:
    """Jobs, newest first."""
    from app.jobs import list_jobs

    rows = list_jobs(obj.db(), state=state, kind=kind, project_id=project_id, limit=limit)
    if as_json:
        echo_json([_public(r) for r in rows])
        return
    if not rows:
        click.echo("no jobs")
        return
    click.echo(f"{'id':<24}  {'state':<9}  {'kind':<28} {'att':>3}  {'created':<19}  "
               "last error")
    for row in rows:
        error = str(row.get("last_error") or "")[:60]
        click.echo(f"{row['_id']:<24}  {row.get('state', '?'):<9}  "
                   f"{str(row.get('kind'))[:28]:<28} {row.get('attempts', 0):>3}  "
                   f"{_when(row.get('created_at')):<19}  {error}")


@command.command("show")
@click.argument("job_id")
@pass_ctx
def show_cmd(obj: CliContext, job_id: str) -> None:
    """One job with its history (JSON)."""
    from app.jobs import get_job

    echo_json(_public(get_job(obj.db(), job_id)))


@command.command("retry")
@click.argument("job_id")
@pass_ctx
def retry_cmd(obj: CliContext, job_id: str) -> None:
    """Put a dead job back in the queue with a fresh attempt budget (audited)."""
    from app.audit import system_actor
    from app.jobs import retry_dead

    job = retry_dead(obj.db(), job_id, actor=system_actor("cli"), settings=obj.settings)
    click.echo(f"job {job['_id']} ({job.get('kind')}) is queued again")


@command.command("cancel")
@click.argument("job_id")
@click.option("--reason", default="", help="Recorded in the job's history and the audit log.")
@pass_ctx
def cancel_cmd(obj: CliContext, job_id: str, reason: str) -> None:
    """Cancel a queued job (audited); a running job cannot be cancelled."""
    from app.audit import system_actor
    from app.jobs import cancel

    job = cancel(obj.db(), job_id, actor=system_actor("cli"), reason=reason)
    click.echo(f"job {job['_id']} ({job.get('kind')}) cancelled")


@command.command("depth")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_ctx
def depth_cmd(obj: CliContext, as_json: bool) -> None:
    """Queued jobs by kind and the age of the oldest due one."""
    from app.jobs import queue_depth

    depth = queue_depth(obj.db())
    if as_json:
        echo_json(depth)
        return
    click.echo(f"queued {depth['queued']} ({depth['due']} due), running {depth['running']}, "
               f"oldest due waited {depth['oldest_queued_age_seconds']:.1f}s")
    for kind, count in sorted(depth["by_kind"].items()):
        click.echo(f"  {kind:<32} {count:>6} ({depth['due_by_kind'].get(kind, 0)} due)")


@command.command("workers")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_ctx
def workers_cmd(obj: CliContext, as_json: bool) -> None:
    """Workers seen in the last day: host, pid, version, state, running jobs, last seen."""
    from app.jobs.workers import list_workers

    rows = list_workers(obj.db())
    if as_json:
        echo_json(rows)
        return
    if not rows:
        click.echo("no workers seen")
        return
    for row in rows:
        click.echo(f"{row['_id']:<32} {row.get('host')}:{row.get('pid')} "
                   f"v{row.get('version')} {row.get('state'):<8} "
                   f"seen {row.get('age_seconds')}s ago, running "
                   f"{len(row.get('running_jobs') or [])}: "
                   f"{', '.join(row.get('running_jobs') or []) or '-'}")
