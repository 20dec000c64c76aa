"""Every index of DESIGN.md's collection table."""

from pymongo import ASCENDING, DESCENDING, IndexModel
from pymongo.database import Database

from app import db as dbm
from app.db import Doc
from app.migrations import create_indexes

VERSION = 1
DESCRIPTION = "create the indexes of every collection"

ACTIVE_JOB_STATES = ["queued", "running"]

INDEXES: dict[str, list[IndexModel]] = {
    dbm.PROJECTS: [IndexModel([("name", ASCENDING)], unique=True, name="name_unique")],
    dbm.API_TOKENS: [
        IndexModel([("token_hash", ASCENDING)], unique=True, name="token_hash_unique"),
        IndexModel([("project_id", ASCENDING)], name="project"),
    ],
    dbm.ACME_ACCOUNTS: [
        IndexModel([("project_id", ASCENDING), ("directory_url", ASCENDING),
                    ("name", ASCENDING)], unique=True, name="project_directory_name"),
        IndexModel([("account_url", ASCENDING)], name="account_url"),
    ],
    dbm.CERTIFICATES: [
        IndexModel([("next_renewal_at", ASCENDING)], name="next_renewal_at"),
        IndexModel([("project_id", ASCENDING), ("status", ASCENDING)], name="project_status"),
        IndexModel([("project_id", ASCENDING), ("names", ASCENDING)], name="project_names"),
        IndexModel([("not_after", ASCENDING)], name="not_after"),
    ],
    dbm.ORDERS: [
        IndexModel([("order_url", ASCENDING)], name="order_url", sparse=True),
        IndexModel([("certificate_id", ASCENDING), ("created_at", DESCENDING)],
                   name="certificate_created"),
        IndexModel([("job_id", ASCENDING)], name="job"),
    ],
    dbm.KEYS: [IndexModel([("project_id", ASCENDING)], name="project"),
               IndexModel([("kek_version", ASCENDING)], name="kek_version")],
    dbm.CHALLENGES: [
        IndexModel([("token", ASCENDING)], unique=True, name="token_unique"),
        IndexModel([("expires_at", ASCENDING)], expireAfterSeconds=0, name="ttl_expires_at"),
    ],
    dbm.JOBS: [
        IndexModel([("dedupe_key", ASCENDING)], unique=True, name="dedupe_key_active",
                   partialFilterExpression={"state": {"$in": ACTIVE_JOB_STATES},
                                            "dedupe_key": {"$type": "string"}}),
        IndexModel([("state", ASCENDING), ("run_after", ASCENDING)], name="state_run_after"),
        IndexModel([("state", ASCENDING), ("lease.expires_at", ASCENDING)],
                   name="state_lease_expiry"),
        IndexModel([("kind", ASCENDING), ("state", ASCENDING)], name="kind_state"),
        IndexModel([("project_id", ASCENDING), ("created_at", DESCENDING)],
                   name="project_created"),
    ],
    dbm.LEASES: [IndexModel([("expires_at", ASCENDING)], name="expires_at")],
    dbm.SCHEDULE: [IndexModel([("next_run_at", ASCENDING)], name="next_run_at")],
    dbm.AUDIT: [
        IndexModel([("seq", ASCENDING)], unique=True, name="seq_unique"),
        IndexModel([("time", ASCENDING)], name="time"),
        IndexModel([("actor.id", ASCENDING), ("time", ASCENDING)], name="actor_time"),
        IndexModel([("action", ASCENDING), ("time", ASCENDING)], name="action_time"),
        IndexModel([("target", ASCENDING), ("time", ASCENDING)], name="target_time"),
        IndexModel([("project_id", ASCENDING), ("seq", ASCENDING)], name="project_seq"),
    ],
    dbm.WORKERS: [IndexModel([("last_seen", ASCENDING)], name="last_seen")],
}


def apply(db: Database[Doc]) -> None:
    create_indexes(db, INDEXES)
