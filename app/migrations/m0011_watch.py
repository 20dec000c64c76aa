"""Drift scans and alerts: endpoint scan slots, alert deduplication, channel names,
delivery order, and orders found by serial (is a served certificate one of ours?)."""

from typing import Any

from pymongo import ASCENDING, IndexModel
from pymongo.database import Database

VERSION = 11
DESCRIPTION = "drift scans and alerts: endpoint_scans, alerts, alert_channels, deliveries"

# Literal names, the same as app.db's constants (migrate imports no application module).
INDEXES: dict[str, list[IndexModel]] = {
    "endpoint_scans": [
        IndexModel([("next_scan_at", ASCENDING)], name="next_scan_at"),
        IndexModel([("certificate_id", ASCENDING)], name="certificate_id"),
        IndexModel([("state", ASCENDING)], name="state"),
    ],
    # One open alert per key (rule|threshold|subject): 3 api replicas and 20 workers
    # evaluating at once open it once.
    "alerts": [
        IndexModel([("key", ASCENDING)], name="key_open", unique=True,
                   partialFilterExpression={"state": "open"}),
        IndexModel([("state", ASCENDING), ("rule", ASCENDING)], name="state_rule"),
        IndexModel([("opened_at", ASCENDING)], name="opened_at"),
        IndexModel([("expire_at", ASCENDING)], expireAfterSeconds=0, name="ttl_expire_at"),
    ],
    "alert_channels": [
        IndexModel([("scope", ASCENDING), ("name", ASCENDING)], name="scope_name",
                   unique=True),
    ],
    "alert_deliveries": [
        IndexModel([("channel_id", ASCENDING), ("state", ASCENDING), ("seq", ASCENDING)],
                   name="channel_state_seq"),
        IndexModel([("expire_at", ASCENDING)], expireAfterSeconds=0, name="ttl_expire_at"),
        IndexModel([("channel_id", ASCENDING), ("seq", ASCENDING)], name="channel_seq",
                   unique=True),
    ],
    "orders": [IndexModel([("serial", ASCENDING)], name="serial", sparse=True)],
}


def apply(db: Database[dict[str, Any]]) -> None:
    existing = set(db.list_collection_names())
    for name, indexes in INDEXES.items():
        if name not in existing:
            db.create_collection(name)
        db[name].create_indexes(indexes)
