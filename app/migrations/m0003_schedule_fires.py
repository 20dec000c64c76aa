"""The scheduler's per-slot fire log (see app/db/schedule.py)."""

from pymongo import ASCENDING, DESCENDING, IndexModel
from pymongo.database import Database

from app import db as dbm
from app.db.names import FIRES, Doc
from app.db.schedule import FIRES_TTL_SECONDS
from app.migrations import create_indexes

VERSION = 3
DESCRIPTION = "schedule_fires: one document per fired slot, unique per entry and slot"

INDEXES = [
    # A slot fires once: even a double fire cannot commit twice (within the TTL).
    IndexModel([("entry", ASCENDING), ("slot", ASCENDING)], unique=True, name="entry_slot"),
    IndexModel([("fired_at", ASCENDING)], expireAfterSeconds=int(FIRES_TTL_SECONDS),
               name="ttl_fired_at"),
    IndexModel([("term", ASCENDING), ("fired_at", DESCENDING)], name="term_fired_at"),
]


def apply(db: Database[Doc]) -> None:
    create_indexes(db, {FIRES: INDEXES})
    db[dbm.SCHEDULE].create_index([("source", ASCENDING)], name="source")
