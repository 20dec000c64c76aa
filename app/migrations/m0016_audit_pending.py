"""The collection audit entries wait in between their mutation's commit and their seal
(``app.audit.log``: ``record()`` writes there, ``seal()`` chains them into ``audit``).

Created here because a collection created implicitly by the first insert inside a
transaction can make two racing first writers fail rather than retry. Its only index is
``_id`` (the sealer reads in ``_id`` order; the collection holds a handful of entries).
"""

from pymongo.database import Database

from app import db as dbm
from app.db import Doc

VERSION = 16
DESCRIPTION = "create audit_pending, where entries wait for their seal"


def apply(db: Database[Doc]) -> None:
    if dbm.AUDIT_PENDING not in db.list_collection_names():
        db.create_collection(dbm.AUDIT_PENDING)
