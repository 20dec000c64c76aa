"""``certautopilot backup | restore | dr-test``: top-level commands (``commands``).

The work is in ``app/ops/``; this module parses options, draws progress bars on a
terminal and prints the result (``--json`` for scripts). Every refusal or failure is one
line on stderr and exit 1.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from app.cli import CliContext, echo_json, pass_ctx


@contextmanager
def _progress(label: str, enabled: bool, length: int | None = None) -> Iterator[Any]:
    """A progress bar on stderr when it is a terminal; a no-op updater otherwise."""
    if not enabled or not sys.stderr.isatty():
        class _Nothing:
            length: int | None = None

            def update(self, n: int) -> None:
                pass

        yield _Nothing()
        return
    with click.progressbar(length=length or 0, label=label, file=sys.stderr, show_pos=True,
                           show_eta=True) as bar:
        yield bar


def _tool_version() -> str:
    from app.jobs.workers import app_version

    return app_version()


@click.command("backup")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory to create (absent or empty): mongodump's layout + manifest.json.")
@click.option("--gzip", "gzipped", is_flag=True, help="Gzip each file (as mongodump --gzip).")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
@pass_ctx
def backup(obj: CliContext, out: Path, gzipped: bool, as_json: bool) -> None:
    """Back up the application and broker databases at one point in time."""
    from app.ops.backup import check_target, plan, run_backup

    check_target(out)
    db = obj.db()
    the_plan = plan(db, obj.settings.broker_db)
    with _progress("backing up", not as_json, the_plan.estimate) as bar:
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
def restore(obj: CliContext, source: Path, drop: bool, mongodump: bool, as_json: bool) -> None:
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
    with _progress("verifying", not as_json, files) as bar:
        backup = read_backup(source, progress=bar.update, mongodump=mongodump)
    db = obj.db()
    with _progress("restoring", not as_json, backup.total) as bar:
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


@click.command("dr-test")
@click.option("--directory", required=True,
              help="ACME directory URL of the test CA (Let's Encrypt staging, Pebble).")
@click.option("--project", default="dr-fixture", show_default=True,
              help="The fixture project (name or id) that issues the test certificate.")
@click.option("--name", "names", multiple=True,
              help="DNS name(s) of the test certificate; default: the names of the fixture "
                   "project's last issued http-01 certificate.")
@click.option("--api-url", default=None,
              help="The running api (default http://CAP_API_BIND).")
@click.option("--token-env", default=None, metavar="VAR",
              help="Environment variable holding an API token of the fixture project "
                   "(default: mint a one-day token for the run and revoke it after).")
@click.option("--manifest", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="manifest.json to compare the audit chain head with (default: the one "
                   "recorded by certautopilot restore).")
@click.option("--timeout", default=300.0, show_default=True, type=click.FloatRange(min=1),
              help="Seconds to wait for the test certificate.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_ctx
def dr_test(obj: CliContext, directory: str, project: str, names: tuple[str, ...],
            api_url: str | None, token_env: str | None, manifest: Path | None,
            timeout: float, as_json: bool) -> None:
    """The quarterly DR drill on a restored cluster; exit 0 only if every step passes."""
    from app.ops.drtest import DrOptions, Step, run_dr_test

    if not directory.startswith("https://"):
        raise click.UsageError("--directory must be the https:// URL of an ACME directory")
    token = None
    if token_env:
        token = os.environ.get(token_env)
        if not token:
            raise click.UsageError(f"--token-env {token_env}: the variable is not set")

    def show(step: Step) -> None:
        if not as_json:
            flag = "ok  " if step.ok else "skip" if step.skipped else "FAIL"
            click.echo(f"{flag} {step.name:<7} {step.seconds:7.2f}s  {step.message}")

    report = run_dr_test(obj.db(), obj.settings, DrOptions(
        directory=directory, project=project, names=list(names), api_url=api_url,
        token=token, manifest=manifest, timeout=timeout), on_step=show)
    if as_json:
        echo_json(report)
    elif report["ok"]:
        click.echo(f"dr-test passed: every step ok in {report['seconds']:.1f}s")
    else:
        click.echo(f"dr-test FAILED at step {report['failed_step']}", err=True)
    sys.exit(0 if report["ok"] else 1)


commands = [backup, restore, dr_test]
