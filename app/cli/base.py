"""What every command group shares: the lazily loaded settings and database, JSON output,
and the group class that turns expected errors into one line and an exit code."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from app.config import ConfigError, Settings, load_or_exit
from app.errors import CertAutoPilotError


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
    """Exit 2 for configuration errors, 1 for every other expected error, one line each."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ConfigError as exc:
            click.echo(f"certautopilot: configuration error: {exc}", err=True)
            sys.exit(2)
        except CertAutoPilotError as exc:
            click.echo(f"certautopilot: {exc.message}", err=True)
            sys.exit(1)
