"""The scheduler's leader lease: one document in ``leases``, acquired, renewed, released.

Each step is a single ``find_one_and_update`` with a majority write. Expiry is decided on
the database server's clock: ``now`` is read from the server (``hello.localTime``) and
compared with plain query operators, never ``$$NOW`` in expressions (DESIGN.md,
Environments). ``term`` rises at every acquisition, so each reign has its own number;
writes made on behalf of a leader are fenced by it (``fence``).

Fenced transactions write the lease document, so a takeover conflicts with them. A
holder paused (or killed) in the middle of such a transaction would therefore hold a
write lock on the lease until the server gives the transaction up (60 s on mongod, never
on the embedded server). So the holder runs its fenced transactions on one session whose
id it records in the lease (``holder_lsid``), and whoever takes over an *expired* lease
first ends that session (``killSessions``): the lapsed holder's transaction is aborted,
its locks go, and its commit, should it wake up, fails.

The holder also keeps a local proof: the monotonic instant before its last successful
acquire/renew plus the lease length, less a safety margin. The server set the lease's
expiry from a clock reading taken *after* that instant, so while the local proof holds
the server-side lease does too. A paused process (SIGSTOP, GC, VM freeze) finds its proof
expired when it wakes, because the monotonic clock keeps running.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from typing import Any
from uuid import UUID

from bson import Binary
from pymongo import ReturnDocument
from pymongo.client_session import ClientSession
from pymongo.database import Database
from pymongo.errors import DuplicateKeyError, ExecutionTimeout, OperationFailure

from app import db as dbm
from app.config import Settings
from app.scheduling_status import SCHEDULER_LEASE_ID

log = logging.getLogger("certautopilot.scheduler.lease")

Doc = dict[str, Any]

_PROCESS_IDENTITY: str | None = None


def process_identity() -> str:
    """This process's holder name, ``host:pid:random``: stable for the life of the
    process (Celery builds several scheduler objects), distinct across restarts."""
    global _PROCESS_IDENTITY
    pid = str(os.getpid())
    if _PROCESS_IDENTITY is None or _PROCESS_IDENTITY.split(":")[-2] != pid:  # forked
        _PROCESS_IDENTITY = f"{socket.gethostname()}:{pid}:{uuid.uuid4().hex[:8]}"
    return _PROCESS_IDENTITY


class Deposed(Exception):
    """The lease is no longer ours (another holder, a newer term, or expired)."""

    def __init__(self, holder: str, term: int | None, reason: str) -> None:
        self.holder = holder
        self.term = term
        self.reason = reason
        super().__init__(f"lease of {holder} (term {term}) is gone: {reason}")


@dataclass(frozen=True)
class LeaseConfig:
    """How long a lease lasts and how often it is renewed or sought."""

    # Document id in ``leases``.
    name: str = SCHEDULER_LEASE_ID
    # CAP_SCHEDULER_LEASE_SECONDS: a holder that stops renewing loses the lease after this.
    lease_seconds: float = 15.0
    # CAP_SCHEDULER_RENEW_SECONDS: the holder renews this often (well inside the lease).
    renew_seconds: float = 5.0
    # CAP_SCHEDULER_RETRY_SECONDS: a standby tries to acquire this often.
    retry_seconds: float = 2.0

    @classmethod
    def from_settings(cls, settings: Settings, name: str = SCHEDULER_LEASE_ID) -> LeaseConfig:
        return cls(name=name, lease_seconds=settings.scheduler_lease_seconds,
                   renew_seconds=settings.scheduler_renew_seconds,
                   retry_seconds=settings.scheduler_retry_seconds)

    @property
    def wait_ms(self) -> int:
        """How long a renewal or release may wait on a locked lease document (maxTimeMS)."""
        return int(min(2.0, self.lease_seconds / 3) * 1000)

    @property
    def acquire_wait_ms(self) -> int:
        """How long an acquisition may wait on a locked lease document: briefly, as the
        holder's fenced transactions are short, and a lapsed holder's is fenced off."""
        return int(min(0.5, self.lease_seconds / 3) * 1000)

    @property
    def safety_seconds(self) -> float:
        """How much earlier than the server the holder gives up its local proof."""
        return min(1.0, 0.1 * self.lease_seconds)


class Lease:
    """A leader lease on ``leases/<config.name>`` held under ``holder``.

    ``acquire``, ``renew`` and ``release`` return whether they succeeded; a database that
    cannot be reached raises ``app.errors.DatabaseUnavailable`` (the caller must then
    treat the lease as unproven: see ``held``).
    """

    def __init__(self, db: Database[Doc], config: LeaseConfig, holder: str | None = None,
                 *, clock: Callable[[], float] = time.monotonic) -> None:
        self.db = dbm.primary(db)
        self.config = config
        self.holder = holder or process_identity()
        self.clock = clock
        # The term we hold, or None. Kept after a failed renewal (the database may come
        # back before the server-side expiry); cleared when the lease is known lost.
        self.term: int | None = None
        self.valid_until = 0.0  # local monotonic deadline of our proof
        self.expires_at: datetime | None = None  # server-side expiry of our lease
        self.renewed_at: datetime | None = None

    @property
    def collection(self) -> Any:
        return self.db[dbm.LEASES]

    def held(self) -> bool:
        """Whether we can prove, right now, that we hold the lease."""
        return self.term is not None and self.clock() < self.valid_until

    def seconds_left(self) -> float:
        return max(0.0, self.valid_until - self.clock()) if self.term is not None else 0.0

    def _prove(self, doc: Doc, started: float) -> None:
        self.term = int(doc["term"])
        self.expires_at = doc["expires_at"]
        self.renewed_at = doc.get("renewed_at")
        self.valid_until = started + self.config.lease_seconds - self.config.safety_seconds

    def forget(self) -> None:
        """Drop our claim locally (lost, deposed or released)."""
        self.term = None
        self.valid_until = 0.0
        self.expires_at = None

    def _expiry(self, now: datetime) -> datetime:
        return now + timedelta(seconds=self.config.lease_seconds)

    def acquire(self, session_id: Mapping[str, Any] | None = None) -> bool:
        """Take the lease if it is free, released, expired on the server's clock, or
        already ours; a new term every time. False when someone else holds it.

        ``session_id`` is the session the new holder will run its fenced transactions on
        (recorded as ``holder_lsid``). When the lease document is locked by a lapsed
        holder's unfinished transaction, that holder's session is ended first."""
        for _ in range(2):
            started = self.clock()
            now = dbm.server_now(self.db)
            try:
                doc = dbm.retry(partial(self._acquire_once, now, session_id),
                                what="acquire scheduler lease")
            except ExecutionTimeout:
                # Locked by an unfinished transaction: the holder's, in the middle of a
                # fenced write (normal), or a paused/dead holder's (fence it off).
                if self.fence_off_lapsed_holder():
                    continue
                self.forget()
                return False
            if doc is None or doc.get("holder") != self.holder:
                self.forget()
                return False
            self._prove(doc, started)
            return True
        self.forget()
        return False

    def _acquire_once(self, now: datetime, session_id: Mapping[str, Any] | None) -> Doc | None:
        try:
            doc: Doc | None = self.collection.find_one_and_update(
                {"_id": self.config.name,
                 "$or": [{"holder": None}, {"expires_at": {"$lte": now}},
                         {"holder": self.holder}]},
                {"$set": {"holder": self.holder, "expires_at": self._expiry(now),
                          "renewed_at": now, "acquired_at": now,
                          "lease_seconds": self.config.lease_seconds,
                          "holder_lsid": session_id},
                 "$inc": {"term": 1}},
                upsert=True, return_document=ReturnDocument.AFTER,
                maxTimeMS=self.config.acquire_wait_ms,
            )
        except DuplicateKeyError:
            return None  # the document exists and its holder is alive: contended
        return doc

    def fence_off_lapsed_holder(self) -> bool:
        """If the lease has expired (server clock) under another holder, end that
        holder's recorded session so its unfinished transaction aborts and releases its
        locks. True when a session was ended."""
        doc = self.read()
        if not doc or doc.get("holder") in (None, self.holder):
            return False
        if doc.get("expires_at") is None or doc["expires_at"] > dbm.server_now(self.db):
            return False
        lsid = doc.get("holder_lsid")
        if not lsid or "id" not in lsid:
            return False
        raw = lsid["id"]
        session = {"id": Binary.from_uuid(raw) if isinstance(raw, UUID) else raw}
        try:
            dbm.retry(lambda: self.db.client.admin.command("killSessions", [session]),
                      what="end the lapsed holder's session", attempts=2)
        except OperationFailure as exc:
            log.warning("cannot end the lapsed lease holder's session; the takeover waits "
                        "for the server to abort its transaction (%s)", exc,
                        extra={"lapsed_holder": doc.get("holder"), "term": doc.get("term")})
            return False
        log.warning("ended the lapsed lease holder's session (%s, term %s): any unfinished "
                    "transaction of it is aborted", doc.get("holder"), doc.get("term"),
                    extra={"lapsed_holder": doc.get("holder"), "term": doc.get("term")})
        return True

    def renew(self) -> bool:
        """Extend our lease if it is still ours, under our term and unexpired on the
        server's clock. False (and the claim dropped) when it is not."""
        if self.term is None:
            return False
        started = self.clock()
        now = dbm.server_now(self.db)
        term = self.term
        doc: Doc | None = dbm.retry(lambda: self.collection.find_one_and_update(
            {"_id": self.config.name, "holder": self.holder, "term": term,
             "expires_at": {"$gt": now}},
            {"$set": {"expires_at": self._expiry(now), "renewed_at": now}},
            return_document=ReturnDocument.AFTER, maxTimeMS=self.config.wait_ms,
        ), what="renew scheduler lease")
        if doc is None:
            self.forget()
            return False
        self._prove(doc, started)
        return True

    def release(self) -> bool:
        """Give the lease up at once so a standby can take it (SIGTERM, close)."""
        if self.term is None:
            return False
        term = self.term
        self.forget()
        now = dbm.server_now(self.db)
        doc = dbm.retry(lambda: self.collection.find_one_and_update(
            {"_id": self.config.name, "holder": self.holder, "term": term},
            {"$set": {"holder": None, "expires_at": now, "released_at": now,
                      "released_by": self.holder, "holder_lsid": None}},
            maxTimeMS=self.config.wait_ms,
        ), what="release scheduler lease", attempts=3)
        return doc is not None

    def fence(self, session: ClientSession, now: datetime) -> None:
        """Inside a transaction: prove the lease is ours under our term and unexpired at
        ``now`` (server clock), or raise ``Deposed``.

        This *writes* the lease document rather than only reading it: a transaction's
        reads do not conflict with a concurrent acquisition, but its writes do, so a
        standby that takes the lease meanwhile aborts this transaction (WriteConflict;
        the retry then fails this check) or waits for it to commit first.
        """
        if self.term is None:
            raise Deposed(self.holder, None, "no lease held")
        result = self.collection.update_one(
            {"_id": self.config.name, "holder": self.holder, "term": self.term,
             "expires_at": {"$gt": now}},
            {"$set": {"fenced_at": now}}, session=session,
        )
        if result.matched_count != 1:
            raise Deposed(self.holder, self.term,
                          "the lease has another holder, a newer term, or expired")

    def read(self) -> Doc | None:
        """The lease document as stored (for logs, the banner and status)."""
        doc: Doc | None = dbm.retry(
            lambda: self.collection.find_one({"_id": self.config.name}),
            what="read scheduler lease", attempts=2)
        return doc
