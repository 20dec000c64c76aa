"""The one rule a scheduler leader cannot watch: its own absence.

Every worker runs ``LeaderWatch`` (a daemon thread started by tasks/worker.py): every
15 s it evaluates the ``scheduler_leader`` rule itself, so "no leader for over 60 s"
is alerted (once: the alert is deduplicated in MongoDB) and delivered by the workers
while no ``alerts.evaluate`` is enqueued.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from app.config import Settings

log = logging.getLogger(__name__)


class LeaderWatch:
    def __init__(self, get_db: Callable[[], Any], settings: Settings,
                 every_seconds: float = 15.0) -> None:
        self.get_db = get_db
        self.settings = settings
        self.every = every_seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="alerts-leader-watch",
                                        daemon=True)

    def start(self) -> LeaderWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        from app.ops.alerts.engine import evaluate

        while not self._stop.wait(self.every):
            try:
                evaluate(self.get_db(), settings=self.settings, rules=("scheduler_leader",))
            except Exception as exc:  # noqa: BLE001 - best effort; tried again next time
                log.warning("scheduler-leader alert check failed",
                            extra={"error": f"{exc.__class__.__name__}: {exc}"[:200]})
