"""Per-token request rate limit, shared by every api replica through MongoDB.

Fixed windows (``CAP_API_RATE_LIMIT``, e.g. 6000/minute): the count of a token in a
window lives in one document ``{_id: "<token id>:<window number>", n, expires_at}`` in
``api_rate_limits`` (TTL index). To keep the database out of most requests, a process
reserves a small allotment at a time with one ``$inc`` and spends it locally; the
shared count therefore never lets more than the limit through in a window (allotments
a process did not use are lost at the end of the window, so a burst spread over many
processes may see 429 slightly before the exact limit).
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo import ReturnDocument
from pymongo.database import Database
from pymongo.errors import DuplicateKeyError

from app import db as dbm
from app.db.names import RATE_LIMITS
from app.errors import RateLimited


@dataclass
class _Allotment:
    window: int = -1
    remaining: int = 0
    exhausted: bool = False


@dataclass
class RateLimiter:
    limit: int
    window_seconds: int
    chunk: int = 0
    _state: dict[str, _Allotment] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        if not self.chunk:
            # ~1% of the limit per reservation, at most 20: a small error, few writes.
            self.chunk = max(1, min(20, self.limit // 100))

    def check(self, db: Database[dict[str, Any]], token_id: str) -> None:
        """Spend one request of ``token_id``; RateLimited (429) when over the limit."""
        if self.limit <= 0:
            return
        now = time.time()
        window = int(now // self.window_seconds)
        window_end = (window + 1) * self.window_seconds
        with self._lock:
            state = self._state.get(token_id)
            if state is None or state.window != window:
                state = _Allotment(window=window)
                self._state[token_id] = state
                if len(self._state) > 50_000:  # old windows of idle tokens
                    self._state = {token_id: state}
            if state.remaining > 0:
                state.remaining -= 1
                return
            if not state.exhausted:
                granted = self._reserve(db, token_id, window, window_end)
                if granted > 0:
                    state.remaining = granted - 1
                    return
                state.exhausted = True
        retry_after = max(1, math.ceil(window_end - now))
        raise RateLimited(f"rate limit of {self.limit} requests per {self.window_seconds}s "
                          f"exceeded for this token; retry in {retry_after}s",
                          retry_after=retry_after)

    def _reserve(self, db: Database[dict[str, Any]], token_id: str, window: int,
                 window_end: float) -> int:
        key = f"{token_id}:{window}"
        expires_at = datetime.fromtimestamp(window_end, UTC) + timedelta(seconds=60)

        def inc() -> dict[str, Any] | None:
            try:
                return db[RATE_LIMITS].find_one_and_update(
                    {"_id": key}, {"$inc": {"n": self.chunk},
                                   "$setOnInsert": {"expires_at": expires_at}},
                    upsert=True, return_document=ReturnDocument.AFTER)
            except DuplicateKeyError:  # two processes created the window at once
                return db[RATE_LIMITS].find_one_and_update(
                    {"_id": key}, {"$inc": {"n": self.chunk}},
                    return_document=ReturnDocument.AFTER)

        doc = dbm.retry(inc, what="rate limit", attempts=3)
        total = int((doc or {}).get("n", self.chunk))
        over = max(0, total - self.limit)
        return max(0, self.chunk - over)
