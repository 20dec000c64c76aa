"""Jobs: the queue's indexes as partial indexes on the state they serve; workers: forget
a worker a day after it was last seen (TTL on expires_at).

Every job changes state three times (queued → running → finished), and every index that
contains ``state`` is rewritten each time. Partial indexes hold only the jobs of one
state, so a transition touches just the entries it must: ``queued_run_after`` (queue
depth, oldest due job) and ``queued_wake_at`` (the reaper's lost wake-ups) hold queued
jobs, ``running_lease_expiry`` (the reaper's lapsed leases) holds running jobs. They
replace m0001's ``state_run_after`` and ``state_lease_expiry``; m0001's ``kind_state``
goes too (no query of the queue needs it; listings page through ``_id`` or
``project_created``). Finished jobs expire (TTL on ``expire_at``) so the collection
does not grow without bound.
"""

from pymongo import ASCENDING, IndexModel
from pymongo.database import Database

from app import db as dbm
from app.db import Doc

VERSION = 2
DESCRIPTION = ("jobs: partial queue indexes (run_after, wake_at, lease expiry), TTL on "
               "finished jobs; workers TTL")

REPLACED = ("state_run_after", "state_lease_expiry", "state_wake_at", "kind_state")


def apply(db: Database[Doc]) -> None:
    existing = set(db.list_collection_names())
    for name in (dbm.JOBS, dbm.WORKERS):
        if name not in existing:
            db.create_collection(name)
    jobs = db[dbm.JOBS]
    jobs.create_indexes([
        IndexModel([("run_after", ASCENDING)], name="queued_run_after",
                   partialFilterExpression={"state": "queued"}),
        IndexModel([("wake_at", ASCENDING)], name="queued_wake_at",
                   partialFilterExpression={"state": "queued"}),
        IndexModel([("lease.expires_at", ASCENDING)], name="running_lease_expiry",
                   partialFilterExpression={"state": "running"}),
        # Finished jobs carry expire_at (app.jobs.lifecycle: 7 days, 30 when dead).
        IndexModel([("expire_at", ASCENDING)], expireAfterSeconds=0, name="ttl_expire_at"),
    ])
    present = set(jobs.index_information())
    for name in REPLACED:
        if name in present:
            jobs.drop_index(name)
    db[dbm.WORKERS].create_indexes([
        IndexModel([("expires_at", ASCENDING)], expireAfterSeconds=0, name="ttl_expires_at"),
    ])
