"""ACME orders as a persisted state machine (the ``orders`` collection).

One document per attempt to obtain a certificate. Every step is saved before the next
one starts, so a worker that dies anywhere leaves a document a peer can resume from:

    created ──newOrder──▶ pending ──(authorizations valid)──fenced──▶ finalizing
       │                     │                                             │
       ▼                     ▼                                             ▼
    invalid / expired / abandoned              downloaded ──▶ completed

Saved states (each before the next step):

- ``created``: the private key is sealed (``key_id``) and the CSR stored; no CA call yet.
- ``pending``: the CA returned the order; ``order_url``, the authorization URLs and the
  finalize URL are stored the moment it answers. Per authorization the challenge and
  ``answered_at`` are saved once the answer was sent.
- ``finalizing``: written in a transaction fenced by the job's lease token just before
  the finalize request, so two workers never finalize one order.
- ``downloaded``: the certificate URL and the PEM chain.
- ``completed``: the certificate document holds the result (same transaction).

The CA's intermediate states need no save of their own: ``ready`` leads straight to the
fenced ``finalizing``, ``processing`` only means waiting, and ``valid`` is saved (with
the certificate URL) only when the download fails. ``ready``/``processing``/``valid``
stay in the machine for orders written that way and for reading the CA's state.

A resumed job fetches the order by URL and continues from the CA's real state; a new
order is created only when the stored one is invalid or expired at the CA.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from datetime import timedelta

from pymongo import DESCENDING
from pymongo.client_session import ClientSession
from pymongo.database import Database

from app import db as dbm
from app.db import Doc
from app.domain.projects import now_ms
from app.errors import Conflict, NotFound

CREATED = "created"
PENDING = "pending"
READY = "ready"
FINALIZING = "finalizing"
PROCESSING = "processing"
VALID = "valid"
DOWNLOADED = "downloaded"
COMPLETED = "completed"
INVALID = "invalid"
EXPIRED = "expired"
ABANDONED = "abandoned"

STATES = (CREATED, PENDING, READY, FINALIZING, PROCESSING, VALID, DOWNLOADED, COMPLETED,
          INVALID, EXPIRED, ABANDONED)
TERMINAL = frozenset({COMPLETED, INVALID, EXPIRED, ABANDONED})
# A finished order is kept this long, then its TTL index (m0010, ``expire_at``) removes
# it: one order per renewal must not pile up for ever (the certificate keeps its result).
ORDER_RETENTION = timedelta(days=180)
ACTIVE = tuple(s for s in STATES if s not in TERMINAL)

# Allowed transitions. A resumed order may find the CA ahead of what was saved (a crash
# after the CA moved but before the save), so forward jumps are allowed; going back is not
# (except finalizing → finalizing, which re-fences under a new lease).
TRANSITIONS: dict[str, frozenset[str]] = {
    CREATED: frozenset({PENDING, READY, INVALID, ABANDONED}),
    PENDING: frozenset({PENDING, READY, FINALIZING, PROCESSING, VALID, DOWNLOADED, INVALID,
                        EXPIRED, ABANDONED}),
    READY: frozenset({FINALIZING, PROCESSING, VALID, DOWNLOADED, INVALID, EXPIRED,
                      ABANDONED}),
    FINALIZING: frozenset({FINALIZING, PROCESSING, VALID, DOWNLOADED, INVALID, EXPIRED,
                           ABANDONED}),
    PROCESSING: frozenset({VALID, DOWNLOADED, INVALID, EXPIRED, ABANDONED}),
    VALID: frozenset({DOWNLOADED, COMPLETED, ABANDONED}),
    DOWNLOADED: frozenset({COMPLETED, ABANDONED}),
    COMPLETED: frozenset(),
    INVALID: frozenset(),
    EXPIRED: frozenset(),
    ABANDONED: frozenset(),
}


class OrderStateConflict(Conflict):
    """The order is not in a state that allows this step (another worker moved it)."""

    code = "order_state_conflict"


def can_transition(current: str, target: str) -> bool:
    return target in TRANSITIONS.get(current, frozenset())


def sources_of(target: str) -> list[str]:
    """Every state from which ``target`` may be entered."""
    return [state for state, targets in TRANSITIONS.items() if target in targets]



def new_order_doc(*, certificate: Doc, account: Doc, job_id: str | None, reason: str,
                  identifiers: list[dict[str, str]], key_type: str, key_id: str,
                  csr_pem: str, challenge: Doc, profile: str | None,
                  replaces: str | None, attempt: int) -> Doc:
    now = now_ms()
    return {
        "_id": "ord_" + secrets.token_hex(8),
        "certificate_id": certificate["_id"],
        "project_id": certificate["project_id"],
        "account_id": account["_id"],
        "directory_url": account["directory_url"],
        "job_id": job_id,
        "attempt": attempt,
        "reason": reason,
        "identifiers": identifiers,
        "names": [i["value"] for i in identifiers],
        "key_type": key_type,
        "key_id": key_id,
        "csr_pem": csr_pem,
        "challenge": challenge,
        "profile": profile,
        "replaces": replaces,
        "state": CREATED,
        "order_url": None,
        "finalize_url": None,
        "certificate_url": None,
        "authorizations": [],
        "expires": None,
        "error": None,
        "fence": None,
        "history": [{"state": CREATED, "at": now}],
        "created_at": now,
        "updated_at": now,
        "started_at": now,
        "completed_at": None,
    }


def insert(db: Database[Doc], order: Doc, session: ClientSession | None = None) -> Doc:
    db[dbm.ORDERS].insert_one(order, session=session)
    return order


def get(db: Database[Doc], order_id: str) -> Doc:
    doc = dbm.retry(lambda: dbm.primary(db)[dbm.ORDERS].find_one({"_id": order_id}),
                    what="read order")
    if doc is None:
        raise NotFound(f"order {order_id} not found")
    return doc


def latest_for_job(db: Database[Doc], job_id: str) -> Doc | None:
    """The most recent order of a job (a resumed job continues it)."""
    return dbm.retry(lambda: dbm.primary(db)[dbm.ORDERS].find_one(
        {"job_id": job_id}, sort=[("created_at", DESCENDING)]), what="read job's order")


def list_for_certificate(db: Database[Doc], certificate_id: str, *, limit: int = 50,
                         project_id: str | None = None) -> list[Doc]:
    return list_orders(db, certificate_id=certificate_id, project_id=project_id, limit=limit)


def list_orders(db: Database[Doc], *, certificate_id: str | None = None,
                project_id: str | None = None, state: str | None = None,
                limit: int = 50) -> list[Doc]:
    """Orders, newest first, filtered by whichever of the arguments are given."""
    query: Doc = {key: value for key, value in (("certificate_id", certificate_id),
                                                ("project_id", project_id),
                                                ("state", state)) if value is not None}
    return dbm.retry(lambda: list(db[dbm.ORDERS].find(
        query, sort=[("created_at", DESCENDING)], limit=max(1, min(limit, 500)))),
        what="list orders")


# How many of a certificate's earlier orders a new attempt looks at for leftover records.
LEFTOVER_LOOKBACK = 10


def with_leftover_dns_records(db: Database[Doc], certificate_id: str,
                              exclude_id: str) -> list[Doc]:
    """Earlier orders of the certificate whose dns-01 records were never removed (the
    worker died, or the removal failed): the next attempt removes them."""
    return dbm.retry(lambda: list(dbm.primary(db)[dbm.ORDERS].find(
        {"certificate_id": certificate_id, "_id": {"$ne": exclude_id},
         "challenges_cleaned_at": None, "authorizations.challenge.type": "dns-01"},
        sort=[("created_at", DESCENDING)], limit=LEFTOVER_LOOKBACK)),
        what="find orders with leftover dns-01 records")


def mark_challenges_cleaned(db: Database[Doc], order_id: str) -> None:
    """Every challenge record of the order is gone (whatever its state)."""
    dbm.retry(lambda: db[dbm.ORDERS].update_one(
        {"_id": order_id}, {"$set": {"challenges_cleaned_at": now_ms()}}),
        what="mark order's challenges cleaned")


def transition(db: Database[Doc], order: Doc, target: str, *,
               fields: Doc | None = None, session: ClientSession | None = None,
               expect: Iterable[str] | None = None, extra_query: Doc | None = None) -> Doc:
    """Move ``order`` to ``target`` if its stored state allows it; save ``fields`` with it.

    The update is conditional on the stored state (and ``extra_query``), so a step that a
    peer already took fails with ``OrderStateConflict`` instead of being done twice.
    Returns the order as updated in memory.
    """
    if target not in STATES:
        raise ValueError(f"unknown order state {target}")
    allowed = list(expect) if expect is not None else sources_of(target)
    now = now_ms()
    changes: Doc = {"state": target, "updated_at": now, **(fields or {})}
    if target in TERMINAL:
        changes.setdefault("completed_at", now)
        changes.setdefault("expire_at", changes["completed_at"] + ORDER_RETENTION)
    query: Doc = {"_id": order["_id"], "state": {"$in": allowed}, **(extra_query or {})}
    update: Doc = {"$set": changes}
    if not (order.get("state") == target and target in TRANSITIONS[target]):
        # (a self-loop, e.g. finalizing re-fenced, adds no history entry)
        update["$push"] = {"history": {"$each": [{"state": target, "at": now}],
                                       "$slice": -50}}

    def run() -> int:
        return db[dbm.ORDERS].update_one(query, update, session=session).matched_count

    matched = run() if session is not None else dbm.retry(run, what="save order step")
    if not matched:
        current = dbm.primary(db)[dbm.ORDERS].find_one({"_id": order["_id"]}, {"state": 1},
                                                       session=session)
        state = current.get("state") if current else "missing"
        raise OrderStateConflict(f"order {order['_id']} is {state}; cannot move to {target}")
    order.update(changes)
    if update.get("$push"):
        order.setdefault("history", []).append({"state": target, "at": now})
    return order


def save_fields(db: Database[Doc], order: Doc, fields: Doc, *,
                session: ClientSession | None = None) -> Doc:
    """Save progress within the current state (authorization steps, Retry-After...)."""
    changes = {**fields, "updated_at": now_ms()}

    def run() -> int:
        return db[dbm.ORDERS].update_one(
            {"_id": order["_id"], "state": order["state"]}, {"$set": changes},
            session=session).matched_count

    matched = run() if session is not None else dbm.retry(run, what="save order progress")
    if not matched:
        raise OrderStateConflict(f"order {order['_id']} left state {order['state']}")
    for key, value in fields.items():
        if "." not in key:
            order[key] = value
    return order


def public_view(order: Doc) -> Doc:
    """An order as shown to users (no CSR, no PEM; everything else is not secret)."""
    hidden = {"csr_pem", "fullchain_pem"}
    view = {k: v for k, v in order.items() if k not in hidden and k != "_id"}
    view["id"] = order["_id"]
    return view
