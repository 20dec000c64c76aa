"""Worker heartbeats in ``workers``: one document per worker (Celery node).

``{_id: node name, host, pid, version, pool, concurrency, state (running | draining |
stopped | lost), running_jobs: [job ids], owners: [the lease owners of its processes,
host:pid], started_at, last_seen, expires_at}``. A worker not seen for three beats is
marked ``lost`` by a peer, which takes back its running jobs at once
(``reaper.release_orphans``) instead of waiting for their leases to lapse. ``last_seen`` is
the server's clock; a TTL index on ``expires_at`` (m0002) drops a worker's document a
day after it was last seen. The same thread runs the reaper now and then, so lost
wake-ups and lapsed leases are recovered even while no scheduler is running.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time
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
        # A peer not seen for three beats is lost (reaper.release_orphans).
        self.dead_after = 3 * self.interval
        self._beating_since: float | None = None
        self.reap_every = reap_every if reap_every is not None \
            else settings.reaper_republish_seconds
        self.state = "running"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="worker-heartbeat",
                                        daemon=True)
        self._next_reap = time.monotonic() + self.reap_every * random.uniform(0.5, 1.0)

    def start(self) -> WorkerHeartbeat:
        self._thread.start()
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
                if self._beating_since is None:
                    self._beating_since = time.monotonic()
            except Exception as exc:  # noqa: BLE001 - next beat retries
                self._beating_since = None
                log.warning("worker heartbeat failed", extra={"error": str(exc)[:200]})
                probes.record(self.settings, "worker", ok=False, detail=self.state, error=exc)
            self._release_orphans()
            if self.reap_every > 0 and time.monotonic() >= self._next_reap \
                    and self.state == "running":
                self._next_reap = time.monotonic() + self.reap_every * random.uniform(0.8, 1.2)
                try:
                    from app.jobs.reaper import reap

                    counts = reap(self.get_db(), settings=self.settings)
                    if any(counts[k] for k in ("requeued", "dead", "republished")):
                        log.info("reaper pass", extra=counts)
                except Exception as exc:  # noqa: BLE001
                    log.warning("reaper pass failed", extra={"error": str(exc)[:200]})
            self._stop.wait(self.interval)

    def _release_orphans(self) -> None:
        """Take back the jobs of peers whose heartbeat stopped, once this worker's own
        beats have reached the database for as long as a peer's may be missed (after an
        outage every heartbeat is old: the others must have had the time to beat)."""
        since = self._beating_since
        if since is None or time.monotonic() - since < self.dead_after \
                or self.state != "running":
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
        if self._thread.is_alive():
            self._thread.join(timeout=5)
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
