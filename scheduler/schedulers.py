"""``MongoLeaseScheduler``: Celery beat where only the lease holder enqueues timed work.

Run two: ``celery -A tasks beat -S scheduler.MongoLeaseScheduler``. Each ``tick()``:

1. renews the lease when due (a standby tries to acquire it instead, and does nothing
   else: it waits ``CAP_SCHEDULER_RETRY_SECONDS``, or until the holder's lease expires,
   and wakes at once when the lease is released, through a change stream);
2. on the first tick of a new term, writes the static schedule (``scheduler/timed.py``,
   Celery's ``beat_schedule``, ``CAP_SCHEDULER_EXTRA_ENTRIES``) into ``schedule``,
   keeping each entry's run metadata and deleting static entries no longer defined;
3. fires the due entries. Each fire is one transaction that proves the lease (holder,
   term, unexpired on the server's clock: ``Lease.fence``), advances the entry's
   ``next_run_at``/``last_run_at`` from the value it read (compare-and-set), enqueues the
   job with dedupe key ``"<entry>@<slot>"`` and records the slot in ``schedule_fires``
   (unique per entry and slot). A deposed leader's transaction is refused before any of
   that; after commit the job's wake-up message is published. While the entry's previous
   job is still queued (due, unclaimed), the slot joins it instead (the fire is recorded
   with ``coalesced: true`` and that job's id): timed work is a sweep of what is due, so a
   busy fleet keeps one waiting job per entry rather than a backlog of identical ones.

When the lease cannot be renewed (database unreachable, step-down, failpoint) the leader
stops enqueuing at once and logs it; it resumes only after proving the lease again.
``close()`` — run on SIGTERM by ``celery beat`` — releases the lease so the standby takes
over immediately.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, TypeVar

from celery import Celery
from celery.beat import Scheduler
from pymongo.client_session import ClientSession
from pymongo.database import Database
from pymongo.errors import DuplicateKeyError, PyMongoError

from app import db as dbm
from app import probes
from app.config import Settings, load_or_exit
from app.db import Doc, txn
from app.db.names import FIRES
from app.db.schedule import SLOT_JOB_TTL_SECONDS, note_standby
from app.errors import DatabaseUnavailable
from app.jobs import enqueue, publish_wakeup, waiting_job
from scheduler.entries import EntryDefinition, EntryError, slot_key, static_entries
from scheduler.lease import Deposed, Lease, LeaseConfig, process_identity

log = logging.getLogger("certautopilot.scheduler")

T = TypeVar("T")

# Database trouble: the lease cannot be proven while these happen.
DB_ERRORS = (DatabaseUnavailable, PyMongoError)


class SlotTaken(Exception):
    """The entry's slot was already fired (its next_run_at moved on)."""


class MongoLeaseScheduler(Scheduler):
    """A ``celery.beat.Scheduler`` whose entries live in MongoDB and whose ticks enqueue
    durable jobs only while this process holds the scheduler lease."""

    #: Fire at most this many due entries per tick before re-checking the lease.
    max_fires_per_tick = 50
    max_interval: float

    def __init__(self, app: Celery, *args: Any, settings: Settings | None = None,
                 **kwargs: Any) -> None:
        self.settings = settings or load_or_exit()
        self.lease_config = LeaseConfig.from_settings(self.settings)
        self.identity = process_identity()
        self._db: Database[Doc] | None = None
        self._lease: Lease | None = None
        self._static: list[EntryDefinition] = []
        self._synced_term: int | None = None
        self._next_renew = 0.0
        self._suspended: str | None = None  # why the lease cannot be proven right now
        self._standby_logged = False
        self._unreachable_logged = False
        self._in_tick = False
        self._closed = False
        self._stream: Any = None
        self._session: ClientSession | None = None  # where fenced transactions run
        self._stream_failed_at = 0.0
        self._bad_entries: set[str] = set()
        super().__init__(app, *args, **kwargs)
        self.max_interval = min(float(self.max_interval), self.lease_config.renew_seconds)

    # --- plumbing ------------------------------------------------------------------------

    @property
    def db(self) -> Database[Doc]:
        if self._db is None:
            self._db = dbm.primary(dbm.get_db(self.settings))
        return self._db

    @property
    def lease(self) -> Lease:
        if self._lease is None:
            self._lease = Lease(self.db, self.lease_config, self.identity)
        return self._lease

    def setup_schedule(self) -> None:
        """Load and validate the static schedule; it is written to the database by the
        leader (on its first tick of each term), not by every process at start."""
        self._static = static_entries(self.settings, self.app.conf.beat_schedule)
        log.info("scheduler starting", extra={
            "holder": self.identity, "lease_seconds": self.lease_config.lease_seconds,
            "renew_seconds": self.lease_config.renew_seconds,
            "retry_seconds": self.lease_config.retry_seconds,
            "entries": {e.name: e.describe() for e in self._static}})

    @property
    def static_entries(self) -> list[EntryDefinition]:
        return list(self._static)

    # --- tick ----------------------------------------------------------------------------

    def tick(self, *args: Any, **kwargs: Any) -> float:
        """Lease first; then, only while leading, the due entries. Returns the delay
        before the next tick."""
        if self._closed:
            return self.max_interval
        self._in_tick = True
        try:
            if not self._lease_step():
                return self._standby_wait()
            if self._synced_term != self.lease.term:
                self._sync_static()
                if self._synced_term != self.lease.term:
                    return self._standby_wait()  # deposed, or the database failed
            return self._run_due()
        finally:
            self._in_tick = False

    def _lease_step(self) -> bool:
        """Renew (when due) or acquire. True when this process may enqueue."""
        try:
            leading = self._renew_or_acquire()
        except DB_ERRORS as exc:
            self._cannot_prove(exc)
            probes.record(self.settings, "scheduler", ok=False, error=exc)
            return False
        probes.record(self.settings, "scheduler", ok=True,
                      detail="leader" if leading else "standby")
        self._unreachable_logged = False
        if not leading and not self._standby_logged:
            self._standby_logged = True
            self._log_standby()
        if not leading:  # the dashboard shows who would take over
            note_standby(self.db, self.identity)
        return leading

    def _renew_or_acquire(self) -> bool:
        lease = self.lease
        if lease.term is not None:
            if lease.held() and not self._suspended and time.monotonic() < self._next_renew:
                return True
            term = lease.term
            if lease.renew():
                if self._suspended:
                    log.warning("scheduler lease (term %s) proven again; resuming enqueues",
                                term, extra={"holder": self.identity, "term": term})
                    self._suspended = None
                self._next_renew = time.monotonic() + self.lease_config.renew_seconds
                return True
            self._step_down("it was taken over or expired before it could be renewed")
        if lease.acquire(self._fence_session().session_id):
            self._became_leader()
            return True
        return False

    def _became_leader(self) -> None:
        lease = self.lease
        self._next_renew = time.monotonic() + self.lease_config.renew_seconds
        self._suspended = None
        self._standby_logged = False
        self._close_stream()
        log.warning("scheduler lease acquired: this process is the leader (term %s, %s)",
                    lease.term, self.identity, extra={
            "holder": self.identity, "term": lease.term, "expires_at": lease.expires_at,
            "lease_seconds": self.lease_config.lease_seconds})

    def _step_down(self, reason: str) -> None:
        term = self.lease.term
        self.lease.forget()
        self._end_session()  # the next term gets a fresh one
        self._synced_term = None
        self._suspended = None
        log.warning("scheduler lease lost (term %s): stopping enqueues; %s", term, reason,
                    extra={"holder": self.identity, "term": term})

    def _cannot_prove(self, exc: BaseException, doing: str = "renew") -> None:
        """A database error: the lease is unproven until the next successful renewal."""
        if self.lease.term is not None:
            if not self._suspended:
                log.error("cannot %s the scheduler lease: enqueues stop until it is proven "
                          "again (%s)", doing, exc,
                          extra={"holder": self.identity, "term": self.lease.term})
            self._suspended = str(exc)[:300]
        elif not self._unreachable_logged:
            self._unreachable_logged = True
            log.warning("standby cannot reach the database: %s", exc,
                        extra={"holder": self.identity})

    def _log_standby(self) -> None:
        try:
            doc = self.lease.read() or {}
        except DB_ERRORS:
            doc = {}
        log.info("scheduler is standby: %s holds the lease (term %s)", doc.get("holder"),
                 doc.get("term"), extra={
            "holder": self.identity, "leader": doc.get("holder"), "term": doc.get("term"),
            "expires_at": doc.get("expires_at")})

    def _standby_wait(self) -> float:
        """Not leading: wait for the next acquisition attempt, waking early when the lease
        is released or changes holder. Returns the remaining delay (0 = try now)."""
        retry = self.lease_config.retry_seconds
        if self._suspended or self._closed:
            return retry
        wait = retry
        lapses = False
        try:
            doc = self.lease.read()
            if doc is not None and doc.get("holder") and doc.get("expires_at"):
                left = (doc["expires_at"] - dbm.server_now(self.db, fresh=True)).total_seconds()
                wait = max(0.05, min(retry, left + 0.05))
                lapses = left + 0.05 <= retry
            elif doc is not None and not doc.get("holder"):
                wait = min(retry, 0.1)  # released a moment ago: try again soon
        except DB_ERRORS:
            return retry
        changed = self._wait_for_lease_change(wait)
        if lapses and not changed:
            # The holder let its lease run out (dead, paused, cut off): end its session
            # now, so that an unfinished transaction of it cannot hold up the takeover.
            try:
                self.lease.fence_off_lapsed_holder()
            except DB_ERRORS as exc:
                log.info("could not fence off the lapsed holder yet: %s", exc)
        return 0.0

    def _wait_for_lease_change(self, seconds: float) -> bool:
        """Block up to ``seconds``; return True early on a change of the lease's holder (a
        release or a takeover). Falls back to sleeping if change streams fail."""
        deadline = time.monotonic() + seconds
        if time.monotonic() - self._stream_failed_at > 60.0:
            try:
                if self._stream is None:
                    self._stream = self.db[dbm.LEASES].watch(
                        [{"$match": {"documentKey._id": self.lease_config.name, "$or": [
                            {"operationType": {"$in": ["insert", "replace", "delete"]}},
                            {"updateDescription.updatedFields.holder": {"$exists": True}},
                        ]}}],
                        max_await_time_ms=100)
                while time.monotonic() < deadline:
                    if self._stream.try_next() is not None:
                        return True
                return False
            except PyMongoError as exc:
                log.info("lease change stream unavailable; polling instead (%s)", exc)
                self._stream_failed_at = time.monotonic()
                self._close_stream()
        time.sleep(max(0.0, deadline - time.monotonic()))
        return False

    def _close_stream(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            try:
                stream.close()
            except PyMongoError:
                pass

    # --- fenced work -----------------------------------------------------------------------

    def _fence_session(self) -> ClientSession:
        """The one session this process's fenced transactions run on; its id is recorded
        in the lease so that a successor can end it (see scheduler/lease.py)."""
        if self._session is None:
            self._session = self.db.client.start_session()
        return self._session

    def _end_session(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            self._abort(session)
            try:
                session.end_session()
            except PyMongoError:
                pass

    @staticmethod
    def _abort(session: ClientSession) -> None:
        if session.in_transaction:
            try:
                session.abort_transaction()
            except PyMongoError:
                pass  # the server aborts it (or a successor ends the session)

    def _fenced(self, body: Callable[[ClientSession, datetime], T], what: str) -> T:
        """Run ``body(session, now)`` in a majority transaction on the lease's session,
        after proving the lease inside it (``app.db.txn.run`` with the lease as fence).
        Transient errors retry the whole transaction, but only while the lease can still
        be proven locally (at most 10 s)."""
        lease = self.lease
        deadline = time.monotonic() + max(1.0, min(10.0, lease.seconds_left()))
        proven_at: list[datetime] = []  # the server time the fence proved the lease at

        def fence(session: ClientSession) -> None:
            proven_at[:] = [dbm.server_now(self.db, fresh=True)]
            lease.fence(session, proven_at[0])

        return txn.run(self.db, lambda session: body(session, proven_at[0]), fence=fence,
                       session=self._fence_session(), attempts=1,
                       retry_while=lambda: time.monotonic() < deadline, what=what,
                       max_commit_time_ms=5000)

    def _sync_static(self) -> None:
        """Write the static schedule (definitions only; run metadata is kept) and delete
        static entries no longer defined. Fenced: only the leader of this term does it."""
        entries = self._static
        term = self.lease.term

        def body(session: ClientSession, now: datetime) -> dict[str, int]:
            schedule = self.db[dbm.SCHEDULE]
            existing = {d["_id"]: d for d in schedule.find(
                {"_id": {"$in": [e.name for e in entries]}}, session=session)}
            added = changed = 0
            for entry in entries:
                doc = existing.get(entry.name)
                if doc is None:
                    schedule.insert_one({
                        "_id": entry.name, "definition": entry.definition(),
                        "source": "static", "last_run_at": None,
                        "next_run_at": entry.first_next_run(now, None),
                        "total_run_count": 0, "created_at": now, "updated_at": now,
                    }, session=session)
                    added += 1
                elif not entry.same_definition(doc.get("definition")) \
                        or doc.get("source") != "static":
                    schedule.update_one({"_id": entry.name}, {"$set": {
                        "definition": entry.definition(), "source": "static",
                        "next_run_at": entry.first_next_run(now, doc.get("last_run_at")),
                        "updated_at": now}}, session=session)
                    changed += 1
            removed = schedule.delete_many(
                {"source": "static", "_id": {"$nin": [e.name for e in entries]}},
                session=session).deleted_count
            return {"added": added, "changed": changed, "removed": removed}

        try:
            counts = self._fenced(body, "sync static schedule")
        except Deposed as exc:
            self._step_down(exc.reason)
            return
        except DB_ERRORS as exc:
            self._cannot_prove(exc, "use")
            return
        self._synced_term = term
        if any(counts.values()):
            log.info("static schedule written (term %s): %s", term, counts,
                     extra={"term": term, **counts})

    def _run_due(self) -> float:
        """Fire every due entry (fenced), then return the delay until the next due entry
        or the next renewal, whichever comes first."""
        try:
            now = dbm.server_now(self.db, fresh=True)
            read_at = time.monotonic()
            due = list(self.db[dbm.SCHEDULE].find(
                {"next_run_at": {"$lte": now}, "_id": {"$nin": sorted(self._bad_entries)}}
            ).sort("next_run_at", 1).limit(self.max_fires_per_tick))
            for doc in due:
                # Renew when it is due, not only once the lease has run out: on a slow
                # database one fire can take seconds, and a leader that fires on until
                # its lease lapses hands it to the standby (seen in the HA drills).
                if not self.lease.held() or self._suspended or \
                        time.monotonic() >= self._next_renew:
                    return 0.0  # renew (or step down) first
                self._fire(doc, now)
                if self.lease.term is None:
                    return self._standby_wait()
            upcoming = self.db[dbm.SCHEDULE].find_one(
                {"_id": {"$nin": sorted(self._bad_entries)}}, sort=[("next_run_at", 1)])
        except DB_ERRORS as exc:
            self._cannot_prove(exc, "use")
            return self.lease_config.retry_seconds
        delays = [self.max_interval, self._next_renew - time.monotonic(),
                  self.lease.seconds_left()]
        if upcoming is not None and upcoming.get("next_run_at") is not None:
            elapsed = time.monotonic() - read_at
            delays.append((upcoming["next_run_at"] - now).total_seconds() - elapsed)
        return max(0.0, min(delays))

    def _fire(self, doc: Doc, now: datetime) -> None:
        """Fire one due entry's current slot, fenced by the lease term."""
        try:
            entry = EntryDefinition.from_doc(doc)
        except EntryError as exc:
            self._bad_entries.add(str(doc["_id"]))
            log.error("schedule entry skipped: %s", exc, extra={"entry": doc["_id"]})
            return
        expected = doc["next_run_at"]
        slot, following = entry.slot_to_fire(expected, now)
        key = slot_key(entry.name, slot)
        term, holder = self.lease.term, self.identity

        def advance(session: ClientSession, at: datetime) -> None:
            result = self.db[dbm.SCHEDULE].update_one(
                {"_id": entry.name, "next_run_at": expected},
                {"$set": {"last_run_at": slot, "next_run_at": following, "last_fired_at": at,
                          "last_term": term, "last_holder": holder},
                 "$inc": {"total_run_count": 1}}, session=session)
            if result.matched_count != 1:
                raise SlotTaken(key)

        def body(session: ClientSession, at: datetime) -> tuple[Doc, bool]:
            advance(session, at)
            # The entry's last job still waits for a worker: it will do this slot's work
            # (it starts after the slot anyway), so the slot joins it instead of queuing a
            # second job behind it. A busy fleet thus holds one queued job per entry, not
            # one per slot (the HA drills backed up on them).
            job = waiting_job(self.db, doc.get("last_job_id"), at, kind=entry.kind,
                              payload=dict(entry.payload), session=session)
            coalesced = job is not None
            if job is None:
                # A slot's job expires a day after the slot (TTL, m0010), finished or not.
                job = enqueue(self.db, entry.kind, dict(entry.payload), dedupe_key=key,
                              session=session, publish=False,
                              expire_at=slot + timedelta(seconds=SLOT_JOB_TTL_SECONDS))
                self.db[dbm.SCHEDULE].update_one({"_id": entry.name},
                                                 {"$set": {"last_job_id": job["_id"]}},
                                                 session=session)
            self.db[FIRES].insert_one({
                "entry": entry.name, "slot": slot, "dedupe_key": key, "kind": entry.kind,
                "term": term, "holder": holder, "job_id": job["_id"], "fired_at": at,
                **({"coalesced": True} if coalesced else {}),
            }, session=session)
            return job, coalesced

        try:
            job, coalesced = self._fenced(body, f"fire {key}")
        except Deposed as exc:
            self._step_down(f"refused to enqueue {key}: {exc.reason}")
            return
        except SlotTaken:
            log.info("slot already fired; skipping", extra={"dedupe_key": key})
            return
        except DuplicateKeyError:
            # schedule_fires already holds this slot (an entry removed and re-added):
            # move past it without enqueuing again.
            try:
                self._fenced(lambda s, at: advance(s, at), f"skip fired {key}")
            except (Deposed, SlotTaken):
                pass
            log.warning("slot was already fired; advanced past it", extra={"dedupe_key": key})
            return
        if coalesced:
            log.info("%s joined job %s, still queued (term %s)", key, job["_id"], term,
                     extra={"entry": entry.name, "kind": entry.kind, "slot": slot,
                            "job_id": job["_id"], "term": term, "dedupe_key": key,
                            "coalesced": True})
            return
        log.info("enqueued %s (job %s, term %s)", key, job["_id"], term, extra={
            "entry": entry.name, "kind": entry.kind, "slot": slot, "job_id": job["_id"],
            "term": term, "dedupe_key": key})
        try:
            publish_wakeup(str(job["_id"]))
        except Exception as exc:  # noqa: BLE001 - the reaper re-publishes a lost wake-up
            log.warning("could not publish the job's wake-up; the reaper will: %s", exc,
                        extra={"job_id": job["_id"]})

    # --- shutdown and banner ---------------------------------------------------------------

    def close(self) -> None:
        """Release the lease (SIGTERM and normal exit) so the standby takes over at once.

        ``celery beat``'s SIGTERM handler calls this and then raises SystemExit. If the
        signal arrived in the middle of a tick (possibly inside a transaction that wrote
        the lease document), releasing here could wait on that very transaction, so the
        release is left to the ``close()`` that runs once the tick has unwound."""
        if self._in_tick or self._closed:
            return
        self._closed = True
        self._close_stream()
        if self._session is not None:
            self._abort(self._session)  # a transaction a signal interrupted
        lease = self._lease
        if lease is not None:
            term = lease.term
            try:
                # Without a term, a signal may have interrupted an acquisition the server
                # granted: release the document if it names this process.
                released = lease.release() if term is not None else lease.release_unrecorded()
            except DB_ERRORS as exc:
                log.warning("could not release the scheduler lease; it lapses by itself "
                            "within %ss (%s)", self.lease_config.lease_seconds, exc,
                            extra={"holder": self.identity, "term": term})
            else:
                if term is not None or released:
                    log.warning("scheduler lease released (term %s)" if released else
                                "scheduler lease (term %s) was no longer ours at release",
                                term, extra={"holder": self.identity, "term": term})
        self._end_session()
        super().close()

    @property
    def info(self) -> str:
        cfg = self.lease_config
        try:
            doc = Lease(self.db, cfg, self.identity).read()
        except Exception as exc:  # noqa: BLE001 - the banner must print whatever happens
            leader = f"unknown ({exc.__class__.__name__})"
        else:
            if doc and doc.get("holder"):
                leader = (f"{doc['holder']} (term {doc.get('term')}, "
                          f"expires {doc.get('expires_at'):%H:%M:%S} UTC)")
            else:
                leader = f"none (term {doc.get('term') if doc else 0}); taking it"
        try:
            defined = self._static or static_entries(self.settings, self.app.conf.beat_schedule)
            entries = ", ".join(f"{e.name} {e.describe()}" for e in defined)
        except EntryError as exc:
            entries = f"INVALID: {exc}"
        return "\n".join([
            f"    . lease -> {dbm.LEASES}/{cfg.name} in {self.settings.mongo_db}",
            f"    . holder -> {self.identity} (this process)",
            f"    . leader -> {leader}",
            f"    . timeouts -> lease {cfg.lease_seconds:g}s, renew every "
            f"{cfg.renew_seconds:g}s, standby retry {cfg.retry_seconds:g}s",
            f"    . entries -> {entries or 'none'}",
        ])
