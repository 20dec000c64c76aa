"""``certautopilot kek``: rotate the KEK, follow a rotation, retire an old version."""

from __future__ import annotations

import sys
import time
from datetime import datetime
from typing import Any

import click

from app.cli.base import CliContext, echo_json, pass_ctx


def _keyring(obj: CliContext) -> Any:
    from app.keys.keyring import get_keyring

    return get_keyring(obj.settings, max_age=0)


def _bar(progress: float, width: int = 30) -> str:
    filled = int(round(progress * width))
    return "[" + "#" * filled + "-" * (width - filled) + f"] {progress * 100:5.1f}%"


def _when(value: Any) -> str:
    return f"{value:%Y-%m-%d %H:%M:%S} UTC" if isinstance(value, datetime) else "-"


def _print_status(info: dict[str, Any]) -> None:
    active = info["active_version"]
    keyring = info["keyring"]
    click.echo(f"active KEK: {'v' + str(active) if active else 'unknown'}"
               + (f"   keyring: {', '.join(f'v{v}' for v in keyring['versions'])} "
                  f"({keyring['source']})" if keyring else "   keyring: unavailable"))
    per_version = ", ".join(f"v{v}: {n}" for v, n in info["keys_by_version"].items()) or "none"
    click.echo(f"keys: {info['total_keys']} ({per_version})")
    if info["retired_versions"]:
        click.echo("retired: " + ", ".join(f"v{v}" for v in info["retired_versions"]))
    rotation = info["rotation"]
    if rotation is None:
        click.echo("rotation: none recorded")
        return
    click.echo(f"rotation {rotation['id']} to v{rotation['target_version']}: "
               f"{rotation['state']}, started {_when(rotation['started_at'])}"
               + (f", finished {_when(rotation['finished_at'])}"
                  if rotation["finished_at"] else ""))
    click.echo(f"{_bar(rotation['progress'])}  {rotation['rewrapped']}/{rotation['total']} "
               f"keys re-wrapped, {rotation['remaining']} remaining")
    if rotation["failed"]:
        click.echo(f"{rotation['failed']} key(s) could not be re-wrapped (integrity errors, "
                   "flagged with rewrap_error); they still use the old KEK")
    if rotation["last_error"]:
        click.echo(f"last error: {rotation['last_error']}")


@click.group("kek")
def command() -> None:
    """Key-encryption key: rotate, follow a rotation, retire an old version."""


@command.command()
@click.option("--to", "to_version", type=click.IntRange(min=1), required=True,
              help="KEK version to re-wrap every key under (its v<N>.key must be installed).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_ctx
def rotate(obj: CliContext, to_version: int, as_json: bool) -> None:
    """Record a rotation; the scheduler's steps then re-wrap every DEK under --to."""
    from app.audit import system_actor
    from app.keys.rotation import start_rotation

    doc = start_rotation(obj.db(), to_version, keyring=_keyring(obj),
                         actor=system_actor("cli"))
    if as_json:
        echo_json({"rotation_id": doc["_id"], "target_version": doc["target_version"],
                   "keys": doc["total"], "state": doc["state"]})
        return
    click.echo(f"rotation {doc['_id']} to v{to_version} recorded: {doc['total']} key(s) to "
               f"re-wrap; new keys are sealed under v{to_version} from now on. Follow it "
               "with `certautopilot kek status --watch`.")


@command.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--watch", is_flag=True, help="Show a live progress bar until the rotation ends.")
@click.option("--interval", type=click.FloatRange(min=0.1), default=2.0, show_default=True,
              help="Seconds between refreshes with --watch.")
@pass_ctx
def status(obj: CliContext, as_json: bool, watch: bool, interval: float) -> None:
    """Active KEK, keys per KEK version, and the rotation's progress."""
    from app.keys.errors import KeyUnavailable
    from app.keys.rotation import status as rotation_status

    db = obj.db()
    try:
        keyring = _keyring(obj)
    except KeyUnavailable as exc:
        click.echo(f"warning: {exc.message}", err=True)
        keyring = None
    info = rotation_status(db, keyring)
    if as_json:
        echo_json(info)
        return
    rotation = info["rotation"]
    if watch and rotation is not None and rotation["state"] == "running":
        scale = 1000
        label = f"re-wrapping under v{rotation['target_version']}"
        with click.progressbar(length=scale, label=label, show_percent=True,
                               file=sys.stdout) as bar:
            shown = 0
            while True:
                info = rotation_status(db, keyring)
                current = info["rotation"]
                target = int(current["progress"] * scale)
                if target > shown:
                    bar.update(target - shown)
                    shown = target
                if current["id"] != rotation["id"] or current["state"] != "running":
                    break
                time.sleep(interval)
    _print_status(info)
    if info["rotation"] and info["rotation"]["failed"]:
        sys.exit(1)


@command.command()
@click.argument("version", type=click.IntRange(min=1))
@pass_ctx
def retire(obj: CliContext, version: int) -> None:
    """Retire KEK VERSION; refused while any key still uses it."""
    from app.audit import system_actor
    from app.keys.errors import KeyUnavailable
    from app.keys.rotation import retire_version

    try:
        keyring = _keyring(obj)
    except KeyUnavailable:
        keyring = None
    retire_version(obj.db(), version, keyring=keyring, actor=system_actor("cli"))
    click.echo(f"KEK v{version} retired: no key uses it; remove v{version}.key from every pod "
               "(keep its backup as long as old database backups need it).")
