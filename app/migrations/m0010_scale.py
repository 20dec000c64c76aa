"""Scale (issue 19): indexes that keep the renewal scan and the certificate lists
index-backed at 100,000 certificates, and expiry for the per-event collections.

Certificates. Every query of the scan and the lists names ``deleted_at: null``; each
index below starts with the query's equality fields and ends with its sort keys
(equality, sort, range), so neither mongod nor the embedded server needs a collection
scan or a blocking sort of the whole fleet:

- ``deleted_renewal`` (deleted_at, next_renewal_at): the renewal scan, O(due);
- ``project_deleted_created`` (project_id, deleted_at, created_at, _id): a project's
  list in creation order (replaces m0007's ``project_created``, which lacked deleted_at);
- ``project_status_deleted_created``: the same filtered by status (replaces m0001's
  ``project_status``, a prefix of it);
- ``deleted_status_created``: an admin's list by status across projects;
- ``deleted_expiry`` / ``project_deleted_expiry``: ``expiring_before`` lists, which page
  in (not_after, _id) order.

Jobs: a plain ``dedupe_key`` index, for the scan's "which of these have an active job"
(the partial unique index serves only queries that imply its filter).

Per-event collections. Terminal orders expire ``ORDER_RETENTION`` after completion
(``expire_at``, set by ``app.domain.orders``; older ones are back-filled here); the
scheduler's jobs expire a day after their slot (``slot_expire_at``) whatever their state
(the next slot runs the work again), and fired slots are kept a day instead of seven
(their unique index only has to outlast a deposed leader's pause). The fleet-metrics
snapshot's chunks expire too (``app/metrics_snapshot.py``).
"""

from typing import Any

from pymongo import ASCENDING, IndexModel, UpdateOne
from pymongo.database import Database

from app import db as dbm
from app.db.names import FIRES
from app.db.schedule import FIRES_TTL_SECONDS
from app.domain.orders import ORDER_RETENTION, TERMINAL

VERSION = 10
DESCRIPTION = ("scale: certificate indexes for the scan and lists; TTL on finished orders, "
               "scheduler jobs, fired slots (1 day) and metrics snapshot chunks")

CERTIFICATE_INDEXES = [
    IndexModel([("deleted_at", ASCENDING), ("next_renewal_at", ASCENDING)],
               name="deleted_renewal"),
    IndexModel([("project_id", ASCENDING), ("deleted_at", ASCENDING),
                ("created_at", ASCENDING), ("_id", ASCENDING)],
               name="project_deleted_created"),
    IndexModel([("project_id", ASCENDING), ("status", ASCENDING), ("deleted_at", ASCENDING),
                ("created_at", ASCENDING), ("_id", ASCENDING)],
               name="project_status_deleted_created"),
    IndexModel([("deleted_at", ASCENDING), ("status", ASCENDING), ("created_at", ASCENDING),
                ("_id", ASCENDING)], name="deleted_status_created"),
    IndexModel([("deleted_at", ASCENDING), ("not_after", ASCENDING), ("_id", ASCENDING)],
               name="deleted_expiry"),
    IndexModel([("project_id", ASCENDING), ("deleted_at", ASCENDING),
                ("not_after", ASCENDING), ("_id", ASCENDING)], name="project_deleted_expiry"),
]
# Superseded by the indexes above (a prefix of one, or the same minus deleted_at).
REPLACED = ("project_created", "project_status")


def _ensure(db: Database[dict[str, Any]], name: str) -> None:
    if name not in set(db.list_collection_names()):
        db.create_collection(name)


def _backfill_orders(db: Database[dict[str, Any]]) -> None:
    orders = db[dbm.ORDERS]
    pending: list[UpdateOne] = []
    query = {"state": {"$in": sorted(TERMINAL)}, "expire_at": {"$exists": False}}
    for doc in orders.find(query, {"completed_at": 1, "updated_at": 1}):
        finished = doc.get("completed_at") or doc.get("updated_at")
        if finished is None:
            continue
        pending.append(UpdateOne({"_id": doc["_id"]},
                                 {"$set": {"expire_at": finished + ORDER_RETENTION}}))
        if len(pending) >= 1000:
            orders.bulk_write(pending, ordered=False)
            pending = []
    if pending:
        orders.bulk_write(pending, ordered=False)


def apply(db: Database[dict[str, Any]]) -> None:
    for name in (dbm.CERTIFICATES, dbm.ORDERS, dbm.JOBS, FIRES, dbm.METRICS_SNAPSHOTS):
        _ensure(db, name)
    certificates = db[dbm.CERTIFICATES]
    certificates.create_indexes(CERTIFICATE_INDEXES)
    present = set(certificates.index_information())
    for name in REPLACED:
        if name in present:
            certificates.drop_index(name)

    db[dbm.ORDERS].create_indexes([IndexModel([("expire_at", ASCENDING)],
                                              expireAfterSeconds=0, name="ttl_expire_at")])
    _backfill_orders(db)
    db[dbm.JOBS].create_indexes([
        IndexModel([("slot_expire_at", ASCENDING)], expireAfterSeconds=0,
                   name="ttl_slot_expire_at"),
        # The renewal scan asks which of a batch's keys have an active job (by key alone).
        IndexModel([("dedupe_key", ASCENDING)], name="dedupe_key"),
    ])
    fires = db[FIRES].index_information().get("ttl_fired_at")
    if fires is None:
        db[FIRES].create_index([("fired_at", ASCENDING)], name="ttl_fired_at",
                               expireAfterSeconds=int(FIRES_TTL_SECONDS))
    elif fires.get("expireAfterSeconds") != int(FIRES_TTL_SECONDS):
        db.command({"collMod": FIRES, "index": {
            "name": "ttl_fired_at", "expireAfterSeconds": int(FIRES_TTL_SECONDS)}})
    db[dbm.METRICS_SNAPSHOTS].create_indexes([
        IndexModel([("expire_at", ASCENDING)], expireAfterSeconds=0, name="ttl_expire_at"),
        IndexModel([("generation", ASCENDING), ("family", ASCENDING), ("seq", ASCENDING)],
                   name="generation_family_seq"),
    ])

