"""Short transactions for every write to a job document.

Why every write, even a single update: a worker killed in the middle of a transaction
leaves it open on the server until the transaction lifetime limit (60 s on mongod)
aborts it. A plain (non-transactional) write to the same document then waits out that
limit inside the server — and on the embedded server it can hold a server-wide lock
while it waits, stalling everything. Inside a transaction the conflict instead surfaces
at once as a WriteConflict: we retry a few times with backoff and then give up (a
claim becomes a no-op, the reaper skips the job until its next pass), so one dead
worker's leftover costs one job a minute, never the fleet.

``run(db, fn, attempts=...)`` runs ``fn(session)`` in a majority transaction on the
primary. Transient errors (write conflicts, step-downs, dropped connections) retry the
whole transaction with jittered backoff up to ``attempts``; a commit whose outcome is
unknown is re-committed (idempotent) before anything is retried. Callers whose ``fn`` is
not idempotent must fence it themselves (every job transition is: it names the lease
token or the state it expects).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from pymongo import ReadPreference
from pymongo.client_session import ClientSession
from pymongo.database import Database
from pymongo.errors import PyMongoError, ServerSelectionTimeoutError
from pymongo.read_concern import ReadConcern

from app import db as dbm
from app.errors import DatabaseUnavailable

log = logging.getLogger(__name__)

T = TypeVar("T")
Doc = dict[str, Any]

UNKNOWN_COMMIT = "UnknownTransactionCommitResult"


def _commit(session: ClientSession) -> None:
    for attempt in range(5):
        try:
            session.commit_transaction()
            return
        except PyMongoError as exc:
            if not exc.has_error_label(UNKNOWN_COMMIT) or attempt == 4:
                raise
            time.sleep(dbm.backoff_delay(attempt, 0.05, 1.0))


def run(db: Database[Doc], fn: Callable[[ClientSession], T], *, attempts: int = 6,
        what: str = "job transaction", retry_while: Callable[[], bool] | None = None) -> T:
    """Run ``fn(session)`` in a transaction; retry transient errors ``attempts`` times,
    and beyond that for as long as ``retry_while()`` holds (a handler's transaction
    retries while its lease is valid: contention on a shared document such as the audit
    chain head is expected there)."""
    attempt = -1
    while True:
        attempt += 1
        try:
            with db.client.start_session() as session:
                session.start_transaction(read_concern=ReadConcern("majority"),
                                          write_concern=dbm.MAJORITY,
                                          read_preference=ReadPreference.PRIMARY,
                                          max_commit_time_ms=10_000)
                try:
                    result = fn(session)
                except BaseException:
                    if session.in_transaction:
                        with contextlib.suppress(PyMongoError):
                            session.abort_transaction()
                    raise
                _commit(session)
                return result
        except ServerSelectionTimeoutError as exc:
            raise DatabaseUnavailable(f"{what}: database unreachable", retry_after=5) from exc
        except PyMongoError as exc:
            if not dbm.is_transient(exc) or exc.has_error_label(UNKNOWN_COMMIT):
                raise
            if attempt >= attempts - 1 and not (retry_while is not None and retry_while()):
                raise DatabaseUnavailable(f"{what}: gave up after {attempts} attempts: "
                                          f"{str(exc)[:200]}", retry_after=5) from exc
            delay = dbm.backoff_delay(attempt, 0.02, 1.0)
            log.info("transient error in a job transaction, retrying",
                     extra={"what": what, "attempt": attempt + 1, "delay_s": round(delay, 3),
                            "error": f"{exc.__class__.__name__}: {exc}"[:200],
                            "event": "jobs.txn_retry"})
            time.sleep(delay)


def update_one(db: Database[Doc], filter: Doc, update: Doc, *, attempts: int = 6,
               what: str = "update job") -> bool:
    """One conditional update in its own transaction; True when it matched."""
    jobs = dbm.primary(db)[dbm.JOBS]

    def fn(session: ClientSession) -> bool:
        return jobs.update_one(filter, update, session=session).matched_count == 1

    return run(db, fn, attempts=attempts, what=what)
