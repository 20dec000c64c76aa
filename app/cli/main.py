"""The ``certautopilot`` management command: the root group and its command list.

Each command group is one module of this package exposing a click command or group named
``command``; ``COMMANDS`` lists them explicitly. Errors print one line and exit
non-zero: 2 for configuration and usage, 1 for everything else.
"""

from __future__ import annotations

import click

from app.cli import (
    accounts,
    alerts,
    audit,
    backup,
    ca,
    certs,
    dev,
    dns,
    drtest,
    endpoints,
    health,
    jobs,
    kek,
    migrate,
    orders,
    probe,
    projects,
    renewals,
    restore,
    scheduler,
    tokens,
)
from app.cli.base import CapGroup, CliContext, adopt_dev_environment
from app.config import load_or_exit

COMMANDS: list[click.Command] = [
    migrate.command,
    health.command,
    dev.command,
    certs.command,
    accounts.command,
    orders.command,
    scheduler.command,
    kek.command,
    projects.command,
    tokens.command,
    audit.command,
    jobs.command,
    dns.command,
    probe.command,
    ca.command,
    renewals.command,
    backup.command,
    restore.command,
    drtest.command,
    alerts.command,
    endpoints.command,
]


@click.group(cls=CapGroup)
@click.pass_context
def cli(ctx: click.Context) -> None:
    """CertAutoPilot: ACME certificates for many projects, kept renewed."""
    ctx.ensure_object(CliContext)
    settings = ctx.obj.settings
    from app.logs import setup_logging

    setup_logging(settings.log_level, settings.log_format)


for _command in COMMANDS:
    cli.add_command(_command)


def main() -> None:
    adopt_dev_environment()
    load_or_exit()  # a bad CAP_* value stops here with one line naming it
    cli(prog_name="certautopilot")
