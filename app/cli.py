"""The ``certautopilot`` management command.

Subcommand groups live beside the code they manage (``app/jobs/cli.py``, ...) and are
listed in ``COMMAND_MODULES``; each module exposes a click command or group named
``command``. Errors print one line and exit non-zero: 2 for configuration and usage,
1 for everything else.
"""

from __future__ import annotations

import importlib
import json
import sys
from typing import Any

import click

from app.config import Settings, load_or_exit
from app.errors import CertAutoPilotError

# Modules contributing a subcommand (attribute ``command``). Add new ones here.
COMMAND_MODULES: list[str] = [
    "app.scheduler_cli",
    "app.keys.cli",
    "app.projects_cli",
    "app.tokens_cli",
    "app.audit.cli",
    "app.jobs.cli",
    "app.alerts_cli",
    "app.endpoints_cli",
]


class CliContext:
    def __init__(self) -> None:
        self._settings: Settings | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = load_or_exit()
        return self._settings

    def db(self) -> Any:
        from app import db as dbm

        self.settings.require_mongo_uri()
        return dbm.get_db(self.settings)


pass_ctx = click.make_pass_decorator(CliContext, ensure=True)


def echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, default=str))


class CapGroup(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        from app.config import ConfigError

        try:
            return super().invoke(ctx)
        except ConfigError as exc:
            click.echo(f"certautopilot: configuration error: {exc}", err=True)
            sys.exit(2)
        except CertAutoPilotError as exc:
            click.echo(f"certautopilot: {exc.message}", err=True)
            sys.exit(1)


@click.group(cls=CapGroup)
@click.pass_context
def cli(ctx: click.Context) -> None:
    """CertAutoPilot: ACME certificates for many projects, kept renewed."""
    ctx.ensure_object(CliContext)
    settings = ctx.obj.settings
    from app.logs import setup_logging

    setup_logging(settings.log_level, settings.log_format)


@cli.command()
@click.option("--status", "show_status", is_flag=True, help="List migrations and whether applied.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_ctx
def migrate(obj: CliContext, show_status: bool, as_json: bool) -> None:
    """Apply every migration not yet applied (safe to run concurrently)."""
    from app import migrations

    db = obj.db()
    if show_status:
        rows = migrations.status(db)
        if as_json:
            echo_json(rows)
            return
        for row in rows:
            state = f"applied {row['applied_at']:%Y-%m-%d %H:%M:%S}" if row["applied_at"] \
                else "pending"
            click.echo(f"{row['version']:04d}  {state:<28} {row['description']}")
        return
    applied = migrations.migrate(db)
    click.echo(f"applied {len(applied)} migration(s): {applied}" if applied
               else "database is up to date")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_ctx
def health(obj: CliContext, as_json: bool) -> None:
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


@cli.command()
@pass_ctx
def dev(obj: CliContext) -> None:
    """Run the whole stack locally (embedded database unless CAP_MONGO_URI is set)."""
    from app.devserver import run_dev

    sys.exit(run_dev(obj.settings))


def _load_subcommands() -> None:
    for module_name in COMMAND_MODULES:
        module = importlib.import_module(module_name)
        cli.add_command(module.command)


_load_subcommands()


def main() -> None:
    load_or_exit()  # a bad CAP_* value stops here with one line naming it
    cli(prog_name="certautopilot")
