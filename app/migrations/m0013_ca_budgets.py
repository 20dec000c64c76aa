"""The shared ACME rate-limit budget: ``ca_budgets`` (one token bucket per document),
listed by CA for the status view and the metrics."""

from pymongo import ASCENDING, IndexModel
from pymongo.database import Database

from app.db import Doc
from app.db.names import CA_BUDGETS
from app.migrations import create_indexes

VERSION = 13
DESCRIPTION = "ca_budgets: shared ACME rate-limit token buckets, by CA and bucket"

INDEXES: dict[str, list[IndexModel]] = {
    CA_BUDGETS: [IndexModel([("ca", ASCENDING), ("bucket", ASCENDING)], name="ca_bucket")],
}


def apply(db: Database[Doc]) -> None:
    create_indexes(db, INDEXES)
