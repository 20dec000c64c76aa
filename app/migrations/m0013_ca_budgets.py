"""The shared ACME rate-limit budget: ``ca_budgets`` (one token bucket per document),
listed by CA for the status view and the metrics; ``renewal_batches`` (emergency and
bulk renewals), listed by project."""

from pymongo import ASCENDING, IndexModel
from pymongo.database import Database

from app.db import Doc
from app.db.names import CA_BUDGETS, RENEWAL_BATCHES
from app.migrations import create_indexes

VERSION = 13
DESCRIPTION = "ca_budgets (shared ACME rate-limit buckets) and renewal_batches"

INDEXES: dict[str, list[IndexModel]] = {
    CA_BUDGETS: [IndexModel([("ca", ASCENDING), ("bucket", ASCENDING)], name="ca_bucket")],
    RENEWAL_BATCHES: [IndexModel([("project_id", ASCENDING), ("created_at", ASCENDING)],
                                 name="project_created")],
}


def apply(db: Database[Doc]) -> None:
    create_indexes(db, INDEXES)
