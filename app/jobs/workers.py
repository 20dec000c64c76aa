"""Worker heartbeats in ``workers``: one document per worker (Celery node).

``{_id: node name, host, pid, version, pool, concurrency, state (running | draining |
stopped | lost), running_jobs: [job ids], owners: [the lease owners of its processes,
host:pid], started_at, last_seen, expires_at}``. A worker not seen for 20 s (at least three
beats) is marked ``lost`` by a peer, which takes back its running jobs at once
(``reaper.release_orphans``) instead of waiting for their leases to lapse. ``last_seen`` is
the server's clock; a TTL index on ``expires_at`` (m0002) drops a worker's document a
day after it was last seen. A second thread runs the reaper now and then, so lost
wake-ups and lapsed leases are recovered even while no scheduler is running.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import timedelta
from importlib import metadata

from pymongo.database import Database

from app import db as dbm
from app import probes
from app.config import Settings
from app.db import Doc
from app.db.clock import server_now
from app.jobs.runner import worker_identity

log = logging.getLogger("certautopilot.jobs.workers")
FORGET_AFTER = timedelta(days=1)
LOST_AFTER_MIN = 20.0  # seconds without a heartbeat before a peer calls a worker lost


def app_version() -> str:
    try:
        return metadata.version("certautopilot")
    except metadata.PackageNotFoundError:
        return "unknown"


class WorkerHeartbeat:
    def __init__(self, get_db: Callable[[], Database[Doc]], settings: Settings, *,
                 node: str, pool: str, concurrency: int,
                 running: Callable[[], list[str]], interval: float | None = None,
                 reap_every: float | None = None,
                 owners: Callable[[], list[str]] | None = None) -> None:
        self.get_db = get_db
        self.settings = settings
        self.node = node
        self.pool = pool
        self.concurrency = concurrency
        self.running = running
        self.owners = owners or (lambda: [worker_identity()])
        self.interval = interval or max(1.0, min(5.0, settings.job_lease_seconds / 3))
        # A peer not seen for this long is lost (reaper.release_orphans): several missed
        # beats, and never less than LOST_AFTER_MIN (so with short job leases the lease
        # decides first, as before).
        self.dead_after = max(3 * self.interval, LOST_AFTER_MIN)
        # Monotonic times of the good beats since the last failed one.
        self._beats: deque[float] = deque(maxlen=256)
        self.reap_every = reap_every if reap_every is not None \
            else settings.reaper_republish_seconds
        self.state = "running"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="worker-heartbeat",
                                        daemon=True)
        # Reaper passes in their own thread: a slow pass must not delay the beats that
        # tell peers this worker is alive.
        self._reaper = threading.Thread(target=self._reap_loop, name="worker-reaper",
                                        daemon=True)

    def start(self) -> WorkerHeartbeat:
        self._thread.start()
        if self.reap_every > 0:
            self._reaper.start()
        return self

    def beat(self) -> None:
        db = self.get_db()
        now = server_now(db)
        dbm.primary(db)[dbm.WORKERS].update_one({"_id": self.node}, {
            "$set": {"host": socket.gethostname(), "pid": os.getpid(),
                     "version": app_version(), "pool": self.pool,
                     "concurrency": self.concurrency, "state": self.state,
                     "running_jobs": self.running(), "owners": self.owners(),
                     "last_seen": now,
                     "expires_at": now + FORGET_AFTER},
            "$setOnInsert": {"started_at": now}}, upsert=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.beat()
                probes.record(self.settings, "worker", ok=True, detail=self.state)
                self._beats.append(time.monotonic())
            except Exception as exc:  # noqa: BLE001 - next beat retries
                self._beats.clear()
                log.warning("worker heartbeat failed", extra={"error": str(exc)[:200]})
                probes.record(self.settings, "worker", ok=False, detail=self.state, error=exc)
            self._release_orphans()
            self._stop.wait(self.interval)

    def _reap_loop(self) -> None:
        self._stop.wait(self.reap_every * random.uniform(0.5, 1.0))
        while not self._stop.is_set():
            if self.state == "running":
                try:
                    from app.jobs.reaper import reap

                    counts = reap(self.get_db(), settings=self.settings)
                    if any(counts[k] for k in ("requeued", "dead", "republished")):
                        log.info("reaper pass", extra=counts)
                except Exception as exc:  # noqa: BLE001
                    log.warning("reaper pass failed", extra={"error": str(exc)[:200]})
            self._stop.wait(self.reap_every * random.uniform(0.8, 1.2))

    def own_beats_on_time(self, now: float | None = None) -> bool:
        """Whether this worker's own beats have reached the database without a failure
        for ``dead_after`` and never more than ``dead_after / 2`` apart: only then can a
        peer's silence be told from a slow or absent database (after an outage every
        heartbeat is old; under a saturated one every beat is late)."""
        now = time.monotonic() if now is None else now
        times = list(self._beats)
        if not times or now - times[0] < self.dead_after:
            return False
        start = now - self.dead_after
        previous = max(t for t in times if t <= start)
        points = [previous, *(t for t in times if t > start), now]
        return all(b - a < self.dead_after / 2 for a, b in zip(points, points[1:], strict=False))

    def _release_orphans(self) -> None:
        """Take back the jobs of peers whose heartbeat stopped, while this worker's own
        beats are on time (``own_beats_on_time``)."""
        if self.state != "running" or not self.own_beats_on_time():
            return
        try:
            from app.jobs.reaper import release_orphans

            counts = release_orphans(self.get_db(), dead_after=self.dead_after,
                                     settings=self.settings)
            if counts["lost"]:
                log.info("lost workers' jobs taken back", extra=counts)
        except Exception as exc:  # noqa: BLE001 - the next beat tries again
            log.warning("could not take back lost workers' jobs",
                        extra={"error": str(exc)[:200]})

    def draining(self) -> None:
        self.state = "draining"
        self._beat_quietly()

    def stop(self) -> None:
        self._stop.set()
        for thread in (self._thread, self._reaper):
            if thread.is_alive():
                thread.join(timeout=5)
        self.state = "stopped"
        self._beat_quietly()

    def _beat_quietly(self) -> None:
        try:
            self.beat()
        except Exception as exc:  # noqa: BLE001
            log.warning("worker heartbeat failed", extra={"error": str(exc)[:200]})


def list_workers(db: Database[Doc]) -> list[Doc]:
    """Workers seen in the last day, most recently seen first, with ``age_seconds``."""
    now = server_now(db)
    rows = list(dbm.primary(db)[dbm.WORKERS].find().sort("last_seen", -1))
    for row in rows:
        seen = row.get("last_seen")
        row["age_seconds"] = round((now - seen).total_seconds(), 1) if seen else None
    return rows
