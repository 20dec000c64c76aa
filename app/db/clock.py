"""The database server's clock: the one time that lease and schedule decisions use.

Why the server's clock and not the process's: processes on different hosts disagree
about the time, and a lease held by one and taken over by another is only safe if both
read expiry from the same clock. Stored dates are compared with ``now`` through plain
query operators (``{"expires_at": {"$lt": now}}``), never with ``$$NOW`` in expressions:
on the embedded server a stored date compared with ``$$NOW`` comes out equal and
``$subtract`` with ``$$NOW`` errors (DESIGN.md, Environments).

Why sampled: reading ``hello.localTime`` for every claim, heartbeat, renewal and
completion would double the commands per operation, so each process samples it now and
then (per client) and extrapolates with its monotonic clock. Between two samples the
estimate drifts only by the two clocks' rate difference (parts per million), and the
sample's own error is at most half a round trip. Fencing never depends on this
precision: a takeover always changes the lease's token (app.db.lease), so two holders
can never both write under it.
"""

from __future__ import annotations

import os
import threading
import time
from datetime import UTC, datetime, timedelta

from pymongo.database import Database

from app.db.client import retry
from app.db.names import Doc

# The lower bound a query on a stored date gives a range that has only an upper one:
# ``{"$gte": EARLIEST, "$lt": x}`` matches what ``{"$lt": x}`` matches (a comparison with a
# date matches dates only), but the embedded server reads ``{"$lt": x}`` from the start
# of the index, through every document whose date is null (a revoked certificate's
# renewal time, a failed one's expiry) before the first date: 5x slower with 2,000 such
# documents among 10,000.
EARLIEST = datetime(1, 1, 1, tzinfo=UTC)

# Re-read the server's clock at least this often.
RESAMPLE_SECONDS = 30.0
# Samples kept per process (one per client in use; tests open many).
_MAX_SAMPLES = 32


def read_server_time(db: Database[Doc]) -> datetime:
    """One round trip: the server's ``hello.localTime``, timezone-aware UTC."""
    reply = retry(lambda: db.client.admin.command("hello"), what="read server clock")
    now = reply["localTime"]
    assert isinstance(now, datetime)
    # command() decodes with default codec options (naive datetimes); the value is UTC.
    return now if now.tzinfo else now.replace(tzinfo=UTC)


class ServerClock:
    """The server's time, sampled every ``resample_seconds`` and extrapolated between."""

    def __init__(self, resample_seconds: float = RESAMPLE_SECONDS) -> None:
        self.resample_seconds = resample_seconds
        self._lock = threading.Lock()
        # (pid, client) -> (server time at the sample, monotonic time of the sample)
        self._samples: dict[tuple[int, int], tuple[datetime, float]] = {}

    def now(self, db: Database[Doc], *, fresh: bool = False) -> datetime:
        """The server's current time (timezone-aware UTC, millisecond precision); with
        ``fresh`` read from the server now (and kept as the new sample)."""
        key = (os.getpid(), id(db.client))
        with self._lock:
            sample = self._samples.get(key)
        if not fresh and sample is not None \
                and time.monotonic() - sample[1] < self.resample_seconds:
            return _millis(sample[0] + timedelta(seconds=time.monotonic() - sample[1]))
        sent = time.monotonic()
        server = read_server_time(db)
        received = time.monotonic()
        # The server stamped localTime somewhere in the round trip: assume the middle.
        base, base_mono = server.astimezone(UTC), (sent + received) / 2
        with self._lock:
            if len(self._samples) >= _MAX_SAMPLES:
                self._samples.clear()
            self._samples[key] = (base, base_mono)
        if fresh:
            return _millis(base)  # what the server said: fresh readings never go back
        return _millis(base + timedelta(seconds=received - base_mono))

    def reset(self) -> None:
        """Forget every sample: the next reading goes to the server."""
        with self._lock:
            self._samples.clear()


def _millis(value: datetime) -> datetime:
    """BSON dates keep milliseconds: truncate so what we compute equals what we store."""
    return value.replace(microsecond=value.microsecond // 1000 * 1000)


CLOCK = ServerClock()


def server_now(db: Database[Doc], *, fresh: bool = False) -> datetime:
    """The database server's current time (see the module docstring). ``fresh=True``
    costs a round trip; the scheduler uses it, whose coalescing of missed slots would
    turn a jump of the estimate at a resample into a skipped slot."""
    return CLOCK.now(db, fresh=fresh)
