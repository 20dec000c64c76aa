"""``certautopilot audit``: verify the hash chain, show and run forwarding to sinks."""

from __future__ import annotations

import sys
from typing import Any

import click

from app.cli.base import CliContext, echo_json, pass_ctx


@click.group("audit")
def command() -> None:
    """The tamper-evident audit log: verify it, see its sinks."""


@command.command("verify")
@click.option("--from", "from_seq", type=click.IntRange(min=1), default=1, show_default=True,
              help="Start at this seq (trusting its prev_hash) instead of the beginning.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--allow-unkeyed-prefix", is_flag=True,
              help="With CAP_AUDIT_HMAC_KEY set, accept plain SHA-256 entries written before "
                   "the first HMAC entry (a chain older than the key).")
@click.option("--file", "copy", type=click.Path(exists=True, dir_okay=False),
              help="Check a forwarded copy (JSON lines, e.g. the file sink or a SIEM export) "
                   "instead of the database.")
@pass_ctx
def verify(obj: CliContext, from_seq: int, as_json: bool, allow_unkeyed_prefix: bool,
           copy: str | None) -> None:
    """Walk the hash chain; exit 0 only when it is intact.

    Names the first broken seq and what happened: edited, deleted, inserted, reordered.
    """
    from app import db as dbm
    from app.audit.log import CHAIN_ID
    from app.audit.verify import verify_chain, verify_copy

    if copy is not None:
        if from_seq != 1:
            raise click.UsageError("--from applies to the database, not to --file")
        with open(copy, encoding="utf-8") as handle:
            total = sum(1 for _ in handle)
        with open(copy, encoding="utf-8") as handle, click.progressbar(
                length=total, label="verifying audit copy", file=sys.stderr, show_pos=True,
                show_eta=True) as bar:
            result = verify_copy(handle, allow_unkeyed_prefix=allow_unkeyed_prefix,
                                 progress=bar.update)
    else:
        db = obj.db()
        head = dbm.primary(db)[dbm.COUNTERS].find_one({"_id": CHAIN_ID}) or {}
        total = max(0, int(head.get("seq", 0)) - from_seq + 1)
        with click.progressbar(length=total, label="verifying audit chain", file=sys.stderr,
                               show_pos=True, show_eta=True) as bar:
            result = verify_chain(db, from_seq=from_seq,
                                  allow_unkeyed_prefix=allow_unkeyed_prefix,
                                  progress=bar.update)
    if as_json:
        echo_json(result.as_dict())
    else:
        span = (f"seq {result.from_seq}..{result.last_seq}" if result.last_seq is not None
                else "no entries")
        rate = f", {result.entries_per_second:,.0f} entries/s" if result.checked else ""
        for note in result.notes:
            click.echo(f"note: {note}")
        if result.unkeyed:
            click.echo(f"note: {result.unkeyed} entries before the first HMAC entry are "
                       "plain SHA-256 (accepted by --allow-unkeyed-prefix)")
        if result.intact:
            click.echo(f"audit chain intact: {result.checked} entries checked ({span}) in "
                       f"{result.seconds:.2f}s{rate}")
        else:
            assert result.problem is not None
            click.echo(f"audit chain BROKEN at seq {result.problem.seq}: "
                       f"{result.problem.kind}: {result.problem.message}")
            click.echo(f"{result.checked} entries before it are intact ({span})")
    sys.exit(0 if result.intact else 1)


def _fmt(value: Any) -> str:
    return "-" if value is None else (value.isoformat() if hasattr(value, "isoformat")
                                      else str(value))


@command.command("sinks")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_ctx
def sinks(obj: CliContext, as_json: bool) -> None:
    """Show each configured sink (CAP_AUDIT_SINKS): status, cursor, lag, last error."""
    from app.audit.status import sink_status

    rows = sink_status(obj.db(), obj.settings.audit_sinks)
    if as_json:
        echo_json(rows)
        return
    if not rows:
        click.echo("no audit sinks configured (CAP_AUDIT_SINKS)")
        return
    for row in rows:
        click.echo(f"{row['status']:<9} {row['name']}  target={row['target']} "
                   f"cursor={row['cursor']} lag={row['lag']} delivered={row['delivered']} "
                   f"failing_since={_fmt(row['failing_since'])} "
                   f"last_error={row['last_error'] or '-'}")
