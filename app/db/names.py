"""Every collection name, in one place (DESIGN.md, "Collections"), and ``Doc``.

A module that reads or writes a collection names it from here, so a newcomer finds
every collection the service owns, and who uses it, with one search.
"""

from __future__ import annotations

from typing import Any

# A MongoDB document as the driver hands it over.
Doc = dict[str, Any]

# Core documents.
PROJECTS = "projects"
API_TOKENS = "api_tokens"
ACME_ACCOUNTS = "acme_accounts"
CERTIFICATES = "certificates"
ORDERS = "orders"
KEYS = "keys"
CHALLENGES = "challenges"
COUNTERS = "counters"
# The fleet-metrics snapshot (app/metrics_snapshot.py): a head document and its chunks.
METRICS_SNAPSHOTS = "metrics_snapshots"

# Background work: durable jobs, worker heartbeats, leader leases, the beat schedule and
# its per-slot fire log (unique per entry and slot: the proof that a slot ran once).
JOBS = "jobs"
WORKERS = "workers"
LEASES = "leases"
SCHEDULE = "schedule"
FIRES = "schedule_fires"
# Schedulers running as standby (who would take over the lease); TTL on expiry.
SCHEDULER_STANDBYS = "scheduler_standbys"

# Audit log, the entries written by committed mutations and not yet chained into it
# (app.audit.seal), and the forwarding state of each SIEM sink.
AUDIT = "audit"
AUDIT_PENDING = "audit_pending"
SINKS = "audit_sinks"

# KEK bookkeeping: the canary of each version, and the rotations.
KEK_VERSIONS = "kek_versions"
KEK_ROTATIONS = "kek_rotations"

# The API's own: idempotency keys and rate-limit windows (both expire by TTL index).
IDEMPOTENCY = "api_idempotency"
RATE_LIMITS = "api_rate_limits"

# The ACME rate-limit budget shared by every worker: one token bucket per document
# (per CA and bucket kind and subject: an account, a registered domain, an identifier).
CA_BUDGETS = "ca_budgets"

# Emergency and bulk renewals: one document per tracked batch.
RENEWAL_BATCHES = "renewal_batches"

# Drift scans (app/domain/drift.py: what each endpoint of a certificate serves) and alerts
# (app/ops/alerts/: channels, open and resolved alerts, messages waiting per channel).
ENDPOINT_SCANS = "endpoint_scans"
ALERT_CHANNELS = "alert_channels"
ALERTS = "alerts"
ALERT_DELIVERIES = "alert_deliveries"

# The ops dashboard's sign-in sessions (only a hash of each session id; TTL on expiry).
DASHBOARD_SESSIONS = "dashboard_sessions"

# Applied schema migrations.
MIGRATIONS = "migrations"

# One document per `certautopilot restore` into this database (app/ops/restore.py).
RESTORES = "restores"

# kombu's collection of queued Celery messages, in the broker database (CAP_BROKER_DB).
MESSAGES_COLLECTION = "messages"

# Documents in ``leases``: the scheduler's leader lease and the migrations lock.
SCHEDULER_LEASE_ID = "scheduler"
MIGRATIONS_LOCK_ID = "migrations"
