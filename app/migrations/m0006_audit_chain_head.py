"""The audit chain head exists before the first mutation.

``record()`` reads and advances the ``counters`` document ``audit`` in each mutation's
transaction. Were it created by the first mutations themselves, two of them racing on a
fresh database would both try to insert it; an insert that collides inside a transaction
can surface as a duplicate-key error rather than a retried write conflict. Creating it
here (seq 0, the genesis hash) leaves every transaction an update.
"""

from pymongo.database import Database

from app import db as dbm
from app.audit.log import CHAIN_ID, GENESIS_HASH
from app.db import Doc

VERSION = 6
DESCRIPTION = "create the audit chain head (seq 0) and the audit_sinks collection"


def apply(db: Database[Doc]) -> None:
    db[dbm.COUNTERS].update_one({"_id": CHAIN_ID},
                                {"$setOnInsert": {"seq": 0, "hash": GENESIS_HASH}},
                                upsert=True)
    if dbm.SINKS not in db.list_collection_names():
        db.create_collection(dbm.SINKS)
