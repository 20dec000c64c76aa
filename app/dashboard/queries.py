"""What the dashboard's pages read: bounded, indexed queries.

Every list is one page of an index walk in the order of that index, read through windows
on its sort key (``windowed_page``, ``seq_page``) or one selective index range; a page
never issues a query per row (a page's related rows are fetched with one ``$in``). The
fleet figures (certificates by state and days left, the queue, the jobs chart, KEK) are
not computed here but read from the documents ``app.dashboard.snapshot`` keeps.
Indexes: m0001, m0002, m0007, m0010, m0012 and m0015.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo.collection import Collection
from pymongo.database import Database

from app import db as dbm
from app.db import Doc
from app.domain import certificates as certs
from app.domain.tokens import Principal

log = logging.getLogger(__name__)

# A worker whose last heartbeat is older than this is not online (as /status/workers).
WORKER_LIVENESS = timedelta(seconds=60)
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

@dataclass(frozen=True)
class Window:
    """How a list is read through ``windowed_page``: windows on ``key`` below ``start``
    (None: no upper bound), never below ``floor``, the first one ``first_span`` seconds."""

    key: str = "created_at"
    start: datetime | None = None
    floor: datetime | None = None
    first_span: float = 60.0


# The first window of each list: certificates are created over days and months, jobs
# every second; expiry dates are days apart.
CREATED_FIRST_SPAN = 86400.0
EXPIRY_FIRST_SPAN = 6 * 3600.0
# Below any stored expiry: keeps certificates without one (null sorts first in an
# index) out of the last window's index range.
EXPIRY_FLOOR = datetime(1970, 1, 1, tzinfo=UTC)


def certificate_query(caller: Principal, args: dict[str, str]) -> tuple[Doc, Window | None]:
    """The filter of the certificates list (search by name, project, state and expiring
    before a date), and how to read it: through windows (``windowed_page``: newest
    first, or by expiry, latest first, below an "expiring before" date), or, for a name,
    as one index range on ``names`` (exact, one of the certificate's names, as the API's
    ``?name=``; a trailing ``*`` makes it a prefix: the range [prefix, next prefix)).

    The clause to serve from an index comes first (the embedded server takes the first
    one it can)."""
    query: Doc = {}
    window: Window | None = Window(first_span=CREATED_FIRST_SPAN)
    name = (args.get("name") or "").strip().lower().rstrip(".")
    if name.endswith("*"):
        prefix = name.rstrip("*")
        if prefix:
            query["names"] = {"$gte": prefix,
                              "$lt": prefix[:-1] + chr(ord(prefix[-1]) + 1)}
            window = None
    elif name:
        query["names"] = name
        window = None
    before = parse_date(args.get("expiring_before"))
    if before is not None:
        if window is None:
            query["not_after"] = {"$lt": before}
        else:
            window = Window("not_after", before, EXPIRY_FLOOR, EXPIRY_FIRST_SPAN)
    query.update(project_filter(caller, args.get("project") or None))
    if args.get("state") in CERT_STATES:
        query["status"] = args["state"]  # a deleted certificate's status is "deleted"
    else:
        query["deleted_at"] = None
    return query, window


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


def aggregate_minutes(db: Database[Doc], since: datetime) -> dict[datetime,
                                                                   dict[tuple[str, str], int]]:
    """Finished jobs per minute since ``since``: {minute: {(state, worker host): n}}
    (``finished_at`` index)."""
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


def workers(db: Database[Doc], now: datetime, counts: dict[str, dict[str, int]]
            ) -> dict[str, list[Doc]]:
    """Workers online (heartbeat within WORKER_LIVENESS and not stopped) and the others
    seen in the last day, with ``counts`` (processed/failed over the chart's window by
    host, from the snapshot)."""
    from app.jobs.workers import list_workers

    rows = dbm.retry(lambda: list_workers(db)[:500], what="read workers")
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


# -- scheduler, keys, audit --------------------------------------------------------------

def scheduler(db: Database[Doc], fires: int = 0) -> Doc:
    """The lease and entries (``app.db.schedule``), the standbys, and the last ``fires``
    fired slots, newest first, read through windows on ``fired_at`` (a day of slots is
    ~26,000 documents: a sort of all of them is what the embedded server would do)."""
    from app.db.names import FIRES
    from app.db.schedule import standbys, status

    result = status(db)
    lease = result["lease"]
    result["standbys"] = standbys(db, lease["server_time"], lease.get("holder"))
    if fires:
        result["recent_fires"] = windowed_page(db[FIRES], {}, limit=fires, cursor=None,
                                               projection={"_id": 0}, key="fired_at",
                                               first_span=60.0)["items"]
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

_spans: dict[tuple[str, str, tuple[str, ...]], float] = {}
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
                  start: datetime | None = None, floor: datetime | None = None,
                  growth: float = 4.0, max_windows: int = 14) -> Doc:
    """One page, newest first, in ``(key, _id)`` order (for ``created_at`` the API's
    cursor order), read through time windows below ``start`` (default: no upper bound)
    that grow ×``growth`` until the page is full; the last one reaches down to
    ``floor`` (default: no lower bound).

    The range on ``key`` leads the filter, so each window is one index range (on a real
    mongod the planner would also stop a sorted index walk early; the embedded server
    materialises a sorted walk whole, so the window is what bounds the work there). A
    page costs about the documents of its last window, not of the collection."""
    from app.api.common import encode_cursor

    items: list[Doc] = []
    upper: datetime | None = start  # None: no upper bound (the newest page)
    if cursor:
        upper, last_id = _position(cursor, datetime, object)
        # The sort key first: the clause the embedded server serves from an index.
        ties = {key: upper, **query, "_id": {"$lt": last_id}}
        items = dbm.retry(lambda: list(collection.find(ties, projection)
                                       .sort("_id", -1).limit(limit + 1)),
                          what=f"list {collection.name}")
    anchor = upper or datetime.now(UTC)
    # Start from the span that filled the last page of this list (per process): most
    # pages then cost one or two windows instead of climbing from a minute each time.
    shape = (collection.name, key, tuple(sorted(query)))
    span = max(first_span, _spans.get(shape, first_span) / growth)
    for window in range(max_windows):
        if len(items) > limit:
            break
        last = window == max_windows - 1 or span > _LONGEST_SPAN
        lower = floor if last else anchor - timedelta(seconds=span)
        if floor is not None and lower is not None and lower <= floor:
            lower, last = floor, True
        bound: Doc = {}
        if upper is not None:
            bound["$lt"] = upper
        if lower is not None:
            bound["$gte"] = lower
        wanted = limit + 1 - len(items)

        def fetch(b: Doc = bound, n: int = wanted) -> list[Doc]:
            return list(collection.find({key: b, **query} if b else dict(query), projection)
                        .sort([(key, -1), ("_id", -1)]).limit(n))

        found = dbm.retry(fetch, what=f"list {collection.name}")
        items.extend(found)
        if len(items) > limit:
            _spans[shape] = span
        if last:
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
