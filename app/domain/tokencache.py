"""Verified API tokens, kept per process for a few seconds (``app.domain.tokens``).

A busy client then costs no database read per request; a revoked token stops working
within ``CACHE_SECONDS`` on every replica, and at once on the replica that revoked it
(or deleted its project: ``forget_project``).
"""

from __future__ import annotations

import threading
from typing import Protocol

CACHE_SECONDS = 5.0
_CACHE_MAX = 10_000


class Cached(Protocol):
    @property
    def token_id(self) -> str: ...

    @property
    def project_id(self) -> str | None: ...


_cache: dict[str, tuple[Cached, float]] = {}
_lock = threading.Lock()


def get(digest: str, now: float) -> Cached | None:
    """The principal verified for this token hash, unless it is older than its TTL."""
    with _lock:
        hit = _cache.get(digest)
    return hit[0] if hit is not None and hit[1] > now else None


def put(digest: str, principal: Cached, until: float) -> None:
    with _lock:
        if len(_cache) >= _CACHE_MAX:
            _cache.clear()
        _cache[digest] = (principal, until)


def forget_token(token_id: str) -> None:
    with _lock:
        for key in [k for k, (p, _) in _cache.items() if p.token_id == token_id]:
            del _cache[key]


def forget_project(project_id: str) -> None:
    with _lock:
        for key in [k for k, (p, _) in _cache.items() if p.project_id == project_id]:
            del _cache[key]


def clear() -> None:
    with _lock:
        _cache.clear()
