"""The dashboard's fleet figures, kept up to date by one api process, read by every page.

Certificates by state and days left, failing renewals, queue depth by kind, the jobs
chart and the KEK progress are aggregates over whole collections: computed at a
request, each costs a read of every certificate or queued job (the embedded server
decodes every candidate document, ≈ 3 s at 10,000 certificates). Instead one api
process, the holder of the lease ``leases/dashboard_snapshot``, keeps them:

- it loads the live rows once per term (certificates' status, expiry and failure;
  queued and running jobs; the chart's six hours of finished jobs), then every
  ``REFRESH_SECONDS`` reads only what changed: documents whose ``updated_at`` is within
  ``CHANGE_SLACK`` of its last pass (indexes of m0015; every write that moves a figure
  sets ``updated_at``) and the jobs finished in the last two minutes;
- it writes the figures to ``dashboard_snapshots``: ``all`` (every project, the queue,
  the chart, per-host counts, KEK) and ``project:<id>`` (that project's certificates),
  a project's document only when its figures changed;
- it reloads everything every ``RESYNC_SECONDS`` (a restore, a write that did not set
  ``updated_at``) and stops, releasing the lease, once no page asked for
  ``IDLE_STOP_SECONDS``.

A page reads one or two of these small documents by ``_id``. Any api process starts the
keeper on its first dashboard request; the others wait on the lease (another replica
takes over within ``LEASE_SECONDS`` of the holder's death).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo.database import Database
from pymongo.errors import InvalidOperation

from app import db as dbm
from app.db import Doc
from app.db.lease import Lease
from app.domain import certificates as certs

log = logging.getLogger(__name__)

COLLECTION = "dashboard_snapshots"
LEASE_ID = "dashboard_snapshot"
ALL_ID = "all"
REFRESH_SECONDS = 5.0
# Renewed at every pass and between the phases of a (long) full load.
LEASE_SECONDS = 60.0
# Re-read changes this far behind the last pass: a transaction stamps ``updated_at``
# before it commits (transactions here are short; the server ends any after 60 s).
CHANGE_SLACK = timedelta(seconds=30)
RESYNC_SECONDS = 3600.0
# Keys per KEK version is a count over every key (one per certificate): every 30 min;
# a running rotation's progress comes from its own document every minute.
KEK_FULL_SECONDS = 1800.0
KEK_ROTATION_SECONDS = 60.0
IDLE_STOP_SECONDS = 300.0
CHART_MINUTES = 360
FAILING_SHOWN = 10
# Days-left buckets of the overview's histogram: (label, lower days, upper days).
DAYS_LEFT_BUCKETS: tuple[tuple[str, int | None, int | None], ...] = (
    ("0–7", None, 8), ("8–14", 8, 15), ("15–30", 15, 31), ("31–60", 31, 61), ("> 60", 61, None))

CERT_FIELDS = {"project_id": 1, "status": 1, "not_after": 1, "deleted_at": 1, "failure": 1,
               "name": 1, "next_renewal_at": 1}
JOB_FIELDS = {"kind": 1, "state": 1, "run_after": 1, "slot_expire_at": 1}
ACTIVE_JOB_STATES = ("queued", "running")


@dataclass
class _Cert:
    project_id: str
    status: str
    not_after: datetime | None
    failing: Doc | None  # the failing-renewals row, when the last attempt failed


@dataclass
class _Job:
    kind: str
    state: str
    run_after: datetime | None
    gone_at: datetime | None  # a slot job's TTL: removed then whatever its state


def _aware(value: Any) -> datetime | None:
    if not isinstance(value, datetime):
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _minute(value: datetime) -> datetime:
    return value.replace(second=0, microsecond=0)


class Deposed(Exception):  # noqa: N818 - reads as "this keeper was deposed"
    """Another process took the snapshot lease: this one stops writing figures."""


@dataclass
class Keeper:
    """The figures of one database, kept in memory by the lease holder."""

    db: Database[Doc]
    settings: Any = None
    certs: dict[str, _Cert] = field(default_factory=dict)
    jobs: dict[str, _Job] = field(default_factory=dict)
    minutes: dict[datetime, dict[tuple[str, str], int]] = field(default_factory=dict)
    loaded_at: float = 0.0  # monotonic time of the last full load; 0: not loaded
    certs_since: datetime | None = None
    jobs_since: datetime | None = None
    minutes_final_before: datetime | None = None
    kek: Doc | None = None
    kek_at: float = 0.0
    kek_rotation_at: float = 0.0
    written: dict[str, Doc] = field(default_factory=dict)
    lease: Lease | None = None  # when set, renewed between the phases of a pass

    def keep_lease(self) -> None:
        """Renew the lease mid-pass; Deposed when another process holds it now."""
        if self.lease is not None and self.lease.renew() is None:
            raise Deposed("the dashboard snapshot lease was lost mid-pass")

    # -- reading the database ------------------------------------------------------

    def _put_cert(self, doc: Doc) -> None:
        ident = str(doc["_id"])
        if doc.get("deleted_at") is not None or doc.get("status") == certs.STATUS_DELETED:
            self.certs.pop(ident, None)
            return
        failure = doc.get("failure") or None
        failing = None
        if isinstance(failure, dict) and isinstance(failure.get("last_failed_at"), datetime):
            failing = {"_id": ident, "name": doc.get("name"), "status": doc.get("status"),
                       "project_id": doc.get("project_id"),
                       "next_renewal_at": doc.get("next_renewal_at"),
                       "failure": {"count": failure.get("count"),
                                   "last_failed_at": failure["last_failed_at"],
                                   "last_error": failure.get("last_error")}}
        self.certs[ident] = _Cert(str(doc.get("project_id")), str(doc.get("status")),
                                  _aware(doc.get("not_after")), failing)

    def _put_job(self, doc: Doc) -> None:
        ident = str(doc["_id"])
        if doc.get("state") not in ACTIVE_JOB_STATES:
            self.jobs.pop(ident, None)
            return
        self.jobs[ident] = _Job(str(doc.get("kind")), str(doc["state"]),
                                _aware(doc.get("run_after")), _aware(doc.get("slot_expire_at")))

    def load(self, now: datetime) -> None:
        """Every live row, once per term (and every ``RESYNC_SECONDS``)."""
        since = now - CHANGE_SLACK
        rows = dbm.retry(lambda: list(self.db[dbm.CERTIFICATES].find(
            {"deleted_at": None}, CERT_FIELDS)), what="load certificates for the dashboard")
        self.certs = {}
        for doc in rows:
            self._put_cert(doc)
        self.keep_lease()
        jobs = dbm.retry(lambda: list(self.db[dbm.JOBS].find(
            {"state": {"$in": list(ACTIVE_JOB_STATES)}}, JOB_FIELDS)),
            what="load active jobs for the dashboard")
        self.jobs = {}
        for doc in jobs:
            self._put_job(doc)
        self.certs_since = self.jobs_since = since
        self.loaded_at = time.monotonic()

    def catch_up(self, now: datetime) -> None:
        """The documents changed since the last pass (``updated_at`` indexes)."""
        assert self.certs_since is not None and self.jobs_since is not None
        since_certs, since_jobs = self.certs_since, self.jobs_since
        for doc in dbm.retry(lambda: list(self.db[dbm.CERTIFICATES].find(
                {"updated_at": {"$gte": since_certs}}, {**CERT_FIELDS, "updated_at": 1})),
                what="read changed certificates"):
            self._put_cert(doc)
        for doc in dbm.retry(lambda: list(self.db[dbm.JOBS].find(
                {"updated_at": {"$gte": since_jobs}}, {**JOB_FIELDS, "updated_at": 1})),
                what="read changed jobs"):
            self._put_job(doc)
        self.certs_since = self.jobs_since = now - CHANGE_SLACK

    def drop_expired(self, now: datetime) -> None:
        """A slot job is removed by its TTL whatever its state, without a write we see."""
        for ident in [i for i, j in self.jobs.items() if j.gone_at and j.gone_at <= now]:
            del self.jobs[ident]

    def chart(self, now: datetime) -> None:
        """Finished jobs per minute and worker host; minutes before the last one are
        final, so a pass aggregates the last two minutes only."""
        from app.dashboard.queries import aggregate_minutes

        start = _minute(now) - timedelta(minutes=CHART_MINUTES - 1)
        final = self.minutes_final_before
        since = start if final is None else max(start, final)
        fresh = aggregate_minutes(self.db, since)
        for minute in [m for m in self.minutes if m >= since or m < start]:
            del self.minutes[minute]
        self.minutes.update(fresh)
        self.minutes_final_before = _minute(now) - timedelta(minutes=1)

    def kek_status(self) -> Doc | None:
        from app.dashboard.queries import kek

        if self.kek is None or time.monotonic() - self.kek_at > KEK_FULL_SECONDS:
            self.kek = kek(self.db, self.settings)
            self.kek_at = self.kek_rotation_at = time.monotonic()
        elif time.monotonic() - self.kek_rotation_at > KEK_ROTATION_SECONDS:
            from app.keys.rotation import latest_rotation

            latest = latest_rotation(self.db)
            rotation = self.kek.get("rotation")
            if latest is not None and (rotation is None or rotation.get("id") != latest["_id"]
                                       or latest.get("state") != rotation.get("state")
                                       or latest.get("rewrapped") != rotation.get("rewrapped")):
                self.kek = kek(self.db, self.settings)  # it moved: count again
                self.kek_at = time.monotonic()
            self.kek_rotation_at = time.monotonic()
        return self.kek

    # -- the figures ---------------------------------------------------------------

    @staticmethod
    def certificate_figures(rows: list[_Cert], now: datetime) -> Doc:
        by_state: dict[str, int] = {}
        counts = [0] * len(DAYS_LEFT_BUCKETS)
        expired = 0
        edges = [(now + timedelta(days=low) if low is not None else None,
                  now + timedelta(days=high) if high is not None else None)
                 for _, low, high in DAYS_LEFT_BUCKETS]
        for row in rows:
            by_state[row.status] = by_state.get(row.status, 0) + 1
            if row.status != certs.STATUS_ISSUED or row.not_after is None:
                continue
            if row.not_after < now:
                expired += 1
                continue
            for i, (low, high) in enumerate(edges):
                if (low is None or row.not_after >= low) and (high is None
                                                              or row.not_after < high):
                    counts[i] += 1
                    break
        peak = max(counts + [1])
        return {"by_state": by_state, "total": sum(by_state.values()), "expired": expired,
                "days_left": [{"label": label, "count": n, "percent": round(100 * n / peak)}
                              for (label, _, _), n in zip(DAYS_LEFT_BUCKETS, counts,
                                                          strict=True)]}

    @staticmethod
    def failing(rows: list[_Cert]) -> list[Doc]:
        found = [r.failing for r in rows if r.failing is not None]
        found.sort(key=lambda f: f["failure"]["last_failed_at"], reverse=True)
        return found[:FAILING_SHOWN]

    def queue(self, now: datetime) -> Doc:
        """Queued jobs by kind, how many are due, when the oldest due one became due
        (ages are computed when read), running jobs."""
        by_kind: dict[str, int] = {}
        due_by_kind: dict[str, int] = {}
        oldest: dict[str, datetime] = {}
        running = 0
        for job in self.jobs.values():
            if job.state != "queued":
                running += 1
                continue
            by_kind[job.kind] = by_kind.get(job.kind, 0) + 1
            if job.run_after is not None and job.run_after <= now:
                due_by_kind[job.kind] = due_by_kind.get(job.kind, 0) + 1
                if job.kind not in oldest or job.run_after < oldest[job.kind]:
                    oldest[job.kind] = job.run_after
        # Kinds are field values, never keys of a stored document (a '.' or '$' in one).
        return {"by_kind": [[k, n, due_by_kind.get(k, 0), oldest.get(k)]
                            for k, n in sorted(by_kind.items())], "running": running}

    def throughput(self, now: datetime) -> Doc:
        start = _minute(now) - timedelta(minutes=CHART_MINUTES - 1)
        ok: list[int] = []
        dead: list[int] = []
        hosts: dict[str, list[int]] = {}
        for i in range(CHART_MINUTES):
            cells = self.minutes.get(start + timedelta(minutes=i), {})
            ok.append(sum(n for (s, _), n in cells.items() if s == "succeeded"))
            dead.append(sum(n for (s, _), n in cells.items() if s == "dead"))
            for (state, host), n in cells.items():
                row = hosts.setdefault(host, [0, 0])
                row[0] += n
                if state == "dead":
                    row[1] += n
        return {"start": start, "succeeded": ok, "failed": dead,
                "hosts": [[h, p, f] for h, (p, f) in sorted(hosts.items())]}

    def figures(self, now: datetime) -> dict[str, Doc]:
        """The documents to write: ``all`` and one per project."""
        by_project: dict[str, list[_Cert]] = {}
        for row in self.certs.values():
            by_project.setdefault(row.project_id, []).append(row)
        every = list(self.certs.values())
        docs: dict[str, Doc] = {ALL_ID: {
            "certs": self.certificate_figures(every, now), "failing": self.failing(every),
            "queue": self.queue(now), "chart": self.throughput(now),
            "kek": self.kek_status()}}
        for project_id, rows in by_project.items():
            docs[f"project:{project_id}"] = {"project_id": project_id,
                                            "certs": self.certificate_figures(rows, now),
                                            "failing": self.failing(rows)}
        for ident in self.written:
            if ident not in docs and ident.startswith("project:"):
                docs[ident] = {"project_id": ident.split(":", 1)[1],
                               "certs": self.certificate_figures([], now), "failing": []}
        return docs

    def write(self, now: datetime, docs: dict[str, Doc]) -> int:
        """Write ``all`` at every pass (its ``at`` says the figures are current) and a
        project's document only when its figures changed."""
        collection = self.db[COLLECTION]
        writes = 0
        for ident, body in docs.items():
            if ident != ALL_ID and self.written.get(ident) == body:
                continue
            doc = {**body, "at": now}
            dbm.retry(lambda i=ident, d=doc: collection.replace_one(  # type: ignore[misc]
                {"_id": i}, d, upsert=True), what="write dashboard figures")
            self.written[ident] = body
            writes += 1
        return writes

    def refresh(self) -> int:
        """One pass: load (first pass or resync) or catch up, then write the figures.
        Returns the number of documents written."""
        now = dbm.server_now(self.db)
        if not self.loaded_at or time.monotonic() - self.loaded_at > RESYNC_SECONDS:
            self.load(now)
        else:
            self.catch_up(now)
        self.drop_expired(now)
        self.keep_lease()
        self.chart(now)
        docs = self.figures(now)
        self.keep_lease()
        return self.write(now, docs)


def refresh(db: Database[Doc], settings: Any = None) -> int:
    """Compute and write every figure now, from scratch (the CLI, tests)."""
    return Keeper(db, settings).refresh()


# -- the keeper thread of an api process ---------------------------------------------

@dataclass
class _Runner:
    keeper: Keeper
    thread: threading.Thread | None = None
    wanted_at: float = field(default_factory=time.monotonic)
    stop: threading.Event = field(default_factory=threading.Event)


_runners: dict[str, _Runner] = {}
_runners_lock = threading.Lock()


def ensure_running(db: Database[Doc], settings: Any = None) -> None:
    """Called by every dashboard request: starts this process's keeper thread for the
    database if it is not running (it then holds the lease or waits for it)."""
    with _runners_lock:
        runner = _runners.get(db.name)
        if runner is None or runner.thread is None or not runner.thread.is_alive():
            runner = _Runner(Keeper(db, settings))
            runner.thread = threading.Thread(target=_run, args=(runner,), daemon=True,
                                             name=f"dashboard-snapshot-{db.name}")
            _runners[db.name] = runner
            runner.thread.start()
        runner.wanted_at = time.monotonic()


def _run(runner: _Runner) -> None:
    keeper = runner.keeper
    holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    lease = Lease(keeper.db[dbm.LEASES], {"_id": LEASE_ID}, holder, LEASE_SECONDS,
                  upsert=True, what="dashboard snapshot lease")
    keeper.lease = lease
    failures = 0
    try:
        while not runner.stop.is_set():
            if time.monotonic() - runner.wanted_at > IDLE_STOP_SECONDS:
                break
            started = time.monotonic()
            try:
                held = lease.renew() if lease.token is not None else None
                if held is None:
                    keeper.loaded_at = 0.0  # a new term: whatever we had may be stale
                    held = lease.acquire()
                if held is not None:
                    keeper.refresh()
                failures = 0
            except InvalidOperation:
                break  # the client was closed: this app is being shut down
            except Deposed:
                keeper.loaded_at = 0.0
            except Exception:  # noqa: BLE001 - the next pass tries again; pages show age
                failures += 1
                keeper.loaded_at = 0.0
                log.warning("dashboard snapshot pass failed", exc_info=True)
                if failures >= 5:
                    break  # the next dashboard request starts a new keeper
            runner.stop.wait(max(0.5, REFRESH_SECONDS - (time.monotonic() - started)))
    finally:
        try:
            lease.release(attempts=1)
        except Exception:  # noqa: BLE001 - it expires by itself
            pass


def stop_all(timeout: float = 10.0) -> None:
    """Stop this process's keepers (tests; the lease is released)."""
    with _runners_lock:
        runners = list(_runners.values())
        _runners.clear()
    for runner in runners:
        runner.stop.set()
    for runner in runners:
        if runner.thread is not None:
            runner.thread.join(timeout)


# -- what pages read -------------------------------------------------------------------

def read(db: Database[Doc], project_id: str | None) -> tuple[Doc | None, Doc | None]:
    """The ``all`` document and, for a project token, its project's (one round trip);
    None where the keeper has not written one yet."""
    wanted = [ALL_ID] if project_id is None else [ALL_ID, f"project:{project_id}"]
    found = {d["_id"]: d for d in dbm.retry(lambda: list(db[COLLECTION].find(
        {"_id": {"$in": wanted}})), what="read dashboard figures")}
    every = found.get(ALL_ID)
    return every, (every if project_id is None else found.get(f"project:{project_id}"))


def queue_view(every: Doc | None, now: datetime) -> Doc:
    """The queue figures in the shape of ``app.jobs.stats.queue_depth``, ages as of
    ``now``."""
    rows = (every or {}).get("queue", {}).get("by_kind", [])
    by_kind = {str(r[0]): int(r[1]) for r in rows}
    due_by_kind = {str(r[0]): int(r[2]) for r in rows if r[2]}
    ages = {str(r[0]): max(0.0, (now - _aware(r[3])).total_seconds())  # type: ignore[operator]
            for r in rows if _aware(r[3]) is not None}
    return {"queued": sum(by_kind.values()), "due": sum(due_by_kind.values()),
            "by_kind": by_kind, "due_by_kind": due_by_kind,
            "oldest_queued_age_seconds": max(ages.values(), default=0.0),
            "oldest_queued_age_seconds_by_kind": ages,
            "running": int((every or {}).get("queue", {}).get("running", 0)),
            "ready": every is not None}


def certificate_view(every: Doc | None, scoped: Doc | None) -> Doc:
    """The certificate figures of the caller's scope; ``ready`` once the keeper wrote
    any (a project without certificates has no document of its own: zeros)."""
    if scoped is None:
        return Keeper.certificate_figures([], datetime.now(UTC)) | {"ready": every is not None}
    return {**scoped["certs"], "ready": True}


def chart_view(every: Doc | None) -> Doc:
    """Chart data: minute timestamps (epoch seconds), succeeded and dead counts."""
    chart = (every or {}).get("chart")
    if not chart:
        return {"t": [], "succeeded": [], "failed": [],
                "totals": {"succeeded": 0, "failed": 0}}
    start = _aware(chart["start"])
    assert start is not None
    xs = [int((start + timedelta(minutes=i)).timestamp())
          for i in range(len(chart["succeeded"]))]
    return {"t": xs, "succeeded": chart["succeeded"], "failed": chart["failed"],
            "totals": {"succeeded": sum(chart["succeeded"]), "failed": sum(chart["failed"])}}


def host_counts(every: Doc | None) -> dict[str, dict[str, int]]:
    """Jobs finished over the chart's window by each worker host."""
    rows = ((every or {}).get("chart") or {}).get("hosts", [])
    return {str(h): {"processed": int(p), "failed": int(f)} for h, p, f in rows}
