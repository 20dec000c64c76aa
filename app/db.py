"""MongoDB access: the one client factory, collection names, retries and transactions.

Writes are always ``w=majority`` (even when the URI omits it). Reads that decide
correctness (claims, leases) go to the primary through ``primary()``. Transient errors
(a step-down, a dropped connection, a transaction labelled transient) are retried with
bounded, jittered backoff by ``retry()`` and ``transaction()``; an unreachable database
surfaces as ``DatabaseUnavailable`` within the server-selection timeout, never a hang.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

from pymongo import MongoClient, ReadPreference, WriteConcern
from pymongo.client_session import ClientSession
from pymongo.database import Database
from pymongo.errors import (
    AutoReconnect,
    ConnectionFailure,
    NotPrimaryError,
    OperationFailure,
    PyMongoError,
    ServerSelectionTimeoutError,
    WTimeoutError,
)
from pymongo.read_concern import ReadConcern

from app.config import Settings, load_settings
from app.errors import DatabaseUnavailable

log = logging.getLogger(__name__)

T = TypeVar("T")
Doc = dict[str, Any]

# Collection names (DESIGN.md, "Collections").
PROJECTS = "projects"
API_TOKENS = "api_tokens"
ACME_ACCOUNTS = "acme_accounts"
CERTIFICATES = "certificates"
ORDERS = "orders"
KEYS = "keys"
CHALLENGES = "challenges"
JOBS = "jobs"
LEASES = "leases"
SCHEDULE = "schedule"
AUDIT = "audit"
WORKERS = "workers"
MIGRATIONS = "migrations"
COUNTERS = "counters"
# The ops dashboard's sign-in sessions (only a hash of each session id; TTL on expiry).
DASHBOARD_SESSIONS = "dashboard_sessions"
# Schedulers running as standby (who would take over the lease); TTL on expiry.
SCHEDULER_STANDBYS = "scheduler_standbys"

MAJORITY = WriteConcern(w="majority")

_clients: dict[tuple[int, str, int], MongoClient[Doc]] = {}
_clients_lock = threading.Lock()


def get_client(settings: Settings | None = None) -> MongoClient[Doc]:
    """The process's MongoClient for the configured URI (one per pid: clients are not
    fork-safe, and Celery/gunicorn fork)."""
    settings = settings or load_settings()
    uri = settings.require_mongo_uri()
    key = (os.getpid(), uri, settings.mongo_timeout_ms)
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            client = MongoClient(
                uri,
                w="majority",
                tz_aware=True,
                uuidRepresentation="standard",
                serverSelectionTimeoutMS=settings.mongo_timeout_ms,
                connectTimeoutMS=settings.mongo_timeout_ms,
                appname="certautopilot",
                retryWrites=True,
                retryReads=True,
                # Poll the topology: after a step-down or NotWritablePrimary the driver
                # re-checks at once instead of waiting on a streaming hello.
                serverMonitoringMode="poll",
                heartbeatFrequencyMS=2000,
            )
            _clients[key] = client
        return client


def get_db(settings: Settings | None = None) -> Database[Doc]:
    """The application database, with majority writes whatever the URI says."""
    settings = settings or load_settings()
    return get_client(settings).get_database(settings.mongo_db, write_concern=MAJORITY)


def primary(db: Database[Doc]) -> Database[Doc]:
    """The same database, read from the primary: for reads that decide correctness."""
    return db.client.get_database(
        db.name, write_concern=MAJORITY, read_preference=ReadPreference.PRIMARY
    )


def close_clients() -> None:
    with _clients_lock:
        for client in _clients.values():
            client.close()
        _clients.clear()


def is_transient(exc: BaseException) -> bool:
    """Whether retrying the same operation may succeed."""
    if isinstance(exc, (AutoReconnect, ConnectionFailure, NotPrimaryError, WTimeoutError)):
        return True
    if isinstance(exc, PyMongoError) and (
        exc.has_error_label("TransientTransactionError")
        or exc.has_error_label("UnknownTransactionCommitResult")
        or exc.has_error_label("RetryableWriteError")
    ):
        return True
    if isinstance(exc, OperationFailure) and exc.code in (
        10107, 13435, 11600, 11602, 189, 91, 13436, 262, 7, 6, 89, 9001, 112,
    ):
        # NotWritablePrimary, NotPrimaryNoSecondaryOk, InterruptedAtShutdown,
        # InterruptedDueToReplStateChange, PrimarySteppedDown, ShutdownInProgress,
        # NotPrimaryOrSecondary, ExceededTimeLimit, HostNotFound, HostUnreachable,
        # NetworkTimeout, SocketException, WriteConflict.
        return True
    return False


def backoff_delay(attempt: int, base: float = 0.05, cap: float = 2.0) -> float:
    """Full-jitter exponential backoff for the given 0-based attempt."""
    return random.uniform(0, min(cap, base * (2**attempt)))


def retry(fn: Callable[[], T], *, attempts: int = 6, base: float = 0.05, cap: float = 2.0,
          what: str = "database operation") -> T:
    """Run ``fn``; retry transient MongoDB errors with bounded, jittered backoff.

    A server-selection timeout (database unreachable) or running out of attempts
    raises ``DatabaseUnavailable``; other errors propagate unchanged.
    """
    for attempt in range(attempts):
        try:
            return fn()
        except ServerSelectionTimeoutError as exc:
            raise DatabaseUnavailable(f"{what}: database unreachable ({exc.__class__.__name__})",
                                      retry_after=5) from exc
        except PyMongoError as exc:
            if not is_transient(exc):
                raise
            if attempt == attempts - 1:
                raise DatabaseUnavailable(f"{what}: gave up after {attempts} attempts: {exc}",
                                          retry_after=5) from exc
            delay = backoff_delay(attempt, base, cap)
            log.warning("transient database error, retrying", extra={
                "what": what, "attempt": attempt + 1, "error": str(exc)[:200],
                "delay_s": round(delay, 3)})
            time.sleep(delay)
    raise AssertionError("unreachable")


def transaction(db: Database[Doc], fn: Callable[[ClientSession], T], *,
                what: str = "transaction", attempts: int = 6) -> T:
    """Run ``fn(session)`` in a majority transaction on the primary; retry as a whole on
    transient errors (pymongo's ``with_transaction`` retries labelled errors; ``retry``
    covers the session start and connection errors around it)."""

    def run() -> T:
        with db.client.start_session() as session:
            return session.with_transaction(
                fn,
                read_concern=ReadConcern("majority"),
                write_concern=MAJORITY,
                read_preference=ReadPreference.PRIMARY,
                max_commit_time_ms=10_000,
            )

    return retry(run, what=what, attempts=attempts)


def server_now(db: Database[Doc]) -> datetime:
    """The database server's clock (``hello.localTime``), timezone-aware UTC.

    Leases compare against this instead of the process's clock. On the embedded server
    ``$$NOW`` cannot be compared with stored dates in expressions (DESIGN.md), so lease
    code reads this value and uses plain query operators.
    """
    reply = retry(lambda: db.client.admin.command("hello"), what="read server clock")
    now = reply["localTime"]
    assert isinstance(now, datetime)
    # command() decodes with default codec options (naive datetimes); the value is UTC.
    return now if now.tzinfo else now.replace(tzinfo=UTC)


def ping(db: Database[Doc]) -> None:
    retry(lambda: db.command("ping"), what="ping", attempts=2)
