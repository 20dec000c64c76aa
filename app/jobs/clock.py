"""The database server's clock, without a round trip per decision.

Lease decisions compare stored dates with the server's clock (never the process's),
using plain query operators. Reading ``hello.localTime`` for every claim, heartbeat and
completion would double the commands per job, so each process samples it now and then
and extrapolates with its monotonic clock: between two samples the estimate drifts only
by the two clocks' rate difference (parts per million), and the sample's own error is
at most half a round trip. Fencing does not depend on this precision: a re-claim always
changes the lease token, so two holders can never both complete a job.
"""

from __future__ import annotations

import os
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo.database import Database

from app import db as dbm

# Re-read the server's clock at least this often.
RESAMPLE_SECONDS = 30.0


class ServerClock:
    def __init__(self, resample_seconds: float = RESAMPLE_SECONDS) -> None:
        self.resample_seconds = resample_seconds
        self._lock = threading.Lock()
        self._base: datetime | None = None
        self._base_mono = 0.0
        self._key: tuple[int, int] | None = None

    def now(self, db: Database[dict[str, Any]]) -> datetime:
        """The server's current time (timezone-aware UTC, millisecond precision)."""
        key = (os.getpid(), id(db.client))
        with self._lock:
            fresh = (self._base is not None and self._key == key
                     and time.monotonic() - self._base_mono < self.resample_seconds)
            if fresh:
                assert self._base is not None
                return _millis(self._base + timedelta(seconds=time.monotonic()
                                                      - self._base_mono))
        sent = time.monotonic()
        server = dbm.server_now(db)
        received = time.monotonic()
        with self._lock:
            # The server stamped localTime somewhere in the round trip: assume the middle.
            self._base = server.astimezone(UTC)
            self._base_mono = (sent + received) / 2
            self._key = key
            return _millis(self._base + timedelta(seconds=received - self._base_mono))

    def reset(self) -> None:
        with self._lock:
            self._base = None


def _millis(value: datetime) -> datetime:
    """BSON dates keep milliseconds: truncate so what we compute equals what we store."""
    return value.replace(microsecond=value.microsecond // 1000 * 1000)


CLOCK = ServerClock()


def server_now(db: Database[dict[str, Any]]) -> datetime:
    return CLOCK.now(db)
