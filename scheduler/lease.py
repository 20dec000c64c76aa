"""The scheduler's leader lease: one document in ``leases``, acquired, renewed, released.

It is ``app.db.lease``'s primitive with the term as its token; this module adds the
local proof and the ending of a lapsed holder's session. Each step is a single
``find_one_and_update`` with a majority write. Expiry is decided on
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
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from bson import Binary
from pymongo.client_session import ClientSession
from pymongo.database import Database
from pymongo.errors import ExecutionTimeout, OperationFailure

from app import db as dbm
from app.config import Settings
from app.db import Doc
from app.db.lease import Lease as DbLease
from app.db.lease import LeaseSchema, NotHeld, process_identity
from app.db.names import SCHEDULER_LEASE_ID

log = logging.getLogger("certautopilot.scheduler.lease")

# The scheduler's lease document: top-level fields, and a counter token, the term, that
# rises at every acquisition (so each reign has its own number).
SCHEDULER_LEASE = LeaseSchema(holder="holder", expires_at="expires_at", token="term",
                              counter=True)

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


class Lease(DbLease):
    """The leader lease on ``leases/<config.name>`` held under ``holder``: the
    ``app.db.lease`` primitive, whose token is the term, plus the local proof and the
    ending of a lapsed holder's session.

    ``acquire``, ``renew`` and ``release`` return whether they succeeded; a database that
    cannot be reached raises ``app.errors.DatabaseUnavailable`` (the caller must then
    treat the lease as unproven: see ``held``).
    """

    def __init__(self, db: Database[Doc], config: LeaseConfig, holder: str | None = None,
                 *, clock: Callable[[], float] = time.monotonic) -> None:
        self.db = dbm.primary(db)
        self.config = config
        self.clock = clock
        self.valid_until = 0.0  # local monotonic deadline of our proof
        self.renewed_at: datetime | None = None
        super().__init__(self.db[dbm.LEASES], {"_id": config.name},
                         holder or process_identity(), config.lease_seconds,
                         schema=SCHEDULER_LEASE, upsert=True, what="scheduler lease",
                         fresh_clock=True)

    @property
    def db(self) -> Database[Doc]:
        return self._db

    @db.setter
    def db(self, db: Database[Doc]) -> None:
        self._db = db
        self.collection = db[dbm.LEASES]

    @property
    def term(self) -> int | None:
        """The term we hold, or None. Kept after a failed renewal (the database may come
        back before the server-side expiry); cleared when the lease is known lost."""
        return None if self.token is None else int(self.token)

    def held(self) -> bool:
        """Whether we can prove, right now, that we hold the lease."""
        return self.term is not None and self.clock() < self.valid_until

    def seconds_left(self) -> float:
        return max(0.0, self.valid_until - self.clock()) if self.term is not None else 0.0

    def _prove(self, doc: Doc, started: float) -> None:
        self.renewed_at = doc.get("renewed_at")
        self.valid_until = started + self.config.lease_seconds - self.config.safety_seconds

    def forget(self) -> None:
        """Drop our claim locally (lost, deposed or released)."""
        super().forget()
        self.valid_until = 0.0

    def acquire(self, session_id: Mapping[str, Any] | None = None) -> bool:  # type: ignore[override]
        """Take the lease if it is free, released, expired on the server's clock, or
        already ours; a new term every time. False when someone else holds it.

        ``session_id`` is the session the new holder will run its fenced transactions on
        (recorded as ``holder_lsid``). When the lease document is locked by a lapsed
        holder's unfinished transaction, that holder's session is ended first."""
        for _ in range(2):
            started = self.clock()
            now = self.now()
            try:
                doc = super().acquire(
                    now=now, max_time_ms=self.config.acquire_wait_ms,
                    also={"renewed_at": now, "lease_seconds": self.config.lease_seconds,
                          "holder_lsid": session_id})
            except ExecutionTimeout:
                # Locked by an unfinished transaction: the holder's, in the middle of a
                # fenced write (normal), or a paused/dead holder's (fence it off).
                if self.fence_off_lapsed_holder():
                    continue
                self.forget()
                return False
            if doc is None:
                return False
            self._prove(doc, started)
            return True
        self.forget()
        return False

    def fence_off_lapsed_holder(self) -> bool:
        """If the lease has expired (server clock) under another holder, end that
        holder's recorded session so its unfinished transaction aborts and releases its
        locks. True when a session was ended."""
        doc = self.read()
        if not doc or doc.get("holder") in (None, self.holder):
            return False
        if doc.get("expires_at") is None or doc["expires_at"] > self.now():
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

    def renew(self) -> bool:  # type: ignore[override]
        """Extend our lease if it is still ours, under our term and unexpired on the
        server's clock. False (and the claim dropped) when it is not."""
        if self.term is None:
            return False
        started = self.clock()
        doc = super().renew(max_time_ms=self.config.wait_ms)
        if doc is None:
            return False
        self._prove(doc, started)
        return True

    def release(self) -> bool:  # type: ignore[override]
        """Give the lease up at once so a standby can take it (SIGTERM, close)."""
        if self.term is None:
            return False
        return super().release(also=self._released_fields(), max_time_ms=self.config.wait_ms)

    def _released_fields(self, now: datetime | None = None) -> Doc:
        return {"released_at": now or self.now(), "released_by": self.holder,
                "holder_lsid": None}

    def release_unrecorded(self) -> bool:
        """Release the lease if the document names us as holder although we recorded no
        term: an acquisition that a signal interrupted after the server granted it. The
        holder identity is this process's own, so nobody else's lease is touched."""
        holder = self.schema.path(self.schema.holder)
        now = self.now()
        doc = dbm.retry(lambda: self.collection.find_one_and_update(
            {**self.key, holder: self.holder},
            {"$set": {**self.schema.released(now), **self._released_fields(now)}},
            maxTimeMS=self.config.wait_ms), what="release the scheduler lease", attempts=3)
        return doc is not None

    def fence(self, session: ClientSession, now: datetime | None = None) -> None:
        """Inside a transaction: prove the lease is ours under our term and unexpired at
        ``now`` (server clock), or raise ``Deposed`` (see ``app.db.lease.Lease.fence``)."""
        if self.term is None:
            raise Deposed(self.holder, None, "no lease held")
        try:
            super().fence(session, now)
        except NotHeld:
            raise Deposed(self.holder, self.term,
                          "the lease has another holder, a newer term, or expired") from None
