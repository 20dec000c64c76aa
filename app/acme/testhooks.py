"""TEST-ONLY crash hooks for the kill -9 tests of resumable orders.

``CAP_TEST_CRASH_AT=order_stored`` (or ``challenge_answered``; a comma-separated list is
allowed) makes the worker SIGKILL its whole process group right after that step has been
saved, exactly once per database: the first process to reach the point inserts a marker
document into ``test_crash_markers``; every later one (the peer that resumes the order)
finds the marker and carries on. With the variable unset (always, outside tests) this
module does nothing. Never set it in production.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Any

from pymongo.database import Database
from pymongo.errors import DuplicateKeyError

log = logging.getLogger(__name__)

ENV = "CAP_TEST_CRASH_AT"
MARKERS = "test_crash_markers"
POINTS = ("order_stored", "challenge_answered")


def crash_point(db: Database[dict[str, Any]], point: str) -> None:
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
