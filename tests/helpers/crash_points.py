"""Crash points for the kill -9 tests of resumable orders, applied from outside the
runtime code by wrapping two steps of ``app.domain.issuance.IssuanceRun``:

- ``order_unsaved``: right after newOrder's answer arrives, before its URL is saved
  (the CA has an order we do not know);
- ``order_stored``: right after newOrder's answer (the order URL) is saved;
- ``challenge_answered``: right after the first challenge answer is saved.

In a worker: ``CAP_EXTRA_HANDLER_MODULES=tests.helpers.crash_points`` with
``CAP_TEST_CRASH_AT=order_stored`` (or ``challenge_answered``; a comma-separated list is
allowed) makes the worker SIGKILL its whole process group at that point, exactly once per
database: the first process to reach it inserts a marker document into
``test_crash_markers``; every later one (the peer that resumes the order) finds the
marker and carries on. In-process tests call ``install`` with a hook that raises.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from pymongo.database import Database
from pymongo.errors import DuplicateKeyError

from app.domain.issuance import IssuanceRun

log = logging.getLogger(__name__)

ENV = "CAP_TEST_CRASH_AT"
MARKERS = "test_crash_markers"
POINTS = ("order_unsaved", "order_stored", "challenge_answered")

Hook = Callable[[Database[dict[str, Any]], str], None]


def kill_once(db: Database[dict[str, Any]], point: str) -> None:
    """SIGKILL this worker's process group at ``point`` if CAP_TEST_CRASH_AT names it and
    no process crashed there before."""
    wanted = os.environ.get(ENV, "")
    if not wanted or point not in {p.strip() for p in wanted.split(",")}:
        return
    try:
        db[MARKERS].insert_one({"_id": point, "pid": os.getpid()})
    except DuplicateKeyError:
        return  # already crashed once here: this is the peer resuming
    log.warning("TEST HOOK: killing this worker right after %s (CAP_TEST_CRASH_AT)", point)
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stderr.flush()
    try:
        os.killpg(os.getpgrp(), signal.SIGKILL)
    finally:
        os.kill(os.getpid(), signal.SIGKILL)


def install(hook: Hook, setattr_: Callable[[Any, str, Any], None] = setattr) -> None:
    """Make ``IssuanceRun`` call ``hook(db, point)`` right after each crash point's step
    is saved (``setattr_``: pytest's ``monkeypatch.setattr`` to undo it after a test)."""
    new_order = IssuanceRun._new_order
    save_new_order = IssuanceRun._save_new_order
    save_authorization = IssuanceRun._save_authorization

    def _save_new_order(self: IssuanceRun, order: Any, state: Any) -> Any:
        hook(self.db, "order_unsaved")
        return save_new_order(self, order, state)

    def _new_order(self: IssuanceRun, order: Any, client: Any) -> Any:
        state = new_order(self, order, client)
        hook(self.db, "order_stored")
        return state

    def _save_authorization(self: IssuanceRun, order: Any, url: str, entry: Any) -> None:
        save_authorization(self, order, url, entry)
        if entry.get("status") == "answered":
            hook(self.db, "challenge_answered")

    setattr_(IssuanceRun, "_new_order", _new_order)
    setattr_(IssuanceRun, "_save_new_order", _save_new_order)
    setattr_(IssuanceRun, "_save_authorization", _save_authorization)


if os.environ.get(ENV):
    install(kill_once)
