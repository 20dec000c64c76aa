"""HTTP-01 and TLS-ALPN-01 challenge records (the ``challenges`` collection).

A record holds one token's key authorization while the CA validates it (token unique,
TTL index on ``expires_at``); every api replica serves it at
``/.well-known/acme-challenge/<token>`` (``app.acme.responder``, given ``key_authorization``
as its lookup), and answers TLS-ALPN-01 for the record's identifier
(``app.acme.tlsalpn``, given ``tls_alpn_key_authorization``). Records are removed after
use and expire on their own if a worker dies first.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from pymongo.database import Database

from app import db as dbm
from app.acme.solvers import Challenge
from app.db import Doc

CHALLENGE_TTL = timedelta(hours=2)


class Http01Records:
    """The store behind ``app.acme.solvers.Http01Solver``."""

    def __init__(self, db: Database[Doc]) -> None:
        self.db = db

    def put(self, challenge: Challenge) -> None:
        now = datetime.now(UTC)
        dbm.retry(lambda: self.db[dbm.CHALLENGES].update_one(
            {"_id": challenge.token},
            {"$set": {"token": challenge.token, "type": challenge.type,
                      "key_authorization": challenge.key_authorization,
                      "identifier": challenge.identifier, "order_id": challenge.order_id,
                      "certificate_id": challenge.certificate_id,
                      "project_id": challenge.project_id, "created_at": now,
                      "expires_at": now + CHALLENGE_TTL}},
            upsert=True), what="store http-01 challenge")

    def remove(self, tokens: list[str]) -> None:
        if tokens:
            dbm.retry(lambda: self.db[dbm.CHALLENGES].delete_many({"_id": {"$in": tokens}}),
                      what="remove http-01 challenges")


def remove_for_order(db: Database[Doc], order_id: str) -> int:
    """Remove every http-01 record of an order (after it finished, either way)."""
    result = dbm.retry(lambda: db[dbm.CHALLENGES].delete_many({"order_id": order_id}),
                       what="remove order's challenges")
    return int(result.deleted_count)


def key_authorization(db: Database[Doc], token: str) -> str | None:
    """The stored key authorization of ``token`` (read from the primary: the worker
    wrote it a moment ago)."""
    primary = dbm.primary(db)
    doc = dbm.retry(lambda: primary[dbm.CHALLENGES].find_one({"_id": token},
                                                             {"key_authorization": 1}),
                    what="read http-01 challenge", attempts=3)
    value = doc.get("key_authorization") if doc else None
    return str(value) if value else None


def tls_alpn_key_authorization(db: Database[Doc], identifier: str) -> str | None:
    """The key authorization of the newest pending tls-alpn-01 challenge for
    ``identifier`` (the SNI name of the CA's validation connection)."""
    primary = dbm.primary(db)
    doc = dbm.retry(lambda: primary[dbm.CHALLENGES].find_one(
        {"identifier": identifier, "type": "tls-alpn-01"}, {"key_authorization": 1},
        sort=[("created_at", -1)]), what="read tls-alpn-01 challenge", attempts=3)
    value = doc.get("key_authorization") if doc else None
    return str(value) if value else None
