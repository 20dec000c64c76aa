"""The dashboard's figures without whole-collection reads: ``updated_at`` indexes on
certificates and jobs.

``app.dashboard.snapshot`` keeps certificates by state and days left, failing renewals
and the queue by kind in one api process, and reads only the documents changed since
its last pass (``updated_at >= last pass - slack``), one index range each. Every write
that moves one of those figures stamps ``updated_at`` (certificate create, update,
issue, failure, revoke, delete; every job transition).

The jobs index adds one index entry per job transition, as m0012's ``state`` index
does.
"""

from pymongo import ASCENDING, IndexModel
from pymongo.database import Database

from app import db as dbm
from app.db import Doc
from app.migrations import create_indexes

VERSION = 15
DESCRIPTION = "dashboard: updated_at indexes on certificates and jobs (incremental figures)"

INDEXES: dict[str, list[IndexModel]] = {
    dbm.CERTIFICATES: [IndexModel([("updated_at", ASCENDING)], name="updated_at")],
    dbm.JOBS: [IndexModel([("updated_at", ASCENDING)], name="updated_at")],
}


def apply(db: Database[Doc]) -> None:
    create_indexes(db, INDEXES)
