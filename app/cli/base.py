"""What every command group shares: the lazily loaded settings and database, JSON output,
and the group class that turns expected errors into one line and an exit code."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from app.config import ConfigError, Settings, load_or_exit
from app.errors import CertAutoPilotError

# Written by `certautopilot dev` (devstack/bootstrap.py) under its data directory.
DEV_ENV_FILE = "dev.env"


def adopt_dev_environment(environ: MutableMapping[str, str] = os.environ) -> Path | None:
    """With CAP_MONGO_URI unset, take the CAP_* settings of a running dev stack from
    ``$CAP_DATA_DIR/dev.env`` (default ``.certautopilot/dev.env`` in the working
    directory), so the CLI run from a checkout reaches it without exports. Values already
    in the environment win; nothing happens when the file is absent (production)."""
    if environ.get("CAP_MONGO_URI"):
        return None
    path = Path(environ.get("CAP_DATA_DIR") or ".certautopilot") / DEV_ENV_FILE
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        key, sep, value = line.partition("=")
        if sep and key.startswith("CAP_") and not line.startswith("#"):
            environ.setdefault(key.strip(), value.strip())
    return path


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


class _NoBar:
    length: int | None = None

    def update(self, n: int) -> None:
        pass


@contextmanager
def progress_bar(label: str, enabled: bool, length: int | None = None) -> Iterator[Any]:
    """A progress bar on stderr when it is a terminal (and ``enabled``, i.e. not --json);
    otherwise an updater that does nothing, so scripts and logs get no control codes."""
    if not enabled or not sys.stderr.isatty():
        yield _NoBar()
        return
    with click.progressbar(length=length or 0, label=label, file=sys.stderr, show_pos=True,
                           show_eta=True) as bar:
        yield bar


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
