"""MongoDB primitives: the client, collection names, the server clock, the transaction
runner and the lease. Everything else reaches the database through these.

- ``app.db.names``: every collection name, and ``Doc``.
- ``app.db.client``: the one client per process (majority writes), ``primary()``,
  ``retry()`` of transient errors with jittered backoff, ``ping()``.
- ``app.db.clock``: the server's clock (``server_now``), which every lease and schedule
  decision uses instead of the process's.
- ``app.db.txn``: the one transaction runner (``run``; ``transaction`` for API and domain
  writes), retried as a whole, optionally fenced by a lease.
- ``app.db.lease``: the one lease primitive (acquire, renew, release, fencing token).
- ``app.db.schedule``: the scheduler's storage contract (its lease, ``schedule``,
  ``schedule_fires``) read back for operators; ``scheduler/`` writes it.

``from app import db as dbm`` and ``dbm.<name>`` reach all of the common names.
"""

from app.db.client import (
    MAJORITY,
    backoff_delay,
    close_clients,
    get_client,
    get_db,
    is_transient,
    ping,
    primary,
    retry,
)
from app.db.clock import EARLIEST, server_now
from app.db.names import (
    ACME_ACCOUNTS,
    ALERT_CHANNELS,
    ALERT_DELIVERIES,
    ALERTS,
    API_TOKENS,
    AUDIT,
    AUDIT_PENDING,
    CA_BUDGETS,
    CERTIFICATES,
    CHALLENGES,
    COUNTERS,
    DASHBOARD_SESSIONS,
    ENDPOINT_SCANS,
    FIRES,
    IDEMPOTENCY,
    JOBS,
    KEK_ROTATIONS,
    KEK_VERSIONS,
    KEYS,
    LEASES,
    MESSAGES_COLLECTION,
    METRICS_SNAPSHOTS,
    MIGRATIONS,
    MIGRATIONS_LOCK_ID,
    ORDERS,
    PROJECTS,
    RATE_LIMITS,
    RENEWAL_BATCHES,
    RESTORES,
    SCHEDULE,
    SCHEDULER_LEASE_ID,
    SCHEDULER_STANDBYS,
    SINKS,
    WORKERS,
    Doc,
)
from app.db.txn import after_commit, transaction

__all__ = [
    "ACME_ACCOUNTS", "ALERTS", "ALERT_CHANNELS", "ALERT_DELIVERIES", "API_TOKENS", "AUDIT",
    "AUDIT_PENDING", "CA_BUDGETS", "CERTIFICATES", "CHALLENGES", "COUNTERS",
    "DASHBOARD_SESSIONS", "EARLIEST", "ENDPOINT_SCANS", "FIRES", "IDEMPOTENCY", "JOBS",
    "KEK_ROTATIONS",
    "KEK_VERSIONS", "KEYS", "LEASES", "MAJORITY", "MESSAGES_COLLECTION", "METRICS_SNAPSHOTS",
    "MIGRATIONS", "MIGRATIONS_LOCK_ID", "ORDERS", "PROJECTS", "RATE_LIMITS",
    "RENEWAL_BATCHES", "RESTORES", "SCHEDULE", "SCHEDULER_LEASE_ID", "SCHEDULER_STANDBYS",
    "SINKS", "WORKERS", "Doc", "after_commit", "backoff_delay", "close_clients",
    "get_client", "get_db", "is_transient", "ping", "primary", "retry", "server_now",
    "transaction",
]
