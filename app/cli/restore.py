"""``certautopilot restore``: verify a backup, then restore it into empty databases and
migrate it. The work is in ``app/ops/restore.py``; this module parses options, draws
progress bars on a terminal and prints the result (``--json`` for scripts). A refusal or
failure is one line on stderr and exit 1.
"""

from __future__ import annotations

from pathlib import Path

import click

from app.cli.base import CliContext, echo_json, pass_ctx, progress_bar


@click.command("restore")
@click.option("--from", "source", required=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="A backup directory (certautopilot backup, or plain mongodump output).")
@click.option("--drop", is_flag=True,
              help="Replace the target databases if they hold data (else refused).")
@click.option("--mongodump", is_flag=True,
              help="DIR is plain mongodump output (no manifest.json): restore it without "
                   "hash, count and chain-head checks.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_ctx
def command(obj: CliContext, source: Path, drop: bool, mongodump: bool, as_json: bool) -> None:
    """Verify a backup, then restore it into empty databases and migrate it."""
    from app.ops.restore import read_backup, run_restore

    files = 0
    manifest = source / "manifest.json"
    if manifest.exists():
        try:
            import json

            files = len(json.loads(manifest.read_text()).get("files", {}))
        except (OSError, ValueError, AttributeError):
            files = 0
    with progress_bar("verifying", not as_json, files) as bar:
        backup = read_backup(source, progress=bar.update, mongodump=mongodump)
    db = obj.db()
    with progress_bar("restoring", not as_json, backup.total) as bar:
        report = run_restore(db, obj.settings.broker_db, backup, drop=drop,
                             progress=bar.update)
    if as_json:
        echo_json(report)
        return
    for note in report["notes"]:
        click.echo(f"note: {note}")
    applied = report["migrations_applied"]
    checked = "hashes verified" if report["verified"] else "NOT verified: no manifest"
    click.echo(f"restored {report['documents']} documents into {report['database']} and "
               f"{report['broker_database']} ({checked}); "
               f"migrations applied: {applied or 'none'}; {report['seconds']:.1f}s")
    click.echo("next: start the roles with the KEK, then run certautopilot dr-test")
