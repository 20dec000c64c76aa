"""``certautopilot backup``: both databases at one point in time, in mongodump's layout
with a manifest. The work is in ``app/ops/backup.py``; this module parses options, draws
a progress bar on a terminal and prints the result (``--json`` for scripts). A refusal or
failure is one line on stderr and exit 1.
"""

from __future__ import annotations

from pathlib import Path

import click

from app.cli.base import CliContext, echo_json, pass_ctx, progress_bar


def _tool_version() -> str:
    from app.jobs.workers import app_version

    return app_version()


@click.command("backup")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory to create (absent or empty): mongodump's layout + manifest.json.")
@click.option("--gzip", "gzipped", is_flag=True, help="Gzip each file (as mongodump --gzip).")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
@pass_ctx
def command(obj: CliContext, out: Path, gzipped: bool, as_json: bool) -> None:
    """Back up the application and broker databases at one point in time."""
    from app.ops.backup import check_target, plan, run_backup

    check_target(out)
    db = obj.db()
    the_plan = plan(db, obj.settings.broker_db)
    with progress_bar("backing up", not as_json, the_plan.estimate) as bar:
        manifest = run_backup(db, obj.settings.broker_db, out, gzipped=gzipped,
                              progress=bar.update, the_plan=the_plan,
                              tool_version=_tool_version())
    if as_json:
        echo_json({"out": str(out.absolute()), **manifest})
        return
    head = manifest["audit_head"] or {}
    click.echo(f"backup written to {out}: {manifest['documents']} documents in "
               f"{len(manifest['collections'])} collections, migration "
               f"{manifest['migration_version']}, audit head seq {head.get('seq', 0)}, "
               f"{manifest['seconds']:.1f}s")
    for name, reason in manifest["skipped"].items():
        click.echo(f"  {name}: {reason}")
