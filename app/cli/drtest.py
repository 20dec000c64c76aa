"""``certautopilot dr-test``: the quarterly DR drill on a restored cluster. The work is in
``app/ops/drtest.py``; this module parses options and prints each step as it ends
(``--json`` for scripts). Exit 0 only when every step passed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from app.cli.base import CliContext, echo_json, pass_ctx


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
def command(obj: CliContext, directory: str, project: str, names: tuple[str, ...],
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
