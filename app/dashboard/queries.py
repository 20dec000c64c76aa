"""What the dashboard's pages read: bounded, indexed queries and aggregates.

Every list is one page of an index walk (``app.api.common.paginate``, the API's cursor
order); every figure is a count or a ``$group`` over an indexed range; a page never
issues a query per row (a page's related rows are fetched with one ``$in``). The jobs
chart is kept per process, minute by minute: finished minutes do not change, so each
refresh aggregates only the last two minutes (the first one reads the 6 hours once).
Indexes: m0001, m0002, m0007 and m0012.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from pymongo.collection import Collection
from pymongo.database import Database

from app import db as dbm
from app.db import Doc
from app.domain import certificates as certs
from app.domain.tokens import Principal

log = logging.getLogger(__name__)
T = TypeVar("T")

# A worker whose last heartbeat is older than this is not online (as /status/workers).
WORKER_LIVENESS = timedelta(seconds=60)
# Days-left buckets of the overview's histogram: (label, lower days, upper days).
DAYS_LEFT_BUCKETS: tuple[tuple[str, int | None, int | None], ...] = (
    ("0–7", None, 8), ("8–14", 8, 15), ("15–30", 15, 31), ("31–60", 31, 61), ("> 60", 61, None))
CHART_MINUTES = 360
FAILING_SHOWN = 10
CERT_STATES = (certs.STATUS_PENDING, certs.STATUS_ISSUED, certs.STATUS_FAILED,
               certs.STATUS_REVOKED)
RENEWAL_REASONS = {
    "initial": "first issuance: due as soon as a worker picks it up",
    "lifetime": "at 2/3 of the certificate's lifetime (1/2 under 10 days), with jitter",
    "ari": "inside the CA's ARI suggested window (RFC 9773)",
    "override": "renew_before_days of the certificate's renewal policy",
    "backoff": "the last attempt failed: retried after an exponential backoff",
    "spec_changed": "the spec changed (names, key, challenge, account or profile)",
}


def project_filter(caller: Principal, requested: str | None = None) -> Doc:
    """The project scope of a read: a project token's own project, whatever it asks for
    (the API answers 404 for another project; a filter that matches nothing is the same
    here); an admin's requested project or all of them."""
    if caller.is_admin:
        return {"project_id": requested} if requested else {}
    return {"project_id": caller.project_id}


# -- certificates --------------------------------------------------------------------

def certificate_figures(db: Database[Doc], caller: Principal, now: datetime) -> Doc:
    """Certificates by state, and issued ones by days left (one count per bucket on the
    ``not_after`` index, so 10,000 certificates cost five index counts)."""
    scope = project_filter(caller)
    by_state = {str(row["_id"]): int(row["n"]) for row in dbm.retry(
        lambda: list(db[dbm.CERTIFICATES].aggregate([
            {"$match": {**scope, "deleted_at": None}},
            {"$group": {"_id": "$status", "n": {"$sum": 1}}}])),
        what="count certificates by state")}
    buckets: list[Doc] = []
    for label, low, high in DAYS_LEFT_BUCKETS:
        window: Doc = {}
        if low is not None:
            window["$gte"] = now + timedelta(days=low)
        if high is not None:
            window["$lt"] = now + timedelta(days=high)
        query = {**scope, "not_after": window, "status": certs.STATUS_ISSUED}
        n = dbm.retry(lambda q=query: db[dbm.CERTIFICATES].count_documents(q),  # type: ignore[misc]
                      what="count certificates by days left")
        buckets.append({"label": label, "count": int(n)})
    expired = dbm.retry(lambda: db[dbm.CERTIFICATES].count_documents(
        {**scope, "not_after": {"$lt": now}, "status": certs.STATUS_ISSUED}),
        what="count expired certificates")
    buckets[0]["count"] -= int(expired)  # the first bucket starts at 0 days, not before
    peak = max([b["count"] for b in buckets] + [1])
    for bucket in buckets:
        bucket["percent"] = round(100 * bucket["count"] / peak)
    return {"by_state": by_state, "total": sum(by_state.values()), "days_left": buckets,
            "expired": int(expired)}


def failing_renewals(db: Database[Doc], caller: Principal, limit: int = FAILING_SHOWN
                     ) -> list[Doc]:
    """Certificates whose last attempt failed, newest failure first, with the CA's
    problem document (sparse index on ``failure.last_failed_at``)."""
    query = {**project_filter(caller), "failure.last_failed_at": {"$exists": True},
             "deleted_at": None}
    return dbm.retry(lambda: list(db[dbm.CERTIFICATES].find(
        query, {"name": 1, "names": 1, "project_id": 1, "status": 1, "failure": 1,
                "next_renewal_at": 1}).sort("failure.last_failed_at", -1).limit(limit)),
        what="read failing renewals")


def certificate_query(caller: Principal, args: dict[str, str]) -> tuple[Doc, bool]:
    """The filter of the certificates list (search by name, project, state and expiring
    before a date), and whether to read it through time windows (``windowed_page``).

    The most selective indexed clause comes first (a planner that serves one clause
    from an index takes the first one it can): a name (exact, one of the certificate's
    names, as the API's ``?name=``; a trailing ``*`` makes it a prefix), then expiry."""
    query: Doc = {}
    windowed = True
    name = (args.get("name") or "").strip().lower().rstrip(".")
    if name.endswith("*"):
        query["names"] = {"$regex": "^" + re.escape(name.rstrip("*"))}
        windowed = False
    elif name:
        query["names"] = name
        windowed = False
    before = parse_date(args.get("expiring_before"))
    if before is not None:
        query["not_after"] = {"$lt": before}
        windowed = False
    query.update(project_filter(caller, args.get("project") or None))
    if args.get("state") in CERT_STATES:
        query["status"] = args["state"]  # a deleted certificate's status is "deleted"
    else:
        query["deleted_at"] = None
    return query, windowed


def parse_date(value: str | None) -> datetime | None:
    """A YYYY-MM-DD (or ISO 8601) date from a search form; None when empty or invalid."""
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def certificate_related(db: Database[Doc], cert: Doc) -> Doc:
    """A certificate page's orders (with their steps), jobs and audit entries."""
    from app.domain import orders

    cert_id = cert["_id"]
    order_rows = orders.list_for_certificate(db, cert_id, limit=10,
                                             project_id=cert["project_id"])
    jobs = dbm.retry(lambda: list(db[dbm.JOBS].find(
        {"payload.certificate_id": cert_id}, {"lease.token": 0, "payload": 0})
        .sort("created_at", -1).limit(10)), what="read certificate jobs")
    audit = dbm.retry(lambda: list(db[dbm.AUDIT].find(
        {"target": f"certificate:{cert_id}"}, {"_id": 0}).sort("time", -1).limit(20)),
        what="read certificate audit")
    return {"orders": order_rows, "jobs": jobs, "audit": audit,
            "renewal_reason": RENEWAL_REASONS.get(str(cert.get("renewal_source")),
                                                  str(cert.get("renewal_source") or "—"))}


# -- jobs, workers, the chart ----------------------------------------------------------

def job_query(caller: Principal, args: dict[str, str]) -> Doc:
    from app.jobs import STATES

    query: Doc = project_filter(caller, args.get("project") or None)
    if args.get("state") in STATES:
        query["state"] = args["state"]
    kind = (args.get("kind") or "").strip()
    if kind:
        query["kind"] = kind[:100]
    return query


@dataclass
class _Series:
    """Finished jobs per minute: {minute start: {(state, worker): n}}; minutes before
    ``final_before`` are final."""

    minutes: dict[datetime, dict[tuple[str, str], int]] = field(default_factory=dict)
    final_before: datetime | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


_series: dict[str, _Series] = {}
_series_lock = threading.Lock()


def _minute(value: datetime) -> datetime:
    return value.replace(second=0, microsecond=0)


def _aggregate_minutes(db: Database[Doc], since: datetime) -> dict[datetime,
                                                                   dict[tuple[str, str], int]]:
    pipeline: list[Doc] = [
        {"$match": {"finished_at": {"$gte": since}, "state": {"$in": ["succeeded", "dead"]}}},
        # Epoch milliseconds rounded down to the minute ($toLong: the embedded server
        # cannot subtract dates in expressions; see DESIGN.md).
        {"$project": {"state": 1, "owner": "$lease.owner",
                      "ms": {"$toLong": "$finished_at"}}},
        {"$group": {"_id": {"m": {"$subtract": ["$ms", {"$mod": ["$ms", 60000]}]},
                            "s": "$state", "w": "$owner"}, "n": {"$sum": 1}}},
    ]
    out: dict[datetime, dict[tuple[str, str], int]] = {}
    for row in dbm.retry(lambda: list(db[dbm.JOBS].aggregate(pipeline)),
                         what="aggregate finished jobs"):
        key = row["_id"]
        minute = datetime.fromtimestamp(int(key["m"]) / 1000, UTC)
        cell = out.setdefault(minute, {})
        # A lease's owner is the pool process ("host:pid"); workers are counted by host
        # (one worker per pod in production).
        ident = (str(key.get("s")), str(key.get("w") or "—").rsplit(":", 1)[0])
        cell[ident] = cell.get(ident, 0) + int(row["n"])
    return out


def finished_per_minute(db: Database[Doc], now: datetime) -> dict[datetime,
                                                                   dict[tuple[str, str], int]]:
    """The last ``CHART_MINUTES`` minutes of finished jobs by state and worker."""
    with _series_lock:
        series = _series.setdefault(db.name, _Series())
    start = _minute(now) - timedelta(minutes=CHART_MINUTES - 1)
    with series.lock:
        since = start if series.final_before is None else max(start, series.final_before)
        fresh = _aggregate_minutes(db, since)
        for minute in [m for m in series.minutes if m >= since or m < start]:
            del series.minutes[minute]
        series.minutes.update(fresh)
        # A job finished in the last minute may commit a little later: keep it open.
        series.final_before = _minute(now) - timedelta(minutes=1)
        return {m: dict(cells) for m, cells in series.minutes.items()}


def throughput(db: Database[Doc], now: datetime) -> Doc:
    """Chart data: minute timestamps (epoch seconds), succeeded and dead counts."""
    minutes = finished_per_minute(db, now)
    start = _minute(now) - timedelta(minutes=CHART_MINUTES - 1)
    xs, ok, dead = [], [], []
    for i in range(CHART_MINUTES):
        minute = start + timedelta(minutes=i)
        cells = minutes.get(minute, {})
        xs.append(int(minute.timestamp()))
        ok.append(sum(n for (s, _), n in cells.items() if s == "succeeded"))
        dead.append(sum(n for (s, _), n in cells.items() if s == "dead"))
    return {"t": xs, "succeeded": ok, "failed": dead,
            "totals": {"succeeded": sum(ok), "failed": sum(dead)}}


def per_worker_counts(db: Database[Doc], now: datetime) -> dict[str, dict[str, int]]:
    """Jobs finished in the chart's window by the workers of each host:
    {host: {processed, failed}}."""
    counts: dict[str, dict[str, int]] = {}
    for cells in finished_per_minute(db, now).values():
        for (state, worker), n in cells.items():
            row = counts.setdefault(worker, {"processed": 0, "failed": 0})
            row["processed"] += n
            if state == "dead":
                row["failed"] += n
    return counts


def workers(db: Database[Doc], now: datetime) -> dict[str, list[Doc]]:
    """Workers online (heartbeat within WORKER_LIVENESS and not stopped) and the others
    seen in the last day, with processed/failed over the chart's window."""
    from app.jobs.workers import list_workers

    rows = dbm.retry(lambda: list_workers(db)[:500], what="read workers")
    counts = per_worker_counts(db, now)
    online: list[Doc] = []
    gone: list[Doc] = []
    for row in rows:
        running = row.get("running_jobs") or []
        seen = row.get("last_seen")
        row["running"] = len(running) if isinstance(running, list) else 0
        row["counts"] = counts.get(str(row.get("host")), {"processed": 0, "failed": 0})
        alive = isinstance(seen, datetime) and seen > now - WORKER_LIVENESS
        (online if alive and row.get("state") != "stopped" else gone).append(row)
    return {"online": online, "gone": gone}


def queue(db: Database[Doc]) -> Doc:
    """Queue depth by kind and the oldest due job's age (``app.jobs.stats``)."""
    from app.jobs.stats import queue_depth

    return dbm.retry(lambda: queue_depth(db), what="read queue depth")


# -- scheduler, keys, audit --------------------------------------------------------------

def scheduler(db: Database[Doc], fires: int = 0) -> Doc:
    """The lease, entries and recent fires (``app.db.schedule``) and the
    standbys."""
    from app.db.schedule import standbys, status

    result = status(db, fires=fires)
    lease = result["lease"]
    result["standbys"] = standbys(db, lease["server_time"], lease.get("holder"))
    return result


def kek(db: Database[Doc], settings: Any = None) -> Doc:
    """Keys per KEK version and the latest rotation's progress
    (``app.keys.rotation.status``, with this process's keyring when it has one)."""
    from app.keys.keyring import get_keyring
    from app.keys.rotation import status

    try:
        keyring = get_keyring(settings)
    except Exception:  # noqa: BLE001 - the figures stand without it (readiness reports it)
        keyring = None
    return status(db, keyring)


def audit_head(db: Database[Doc], *, sinks: bool = True) -> Doc:
    """The audit chain head (last seq and hash) and each sink's delivery status."""
    from app.audit.log import CHAIN_ID
    from app.audit.status import sink_status

    head = dbm.retry(lambda: db[dbm.COUNTERS].find_one({"_id": CHAIN_ID}),
                     what="read audit head") or {}
    return {"seq": int(head.get("seq", 0)), "hash": str(head.get("hash", "")),
            "sinks": dbm.retry(lambda: sink_status(db), what="read audit sinks")
            if sinks else []}


def audit_query(caller: Principal, args: dict[str, str]) -> tuple[Doc, bool]:
    """The audit viewer's filter (as the API's: actor id, action or action prefix
    ending in '.', target, since/until dates), and whether to read it through ``seq``
    windows (no selective clause) rather than one indexed lookup."""
    query: Doc = {}
    if args.get("actor"):
        query["actor.id"] = args["actor"].strip()[:200]
    action = (args.get("action") or "").strip()[:200]
    if action:
        query["action"] = ({"$regex": "^" + re.escape(action)} if action.endswith(".")
                           else action)
    if args.get("target"):
        query["target"] = args["target"].strip()[:300]
    window: Doc = {}
    since, until = parse_date(args.get("since")), parse_date(args.get("until"))
    if since is not None:
        window["$gte"] = since
    if until is not None:
        window["$lt"] = until
    if window:
        query["time"] = window
    selective = any(k in query for k in ("target", "actor.id", "time")) or (
        "action" in query and isinstance(query["action"], str))
    query.update(project_filter(caller, args.get("project") or None))
    return query, not selective


# -- bounded work on any server --------------------------------------------------------

_spans: dict[tuple[str, tuple[str, ...]], float] = {}
_LONGEST_SPAN = 50 * 365 * 86400.0  # beyond it, the last window: the rest


def _position(cursor: str, *types: type) -> list[Any]:
    """The values of a cursor of this list's shape (a plain position since the API's
    cursors are; ``app.api.common.decode_cursor``); any other shape is a 400, not a
    query on values of the wrong type."""
    from app.api.common import BadRequest, decode_cursor

    values = decode_cursor(cursor)
    if len(values) != len(types) or not all(
            isinstance(v, t) and not isinstance(v, bool) for v, t in zip(values, types,
                                                                         strict=True)):
        raise BadRequest("invalid cursor: pass the next page's link unchanged",
                         errors={"query": {"cursor": ["invalid"]}})
    return values


def windowed_page(collection: Collection[Doc], query: Doc, *, limit: int,
                  cursor: str | None, projection: Doc | None = None,
                  key: str = "created_at", first_span: float = 60.0,
                  growth: float = 4.0, max_windows: int = 14) -> Doc:
    """One page, newest first, in the API's ``(created_at, _id)`` cursor order, read
    through time windows that grow ×``growth`` until the page is full.

    The range on ``key`` leads the filter, so each window is one index range (on a real
    mongod the planner would also stop a sorted index walk early; the embedded server
    materialises a sorted walk whole, so the window is what bounds the work there). A
    page costs about the documents of its last window, not of the collection."""
    from app.api.common import encode_cursor

    items: list[Doc] = []
    upper: datetime | None = None  # None: no upper bound (the newest page)
    if cursor:
        upper, last_id = _position(cursor, datetime, object)
        ties = {**query, key: upper, "_id": {"$lt": last_id}}
        items = dbm.retry(lambda: list(collection.find(ties, projection)
                                       .sort("_id", -1).limit(limit + 1)),
                          what=f"list {collection.name}")
    anchor = upper or datetime.now(UTC)
    # Start from the span that filled the last page of this list (per process): most
    # pages then cost one or two windows instead of climbing from a minute each time.
    shape = (collection.name, tuple(sorted(query)))
    span = max(first_span, _spans.get(shape, first_span) / growth)
    for window in range(max_windows):
        if len(items) > limit:
            break
        last = window == max_windows - 1 or span > _LONGEST_SPAN
        lower = None if last else anchor - timedelta(seconds=span)
        bound: Doc = {}
        if upper is not None:
            bound["$lt"] = upper
        if lower is not None:
            bound["$gte"] = lower
        wanted = limit + 1 - len(items)

        def fetch(b: Doc = bound, n: int = wanted) -> list[Doc]:
            return list(collection.find({key: b, **query} if b else dict(query), projection)
                        .sort([(key, -1), ("_id", -1)]).limit(n))

        items.extend(dbm.retry(fetch, what=f"list {collection.name}"))
        if len(items) > limit:
            _spans[shape] = span
        if lower is None:
            break
        upper = lower
        span *= growth
    next_cursor = None
    if len(items) > limit:
        items = items[:limit]
        next_cursor = encode_cursor([items[-1].get(key), items[-1].get("_id")])
    return {"items": items, "next_cursor": next_cursor}


def seq_page(collection: Collection[Doc], query: Doc, *, head: int, limit: int,
             cursor: str | None, projection: Doc | None = None, first_span: int = 200,
             growth: int = 4, max_windows: int = 12) -> Doc:
    """The audit log newest first (cursor: the API's ``seq`` cursor), read through
    ``seq`` windows below the chain head that grow until the page is full."""
    from app.api.common import encode_cursor

    upper = head + 1
    if cursor:
        (upper,) = _position(cursor, int)
    items: list[Doc] = []
    span = first_span
    for window in range(max_windows):
        lower = 0 if window == max_windows - 1 else max(0, upper - span)
        bound = {"$lt": upper, "$gte": lower}
        wanted = limit + 1 - len(items)

        def fetch(b: Doc = bound, n: int = wanted) -> list[Doc]:
            return list(collection.find({"seq": b, **query}, projection)
                        .sort("seq", -1).limit(n))

        found = dbm.retry(fetch, what="list audit")
        items.extend(found)
        if len(items) > limit or lower == 0:
            break
        upper, span = lower, span * growth
    next_cursor = None
    if len(items) > limit:
        items = items[:limit]
        next_cursor = encode_cursor([items[-1]["seq"]])
    return {"items": items, "next_cursor": next_cursor}


@dataclass
class _Cached:
    value: Any = None
    at: float = 0.0
    refreshing: bool = False


_cache: dict[tuple[Any, ...], _Cached] = {}
_cache_lock = threading.Lock()
FIGURES_MAX_AGE = 5.0
# Certificates by state and days left, and KEK progress, move slowly; a whole-collection
# aggregate every 5 s would keep a small database busy for nothing.
SLOW_FIGURES_MAX_AGE = 30.0
# Older than this (nobody looked for a while), a value is recomputed before answering.
FIGURES_STALE_LIMIT = 60.0


def cached(key: tuple[Any, ...], compute: Callable[[], T],
           max_age: float = FIGURES_MAX_AGE) -> T:
    """``compute()``'s value, at most ``max_age`` seconds old when fresh; a staler one
    is answered at once while one background thread recomputes it (stale while
    revalidate), so a page waits on an aggregate over a whole collection only the first
    time in a process, or after nobody asked for ``FIGURES_STALE_LIMIT`` seconds."""
    now = time.monotonic()
    with _cache_lock:
        entry = _cache.setdefault(key, _Cached())
        if entry.at and now - entry.at > FIGURES_STALE_LIMIT and not entry.refreshing:
            entry.at = 0.0
        fresh = entry.at and now - entry.at <= max_age
        start_refresh = bool(entry.at) and not fresh and not entry.refreshing
        if start_refresh:
            entry.refreshing = True
    if fresh:
        return entry.value
    if not entry.at:
        value = compute()
        with _cache_lock:
            entry.value, entry.at = value, time.monotonic()
        return value
    if start_refresh:
        def refresh() -> None:
            try:
                value = compute()
                with _cache_lock:
                    entry.value, entry.at = value, time.monotonic()
            except Exception:  # noqa: BLE001 - the next request tries again
                log.warning("dashboard figures refresh failed", exc_info=True)
            finally:
                with _cache_lock:
                    entry.refreshing = False

        threading.Thread(target=refresh, name="dashboard-figures", daemon=True).start()
    return entry.value
