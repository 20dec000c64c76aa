"""Versioned, idempotent schema and index migrations.

Each migration is a module ``mNNNN_<name>.py`` in this package with ``VERSION`` (int),
``DESCRIPTION`` (str) and ``apply(db)``; ``apply`` must be safe to run again. The runner
holds a lease (``app.db.lease``) on a lock document in ``leases`` so that migrate
processes started together apply each migration exactly once, and records each applied
version in ``migrations``.
"""

from __future__ import annotations

import importlib
import logging
import os
import pkgutil
import socket
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from types import ModuleType

from pymongo import IndexModel
from pymongo.database import Database

from app import db as dbm
from app.db import MIGRATIONS_LOCK_ID, Doc
from app.db.lease import Lease

log = logging.getLogger(__name__)

LOCK_ID = MIGRATIONS_LOCK_ID
LOCK_SECONDS = 120.0


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    module: ModuleType

    def apply(self, db: Database[Doc]) -> None:
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


def create_indexes(db: Database[Doc], indexes: Mapping[str, list[IndexModel]]) -> None:
    """Create each collection (if missing) and its indexes: both are no-ops when they
    exist already, so a migration built on this can run again."""
    existing = set(db.list_collection_names())
    for name, models in indexes.items():
        if name not in existing:
            db.create_collection(name)
        db[name].create_indexes(models)


def status(db: Database[Doc]) -> list[Doc]:
    applied = {d["_id"]: d for d in dbm.primary(db)[dbm.MIGRATIONS].find()}
    return [
        {"version": m.version, "description": m.description,
         "applied_at": applied.get(m.version, {}).get("applied_at")}
        for m in discover()
    ]


def migrations_lock(db: Database[Doc]) -> Lease:
    """The lease that lets one migrate process at a time apply migrations."""
    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    return Lease(db[dbm.LEASES], {"_id": LOCK_ID}, owner, LOCK_SECONDS, upsert=True,
                 what="migrations lock")


def migrate(db: Database[Doc], *, wait_seconds: float = 300.0) -> list[int]:
    """Apply every missing migration in order; return the versions this call applied."""
    db = dbm.primary(db)
    lock = migrations_lock(db)
    deadline = time.monotonic() + wait_seconds
    while lock.acquire() is None:
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
                "applied_at": dbm.server_now(db), "applied_by": lock.holder})
            applied_now.append(migration.version)
    finally:
        lock.release()
    return applied_now
