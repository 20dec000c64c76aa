"""Run an issuance outside a job (``app.domain.issuance.run_issuance``'s ``fence``): no
lease, plain transactions; a worker passes its ``JobContext`` instead."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from pymongo.client_session import ClientSession
from pymongo.database import Database

from app import db as dbm

T = TypeVar("T")


class LocalFence:
    def __init__(self, db: Database[dict[str, Any]], job_id: str | None = None) -> None:
        self.db = db
        self._job_id = job_id

    @property
    def job_id(self) -> str | None:
        return self._job_id

    @property
    def lease_token(self) -> str | None:
        return None

    def check_lease(self) -> None:
        return None

    def transaction(self, fn: Callable[[ClientSession], T], *, complete: bool = False) -> T:
        return dbm.transaction(self.db, fn, what="issuance step")
