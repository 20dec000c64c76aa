"""The API's own collections: idempotency keys and rate-limit windows, both expiring by
TTL index."""

from pymongo import ASCENDING, IndexModel
from pymongo.database import Database

from app.db import Doc
from app.db.names import CERTIFICATES, IDEMPOTENCY, RATE_LIMITS
from app.migrations import create_indexes

VERSION = 7
DESCRIPTION = "api: idempotency keys and rate-limit windows (TTL); certificate list order"

INDEXES: dict[str, list[IndexModel]] = {
    # The API lists a project's certificates in creation order (cursor pagination).
    CERTIFICATES: [IndexModel([("project_id", ASCENDING), ("created_at", ASCENDING),
                                 ("_id", ASCENDING)], name="project_created")],
    IDEMPOTENCY: [IndexModel([("expires_at", ASCENDING)], expireAfterSeconds=0,
                             name="ttl_expires_at")],
    RATE_LIMITS: [IndexModel([("expires_at", ASCENDING)], expireAfterSeconds=0,
                             name="ttl_expires_at")],
}


def apply(db: Database[Doc]) -> None:
    create_indexes(db, INDEXES)
