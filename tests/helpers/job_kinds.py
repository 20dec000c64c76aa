"""Job kinds for tests only. A worker loads them when started with
``CAP_EXTRA_HANDLER_MODULES=tests.helpers.job_kinds``.

- ``test.noop``: returns ``{"ok": True}``.
- ``test.ledger``: writes one ``ledger`` row in the same fenced transaction that
  completes the job (no unique index: a duplicate run would show as a second row).
- ``test.ledger``'s payload may hold ``delay`` (seconds to wait first, checking the
  lease), so that kills land inside handlers.
- ``test.sleep``: records that it started (``job_markers``), sleeps ``seconds`` on its
  first run (``then_seconds`` on later ones) in small steps checking its lease, then
  writes its ledger row like ``test.ledger``. (First/later: by the runs recorded in
  ``job_markers``, since a released job gives its attempt back.) With ``unchecked`` it
  sleeps without looking at its lease and writes through the store's fenced transaction
  directly, so only the server's fence can refuse it.
- ``test.raise``: always raises; fast backoff, 3 attempts.
- ``test.retry_later``: asks to be retried ``times`` times, then succeeds.
- ``test.permanent``: raises PermanentFailure.
- ``test.validated``: needs ``payload["name"]`` to be a string.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

from pymongo.client_session import ClientSession

from app.jobs import JobContext, PermanentFailure, RetryLater, lifecycle, register_handler

LEDGER = "ledger"
MARKERS = "job_markers"


def _ledger_row(ctx: JobContext) -> dict[str, Any]:
    return {"job_id": ctx.job_id, "n": ctx.payload.get("n"), "attempt": ctx.attempt,
            "worker": ctx.worker}


@register_handler("test.noop")
def noop(ctx: JobContext) -> dict[str, Any]:
    return {"ok": True}


@register_handler("test.ledger")
def ledger(ctx: JobContext) -> dict[str, Any] | None:
    delay = float(ctx.payload.get("delay", 0))
    if delay:
        time.sleep(delay)
        ctx.check_lease()

    def write(session: ClientSession) -> dict[str, Any]:
        ctx.db[LEDGER].insert_one(_ledger_row(ctx), session=session)
        return {"written": True}

    return ctx.transaction(write, complete=True)


@register_handler("test.sleep")
def sleep(ctx: JobContext) -> dict[str, Any] | None:
    runs = ctx.db[MARKERS].count_documents({"job_id": ctx.job_id})
    ctx.db[MARKERS].insert_one({"job_id": ctx.job_id, "pid": os.getpid(),
                                "host": socket.gethostname(), "attempt": ctx.attempt,
                                "token": ctx.lease_token, "worker": ctx.worker})
    seconds = float(ctx.payload.get("seconds", 1.0))
    if runs:
        seconds = float(ctx.payload.get("then_seconds", seconds))
    unchecked = bool(ctx.payload.get("unchecked"))
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.05)
        if not unchecked:
            ctx.check_lease()

    def write(session: ClientSession) -> dict[str, Any]:
        ctx.db[LEDGER].insert_one(_ledger_row(ctx), session=session)
        return {"slept": seconds}

    if unchecked:
        return lifecycle.fenced_transaction(ctx.db, ctx.job_id, ctx.lease_token, write,
                                        complete=True, worker=ctx.worker)
    return ctx.transaction(write, complete=True)


@register_handler("test.raise", max_attempts=3, backoff_base_seconds=0.2,
                  backoff_max_seconds=1.0)
def always_raise(ctx: JobContext) -> None:
    raise RuntimeError(f"boom on attempt {ctx.attempt}")


@register_handler("test.retry_later", max_attempts=1)
def retry_later(ctx: JobContext) -> dict[str, Any]:
    done = ctx.db[MARKERS].count_documents({"job_id": ctx.job_id})
    ctx.db[MARKERS].insert_one({"job_id": ctx.job_id, "attempt": ctx.attempt})
    if done < int(ctx.payload.get("times", 1)):
        raise RetryLater(0.2, f"not ready yet ({done})")
    return {"runs": done + 1}


@register_handler("test.permanent")
def permanent(ctx: JobContext) -> None:
    raise PermanentFailure("the certificate was deleted")


def _needs_name(payload: dict[str, Any]) -> None:
    if not isinstance(payload.get("name"), str):
        raise ValueError("payload.name must be a string")


@register_handler("test.validated", validate=_needs_name)
def validated(ctx: JobContext) -> dict[str, Any]:
    return {"hello": ctx.payload["name"]}
