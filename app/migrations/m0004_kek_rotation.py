"""KEK rotation bookkeeping: one running rotation at a time, rotations in order."""

from pymongo import ASCENDING, IndexModel
from pymongo.database import Database

from app.db import Doc
from app.db.names import KEK_ROTATIONS, KEK_VERSIONS
from app.migrations import create_indexes

VERSION = 4
DESCRIPTION = "KEK rotations: one running at a time (partial unique index), ordered by seq"

INDEXES: dict[str, list[IndexModel]] = {
    KEK_ROTATIONS: [
        IndexModel([("state", ASCENDING)], unique=True, name="one_running",
                   partialFilterExpression={"state": "running"}),
        IndexModel([("seq", ASCENDING)], unique=True, name="seq_unique"),
    ],
    KEK_VERSIONS: [IndexModel([("state", ASCENDING)], name="state")],
}


def apply(db: Database[Doc]) -> None:
    create_indexes(db, INDEXES)
