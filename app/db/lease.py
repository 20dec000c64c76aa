"""The one lease primitive: a holder, an expiry on the server's clock, a fencing token.

A lease lives in a document: in its top-level fields (the scheduler's and the migrations'
documents in ``leases``, an audit sink's state) or in one sub-document (a job's
``lease``, a KEK rotation's ``step_lease``). ``LeaseSchema`` says where, and builds the
filters and updates every lease step needs; ``Lease`` runs them on one document.

- **acquire**: one ``find_one_and_update`` that matches only while the lease is free,
  expired on the server's clock, or already ours; it writes the holder, the expiry
  (``now + seconds``) and a new token: a random one, or, for a counter lease (the
  scheduler's ``term``), the previous value plus one. Every acquisition changes the
  token, also a re-acquisition by the same holder.
- **renew**: moves the expiry, only while holder and token are ours and unexpired.
- **release**: frees the lease at once (holder and token ours, expired or not).
- **fencing**: a write made under the lease names the holder and token in its filter
  (``owned()``), or, when the lease must also be unexpired, ``held(now)``; ``fence()``
  does it inside a transaction as a write to the lease document, so a concurrent
  takeover conflicts with the transaction instead of slipping past a read.

Expiry is decided on the database server's clock (``app.db.clock``) with plain query
operators: expired means ``expires_at <= now``, held means ``expires_at > now``.

Its users: the job lease (``app.jobs.lifecycle.JOB_LEASE``; a claim is the job's own
optimistic transaction built from the schema's filters and grant), a KEK rotation's step
lease (``app.keys.rotation``), an audit sink's forwarding lease (``app.audit.forward``),
the migrations lock (``app.migrations``) and the scheduler's leader lease
(``scheduler/lease.py``, which adds the term's local proof and ends a lapsed holder's
session).
"""

from __future__ import annotations

import os
import secrets
import socket
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from pymongo import ReturnDocument
from pymongo.client_session import ClientSession
from pymongo.collection import Collection
from pymongo.errors import DuplicateKeyError

from app.db.client import retry
from app.db.clock import server_now
from app.db.names import Doc


class NotHeld(Exception):  # noqa: N818 - reads as "the lease is not held"
    """A fenced write found the lease gone (another holder or token, or expired)."""


def new_token() -> str:
    return secrets.token_hex(16)


_PROCESS_IDENTITY: str | None = None


def process_identity() -> str:
    """This process's holder name, ``host:pid:random``: stable for the life of the
    process (Celery builds several scheduler objects), distinct across restarts and
    after a fork."""
    global _PROCESS_IDENTITY
    pid = str(os.getpid())
    if _PROCESS_IDENTITY is None or _PROCESS_IDENTITY.split(":")[-2] != pid:  # forked
        _PROCESS_IDENTITY = f"{socket.gethostname()}:{pid}:{uuid.uuid4().hex[:8]}"
    return _PROCESS_IDENTITY


@dataclass(frozen=True)
class LeaseSchema:
    """Where a lease is stored in its document. With ``within`` the lease is that
    sub-document (written whole on acquisition, ``None`` when free); otherwise its
    fields are top-level. A ``None`` field name is not recorded."""

    holder: str = "holder"
    expires_at: str = "expires_at"
    token: str = "token"
    # The token is a counter that rises at every acquisition (a term) instead of random.
    counter: bool = False
    within: str | None = None
    acquired_at: str | None = "acquired_at"
    renewed_at: str | None = "renewed_at"

    def path(self, field: str) -> str:
        return f"{self.within}.{field}" if self.within else field

    def free(self, holder: str, now: datetime) -> Doc:
        """Filter: the lease may be taken by ``holder`` at ``now``."""
        empty = {self.within: None} if self.within else {self.holder: None}
        return {"$or": [empty, {self.path(self.expires_at): {"$lte": now}},
                        {self.path(self.holder): holder}]}

    def lapsed(self, now: datetime) -> Doc:
        """Filter: the lease has expired at ``now``."""
        return {self.path(self.expires_at): {"$lte": now}}

    def owned(self, token: Any, holder: str | None = None) -> Doc:
        """Filter: the lease is still the one granted under ``token`` (to ``holder``)."""
        found: Doc = {self.path(self.token): token}
        if holder is not None:
            found[self.path(self.holder)] = holder
        return found

    def held(self, token: Any, now: datetime, holder: str | None = None) -> Doc:
        """Filter: ... and unexpired at ``now``."""
        return {**self.owned(token, holder), self.path(self.expires_at): {"$gt": now}}

    def grant(self, holder: str, seconds: float, now: datetime, **fields: Any) -> Doc:
        """The update that gives the lease to ``holder`` (with ``fields`` inside it); for a
        random-token lease the token is in it (``update["$set"]``, see ``token_of``)."""
        lease: Doc = {self.holder: holder, self.expires_at: now + timedelta(seconds=seconds)}
        if self.acquired_at:
            lease[self.acquired_at] = now
        if not self.counter:
            lease[self.token] = new_token()
        lease.update(fields)
        update: Doc = {"$set": {self.within: lease} if self.within else lease}
        if self.counter:
            update["$inc"] = {self.token: 1}
        return update

    def token_of(self, doc: Doc) -> Any:
        return self.lease_of(doc).get(self.token)

    def holder_of(self, doc: Doc) -> Any:
        return self.lease_of(doc).get(self.holder)

    def lease_of(self, doc: Doc) -> Doc:
        if self.within:
            lease = doc.get(self.within)
            return lease if isinstance(lease, dict) else {}
        return doc

    def renewal(self, seconds: float, now: datetime) -> Doc:
        """``$set`` fields that extend the lease to ``now + seconds``."""
        fields: Doc = {self.path(self.expires_at): now + timedelta(seconds=seconds)}
        if self.renewed_at:
            fields[self.path(self.renewed_at)] = now
        return fields

    def released(self, now: datetime) -> Doc:
        """``$set`` fields that free the lease (the token stays: a counter keeps rising)."""
        if self.within:
            return {self.within: None}
        return {self.holder: None, self.expires_at: now}


class Lease:
    """A lease on the document ``key`` of ``collection`` held under ``holder`` for
    ``seconds``. ``token`` and ``expires_at`` are those of our last acquisition or
    renewal (None when we hold nothing). Database errors other than contention propagate
    (``retry`` turns an unreachable database into ``DatabaseUnavailable``)."""

    def __init__(self, collection: Collection[Doc], key: Doc, holder: str, seconds: float,
                 *, schema: LeaseSchema = LeaseSchema(), upsert: bool = False,
                 what: str = "lease", fresh_clock: bool = False) -> None:
        self.collection = collection
        self.key = key
        self.holder = holder
        self.seconds = seconds
        self.schema = schema
        self.upsert = upsert
        self.what = what
        # Read the server's clock at every step instead of the sampled estimate.
        self.fresh_clock = fresh_clock
        self.token: Any = None
        self.expires_at: datetime | None = None

    def now(self) -> datetime:
        return server_now(self.collection.database, fresh=self.fresh_clock)

    def forget(self) -> None:
        """Drop our claim locally (lost, deposed or released)."""
        self.token = None
        self.expires_at = None

    def _took(self, doc: Doc | None) -> Doc | None:
        if doc is None or self.schema.holder_of(doc) != self.holder:
            self.forget()
            return None
        lease = self.schema.lease_of(doc)
        self.token = lease.get(self.schema.token)
        self.expires_at = lease.get(self.schema.expires_at)
        return doc

    def acquire(self, *, when: Doc | None = None, also: Doc | None = None,
                max_time_ms: int | None = None, now: datetime | None = None) -> Doc | None:
        """Take the lease if it is free, expired or ours (and the document matches
        ``when``); ``also`` is ``$set`` with it. Returns the document, or None when
        someone else holds it."""
        now = now or self.now()
        update = self.schema.grant(self.holder, self.seconds, now)
        if also:
            update["$set"].update(also)
        query = {**self.key, **(when or {}), **self.schema.free(self.holder, now)}
        extra: dict[str, Any] = {"maxTimeMS": max_time_ms} if max_time_ms else {}

        def take() -> Doc | None:
            try:
                return self.collection.find_one_and_update(
                    query, update, upsert=self.upsert, return_document=ReturnDocument.AFTER,
                    **extra)
            except DuplicateKeyError:
                return None  # the document exists and its holder is alive: contended

        return self._took(retry(take, what=f"acquire {self.what}"))

    def renew(self, *, also: Doc | None = None, max_time_ms: int | None = None) -> Doc | None:
        """Extend our lease while it is ours and unexpired; None (and our claim dropped)
        when it is not."""
        if self.token is None:
            return None
        now = self.now()
        query = {**self.key, **self.schema.held(self.token, now, self.holder)}
        update = {"$set": {**self.schema.renewal(self.seconds, now), **(also or {})}}
        extra: dict[str, Any] = {"maxTimeMS": max_time_ms} if max_time_ms else {}
        doc: Doc | None = retry(lambda: self.collection.find_one_and_update(
            query, update, return_document=ReturnDocument.AFTER, **extra),
            what=f"renew {self.what}")
        return self._took(doc)

    def release(self, *, also: Doc | None = None, max_time_ms: int | None = None,
                attempts: int = 3) -> bool:
        """Give the lease up at once (expired or not) so another holder can take it."""
        if self.token is None:
            return False
        query = {**self.key, **self.schema.owned(self.token, self.holder)}
        self.forget()
        now = self.now()
        update = {"$set": {**self.schema.released(now), **(also or {})}}
        extra: dict[str, Any] = {"maxTimeMS": max_time_ms} if max_time_ms else {}
        doc = retry(lambda: self.collection.find_one_and_update(query, update, **extra),
                    what=f"release {self.what}", attempts=attempts)
        return doc is not None

    def owned(self) -> Doc:
        """Filter for a write fenced by our token: add it to the write's own filter."""
        return self.schema.owned(self.token, self.holder)

    def renewal(self, now: datetime) -> Doc:
        """``$set`` fields that extend our lease: add them to a fenced write's update."""
        return self.schema.renewal(self.seconds, now)

    def fence(self, session: ClientSession, now: datetime | None = None) -> None:
        """Inside a transaction: prove the lease is ours under our token and unexpired at
        ``now`` (server clock), or raise ``NotHeld``.

        This *writes* the lease document rather than only reading it: a transaction's
        reads do not conflict with a concurrent acquisition, but its writes do, so a
        holder that takes the lease meanwhile aborts this transaction (WriteConflict; the
        retry then fails this check) or waits for it to commit first.
        """
        if self.token is None:
            raise NotHeld(f"{self.what}: no lease held")
        now = now or self.now()
        result = self.collection.update_one(
            {**self.key, **self.schema.held(self.token, now, self.holder)},
            {"$set": {self.schema.path("fenced_at"): now}}, session=session)
        if result.matched_count != 1:
            raise NotHeld(f"{self.what}: the lease has another holder, a newer token, or "
                          "expired")

    def read(self) -> Doc | None:
        """The lease's document as stored."""
        doc: Doc | None = retry(lambda: self.collection.find_one(self.key),
                                what=f"read {self.what}", attempts=2)
        return doc
