"""Mongo-lease Celery beat scheduler.

``celery -A tasks beat -S scheduler.MongoLeaseScheduler`` runs it (see
``scheduler/schedulers.py``); the lease is in ``scheduler/lease.py``, entries and slots in
``scheduler/entries.py``, and the one registration point for timed work is
``scheduler/timed.py``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from scheduler.schedulers import MongoLeaseScheduler

__all__ = ["MongoLeaseScheduler"]


def __getattr__(name: str) -> Any:
    # Lazy, so that importing scheduler.timed (the registration point) stays light.
    if name == "MongoLeaseScheduler":
        from scheduler.schedulers import MongoLeaseScheduler

        return MongoLeaseScheduler
    raise AttributeError(f"module 'scheduler' has no attribute {name!r}")
