"""Versioned, idempotent schema and index migrations.

Each migration is a module ``mNNNN_<name>.py`` in this package with ``VERSION`` (int),
``DESCRIPTION`` (str) and ``apply(db)``; ``apply`` must be safe to run again. The runner
takes a lock document in ``leases`` so that migrate processes started together apply each
migration exactly once, and records each applied version in ``migrations``.
"""

from __future__ import annotations

import importlib
import logging
import os
import pkgutil
import socket
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from types import ModuleType
from typing import Any

from pymongo import ReturnDocument
from pymongo.database import Database
from pymongo.errors import DuplicateKeyError

from app import db as dbm

log = logging.getLogger(__name__)

LOCK_ID = "migrations"
LOCK_SECONDS = 120.0


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    module: ModuleType

    def apply(self, db: Database[dict[str, Any]]) -> None:
        self.module.apply(db)


def discover() -> list[Migration]:
    found = []
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("m") or not info.name[1:5].isdigit():
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        found.append(Migration(int(module.VERSION), str(module.DESCRIPTION), module))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"duplicate migration versions: {versions}")
    return found


def status(db: Database[dict[str, Any]]) -> list[dict[str, Any]]:
    applied = {d["_id"]: d for d in dbm.primary(db)[dbm.MIGRATIONS].find()}
    return [
        {"version": m.version, "description": m.description,
         "applied_at": applied.get(m.version, {}).get("applied_at")}
        for m in discover()
    ]


class _Lock:
    """A lease on one document, compared on the server's clock."""

    def __init__(self, db: Database[dict[str, Any]]) -> None:
        self.db = db
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

    def try_acquire(self) -> bool:
        now = dbm.server_now(self.db)
        try:
            doc = self.db[dbm.LEASES].find_one_and_update(
                {"_id": LOCK_ID, "$or": [{"holder": None}, {"expires_at": {"$lt": now}},
                                         {"holder": self.owner}]},
                {"$set": {"holder": self.owner,
                          "expires_at": now + timedelta(seconds=LOCK_SECONDS),
                          "acquired_at": now}},
                upsert=True, return_document=ReturnDocument.AFTER,
            )
        except DuplicateKeyError:
            return False
        return doc is not None and doc.get("holder") == self.owner

    def release(self) -> None:
        self.db[dbm.LEASES].update_one({"_id": LOCK_ID, "holder": self.owner},
                                       {"$set": {"holder": None, "expires_at": None}})


def migrate(db: Database[dict[str, Any]], *, wait_seconds: float = 300.0) -> list[int]:
    """Apply every missing migration in order; return the versions this call applied."""
    db = dbm.primary(db)
    lock = _Lock(db)
    deadline = time.monotonic() + wait_seconds
    while not dbm.retry(lock.try_acquire, what="take migrations lock"):
        if time.monotonic() > deadline:
            raise TimeoutError("another migrate process holds the migrations lock")
        time.sleep(0.2)
    applied_now = []
    try:
        done = {d["_id"] for d in db[dbm.MIGRATIONS].find({}, {"_id": 1})}
        for migration in discover():
            if migration.version in done:
                continue
            log.info("applying migration", extra={"version": migration.version,
                                                   "description": migration.description})
            migration.apply(db)
            db[dbm.MIGRATIONS].insert_one({
                "_id": migration.version, "description": migration.description,
                "applied_at": dbm.server_now(db), "applied_by": lock.owner})
            applied_now.append(migration.version)
    finally:
        dbm.retry(lock.release, what="release migrations lock")
    return applied_now
