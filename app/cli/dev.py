"""``certautopilot dev``: the whole stack on one machine, from a checkout.

The supervisor and the embedded database live in the top-level ``devstack`` package,
which is not part of the installed runtime (nor of the image); this command only finds
it. ``scripts/run`` runs ``python -m devstack`` directly.
"""

from __future__ import annotations

import importlib
import sys

import click

from app.cli.base import CliContext, pass_ctx


@click.command("dev")
@click.option("--ca", type=click.Choice(["auto", "pebble", "none"]), default="auto",
              show_default=True,
              help="Start a local test CA (Debian's pebble) with a 'demo' project on it; "
                   "auto: when pebble is installed and CAP_ACME_DIRECTORY_URL is unset.")
@pass_ctx
def command(obj: CliContext, ca: str) -> None:
    """Run the whole stack locally (embedded database unless CAP_MONGO_URI is set)."""
    try:
        server = importlib.import_module("devstack.server")
    except ModuleNotFoundError:
        click.echo("certautopilot: 'dev' runs from a source checkout only: use scripts/run "
                   "there (the installed package and the image have no dev stack)", err=True)
        sys.exit(2)
    sys.exit(server.run_dev(obj.settings, ca=ca))
