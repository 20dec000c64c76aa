"""The one transaction runner: majority transactions on the primary, retried as a whole on
transient errors, optionally fenced by a lease.

``run(db, fn, ...)`` runs ``fn(session)`` in a transaction (read concern and write
concern majority, primary, bounded commit time). Transient errors (write conflicts,
step-downs, dropped connections) retry the *whole* transaction with jittered backoff,
``attempts`` times and beyond that for as long as ``retry_while()`` holds (a job's
transaction retries while its lease is valid; the scheduler's while it can still prove
its lease). A commit whose outcome is unknown is re-committed (idempotent: same
transaction number) before anything is retried. ``fence(session)`` runs first in every
attempt: a write that proves the caller still holds its lease (``app.db.lease``), so
the transaction commits only under the lease. Callers whose ``fn`` is not idempotent
must fence it (every job transition does: it names the lease token or the state it
expects). ``session=`` runs every attempt on the caller's session (the scheduler records
its session id in its lease, so a successor can end it). ``after_commit(session, key,
fn)`` asks for ``fn()`` once the transaction has committed (never after an attempt that
aborts): the audit log chains the entries a transaction wrote that way
(``app.audit.log.seal``).

Why short transactions even for a single update to a contended document: a process
killed in the middle of a transaction leaves it open on the server until the
transaction lifetime limit (60 s on mongod) aborts it. A plain (non-transactional)
write to the same document then waits out that limit inside the server — and on the
embedded server it can hold a server-wide lock while it waits, stalling everything.
Inside a transaction the conflict instead surfaces at once as a WriteConflict: we retry
a few times with backoff and then give up (a claim becomes a no-op, the reaper skips the
job until its next pass), so one dead worker's leftover costs one job a minute, never
the fleet. (pymongo's ``with_transaction`` is not used: it retries for up to 120 s with
no bound on attempts, and cannot run on a caller's session with a fence.)
"""

from __future__ import annotations

import contextlib
import logging
import time
import weakref
from collections.abc import Callable, Iterator
from typing import TypeVar

from pymongo import ReadPreference
from pymongo.client_session import ClientSession
from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.errors import PyMongoError, ServerSelectionTimeoutError
from pymongo.read_concern import ReadConcern

from app.db.client import MAJORITY, backoff_delay, is_transient
from app.db.names import Doc
from app.errors import DatabaseUnavailable

log = logging.getLogger("app.db.txn")

T = TypeVar("T")

UNKNOWN_COMMIT = "UnknownTransactionCommitResult"
# How long ``transaction()`` keeps retrying a transient error beyond its attempts: as
# long as pymongo's with_transaction did, so contention on a shared document (the audit
# chain head) is waited out, not reported.
TRANSACTION_TIME_LIMIT_SECONDS = 120.0


# Per session, what to run once its current transaction commits (key -> callable).
_after_commit: weakref.WeakKeyDictionary[ClientSession, dict[str, Callable[[], object]]] = \
    weakref.WeakKeyDictionary()


def after_commit(session: ClientSession, key: str, fn: Callable[[], object]) -> None:
    """Run ``fn()`` once ``session``'s transaction commits (once per ``key``). Only
    transactions run by ``run()`` honour it; an attempt that aborts drops it. Its errors
    are logged, never raised: the transaction's work is already committed."""
    _after_commit.setdefault(session, {}).setdefault(key, fn)


def _run_after_commit(session: ClientSession, what: str) -> None:
    for key, fn in _after_commit.pop(session, {}).items():
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - committed; the callback's owner recovers
            log.warning("after-commit step failed",
                        extra={"what": what, "step": key,
                               "error": f"{exc.__class__.__name__}: {exc}"[:200]})


def _commit(session: ClientSession) -> None:
    for attempt in range(5):
        try:
            session.commit_transaction()
            return
        except PyMongoError as exc:
            if not exc.has_error_label(UNKNOWN_COMMIT) or attempt == 4:
                raise
            time.sleep(backoff_delay(attempt, 0.05, 1.0))


@contextlib.contextmanager
def _session(db: Database[Doc], given: ClientSession | None) -> Iterator[ClientSession]:
    if given is not None:
        yield given
        return
    with db.client.start_session() as session:
        yield session


def run(db: Database[Doc], fn: Callable[[ClientSession], T], *, attempts: int = 6,
        what: str = "transaction", retry_while: Callable[[], bool] | None = None,
        fence: Callable[[ClientSession], object] | None = None,
        session: ClientSession | None = None, max_commit_time_ms: int = 10_000,
        stop_on: Callable[[PyMongoError], bool] | None = None) -> T:
    """Run ``fn(session)`` in a transaction (after ``fence(session)``, if given); retry
    transient errors ``attempts`` times, and beyond that while ``retry_while()`` holds.
    Gives up with ``DatabaseUnavailable``; any other error, and a transient one for which
    ``stop_on(error)`` holds (the caller has its own answer to it), propagates
    unchanged."""
    attempt = -1
    while True:
        attempt += 1
        try:
            with _session(db, session) as current:
                current.start_transaction(read_concern=ReadConcern("majority"),
                                          write_concern=MAJORITY,
                                          read_preference=ReadPreference.PRIMARY,
                                          max_commit_time_ms=max_commit_time_ms)
                _after_commit.pop(current, None)
                try:
                    if fence is not None:
                        fence(current)
                    result = fn(current)
                except BaseException:
                    if current.in_transaction:
                        with contextlib.suppress(PyMongoError):
                            current.abort_transaction()
                    raise
                _commit(current)
                _run_after_commit(current, what)
                return result
        except ServerSelectionTimeoutError as exc:
            raise DatabaseUnavailable(f"{what}: database unreachable", retry_after=5) from exc
        except PyMongoError as exc:
            if not is_transient(exc) or exc.has_error_label(UNKNOWN_COMMIT) \
                    or (stop_on is not None and stop_on(exc)):
                raise
            if attempt >= attempts - 1 and not (retry_while is not None and retry_while()):
                raise DatabaseUnavailable(f"{what}: gave up after {attempt + 1} attempts: "
                                          f"{str(exc)[:200]}", retry_after=5) from exc
            delay = backoff_delay(attempt, 0.02, 1.0)
            log.info("transient error in a transaction, retrying",
                     extra={"what": what, "attempt": attempt + 1, "delay_s": round(delay, 3),
                            "error": f"{exc.__class__.__name__}: {exc}"[:200],
                            "event": "db.txn_retry"})
            time.sleep(delay)


def within(seconds: float) -> Callable[[], bool]:
    """A ``retry_while`` that holds for ``seconds`` from now."""
    deadline = time.monotonic() + seconds
    return lambda: time.monotonic() < deadline


def transaction(db: Database[Doc], fn: Callable[[ClientSession], T], *,
                what: str = "transaction", attempts: int = 6) -> T:
    """Run ``fn(session)`` in a transaction, retrying transient errors ``attempts`` times
    and then for up to TRANSACTION_TIME_LIMIT_SECONDS (the general-purpose runner for
    API and domain writes)."""
    return run(db, fn, attempts=attempts, what=what,
               retry_while=within(TRANSACTION_TIME_LIMIT_SECONDS))


def update_one(collection: Collection[Doc], filter: Doc, update: Doc, *, attempts: int = 6,
               what: str = "update") -> bool:
    """One conditional update in its own short transaction; True when it matched."""

    def fn(session: ClientSession) -> bool:
        return collection.update_one(filter, update, session=session).matched_count == 1

    return run(collection.database, fn, attempts=attempts, what=what)
