"""The ops dashboard: its sign-in sessions (TTL) and the indexes its pages read through.

Every dashboard page must answer within 200 ms with 10,000 certificates and 100,000 jobs
(scripts/bench/dashboard.py), so each list is a walk of one index in its sort order
(``created_at, _id``, the API's cursor order), filtered by an equality prefix:

- certificates: all of them (admin), by state; by name across projects (admin); failing
  renewals, newest failure first (sparse: only certificates whose last attempt failed
  carry ``failure.last_failed_at``).
- jobs: all of them newest first (admin), by state, by kind; a certificate's jobs
  (``payload.certificate_id``); finished jobs by ``finished_at`` (the 6-hour chart).
- dashboard_sessions: dropped by TTL after ``expires_at`` (the expiry itself is checked
  on every request; the TTL only keeps the collection small); scheduler_standbys too.

The ``state`` index is rewritten at every transition of a job (m0002 removed such indexes
from the queue's hot path); the dashboard's filter by state needs it, and one index entry
per transition is the price.
"""

from pymongo import ASCENDING, DESCENDING, IndexModel
from pymongo.database import Database

from app import db as dbm
from app.db import Doc
from app.migrations import create_indexes

VERSION = 12
DESCRIPTION = "dashboard: sessions (TTL) and the indexes of its lists and aggregates"

INDEXES: dict[str, list[IndexModel]] = {
    dbm.DASHBOARD_SESSIONS: [IndexModel([("expires_at", ASCENDING)], expireAfterSeconds=0,
                                        name="ttl_expires_at")],
    dbm.SCHEDULER_STANDBYS: [IndexModel([("expires_at", ASCENDING)], expireAfterSeconds=0,
                                        name="ttl_expires_at")],
    dbm.CERTIFICATES: [
        IndexModel([("created_at", ASCENDING), ("_id", ASCENDING)], name="created"),
        IndexModel([("status", ASCENDING), ("created_at", ASCENDING), ("_id", ASCENDING)],
                   name="status_created"),
        IndexModel([("failure.last_failed_at", DESCENDING)], name="failure_last_failed",
                   sparse=True),
        IndexModel([("names", ASCENDING)], name="names"),
    ],
    dbm.JOBS: [
        IndexModel([("created_at", DESCENDING), ("_id", DESCENDING)], name="created"),
        IndexModel([("state", ASCENDING), ("created_at", DESCENDING), ("_id", DESCENDING)],
                   name="state_created"),
        IndexModel([("kind", ASCENDING), ("created_at", DESCENDING), ("_id", DESCENDING)],
                   name="kind_created"),
        IndexModel([("payload.certificate_id", ASCENDING), ("created_at", DESCENDING)],
                   name="certificate_created", sparse=True),
        IndexModel([("finished_at", ASCENDING)], name="finished_at"),
    ],
}


def apply(db: Database[Doc]) -> None:
    create_indexes(db, INDEXES)
