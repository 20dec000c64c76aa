"""Jobs: the reaper's index on (state, wake_at); workers: forget a worker a day after
it was last seen (TTL on expires_at)."""

from typing import Any

from pymongo import ASCENDING, IndexModel
from pymongo.database import Database

from app import db as dbm

VERSION = 2
DESCRIPTION = "jobs wake_at index for the reaper; TTL on workers.expires_at"


def apply(db: Database[dict[str, Any]]) -> None:
    existing = set(db.list_collection_names())
    for name in (dbm.JOBS, dbm.WORKERS):
        if name not in existing:
            db.create_collection(name)
    db[dbm.JOBS].create_indexes([
        IndexModel([("state", ASCENDING), ("wake_at", ASCENDING)], name="state_wake_at"),
    ])
    db[dbm.WORKERS].create_indexes([
        IndexModel([("expires_at", ASCENDING)], expireAfterSeconds=0, name="ttl_expires_at"),
    ])
