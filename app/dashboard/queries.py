"""What the dashboard's pages read: bounded, indexed queries.

Every list is one page of an index walk in the order of that index, read through windows
on its sort key (``windowed_page``; the audit log through ``app.api.windows.seq_page``)
or one selective index range; a page never issues a query per row (a page's related
rows are fetched with one ``$in``). The fleet figures (certificates by state and days
left, the queue, the jobs chart, KEK) are not computed here but read from the documents
``app.dashboard.snapshot`` keeps.
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
    (None: no upper bound), never below ``floor``, the first one ``first_span`` seconds;
    the window's clause first (``key_first``) or the filter's equalities."""

    key: str = "created_at"
    start: datetime | None = None
    floor: datetime | None = None
    first_span: float = 60.0
    key_first: bool = True


# The jobs' filters lead: their (state|kind|project_id, created_at, _id) indexes, as the
# API's jobs list.
JOBS_WINDOW = Window(key_first=False)


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
    fired slots, newest first (as ``/status/scheduler``)."""
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


def audit_head(db: Database[Doc]) -> Doc:
    """The audit chain head (last seq and hash) and each sink's delivery status."""
    from app.audit.log import CHAIN_ID
    from app.audit.status import sink_status

    head = dbm.retry(lambda: db[dbm.COUNTERS].find_one({"_id": CHAIN_ID}),
                     what="read audit head") or {}
    return {"seq": int(head.get("seq", 0)), "hash": str(head.get("hash", "")),
            "sinks": dbm.retry(lambda: sink_status(db), what="read audit sinks")}


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

def windowed_page(collection: Collection[Doc], query: Doc, window: Window, *, limit: int,
                  cursor: str | None, projection: Doc | None = None) -> Doc:
    """One page, newest first in ``(window.key, _id)`` order (the API's cursor order),
    read through windows of ``window.key`` inside [floor, start) that grow until the
    page is full (``app.api.windows.time_page``). A page costs about the documents of
    its last window, not of the collection."""
    from app.api.windows import time_page

    own: Doc = {}
    if window.start is not None:
        own["$lt"] = window.start
    if window.floor is not None:
        own["$gte"] = window.floor
    find = {**query, window.key: own} if own else query
    return time_page(collection, find, limit=limit, cursor=cursor, descending=True,
                     projection=projection, key=window.key, tie="_id", tie_type=object,
                     key_first=window.key_first,
                     first_span=timedelta(seconds=window.first_span))
