"""The ACME rate-limit budget shared by every worker: token buckets in MongoDB.

A CA's limits are per account, per registered domain, per identifier, not per process:
20 workers that each throttle themselves still exhaust Let's Encrypt's 300 new orders
per 3 hours, and then every renewal fails for hours. So the budget lives in the
database (``ca_budgets``), one document per bucket::

    _id        "<directory URL>|<bucket>|<subject>"
    ca, bucket, subject
    count      N (the limit's count)      window_ms  W (the limit's window)
    slots      N timestamps (ms since the epoch, server clock): when each token was taken
    ticket_at  the end of the waiting line (see ``take``)

A token is free when its slot is older than ``now - W``: a token comes back W after it
was taken, so no window of W ever holds more than N takes (stricter than a refilling
bucket, which lets 2N through a window after a full burst). Taking one is ONE
conditional update: ``{slots: {$lte: now - W}}`` matches only while a token is free, and
``$push`` with ``$sort``/``$slice: -N`` drops the oldest slot for ``now`` in the same
write, so two workers can never take the same token (no read-modify-write). ``now`` is
the database server's clock (``app.db.clock``), the one clock every worker shares, read
fresh (a round trip) when a token is taken and settled: the process's extrapolated
estimate may be off by half a round trip, and a token stamped early comes back early.

Buckets (``app.config.ca_budgets``): ``new_orders_per_account``,
``new_certificates_per_domain`` (per registered domain, from the public suffix list that
the ``publicsuffixlist`` package bundles: nothing is downloaded at run time),
``failed_validations_per_identifier`` (spent when a validation fails, checked before an
order) and ``orders_pace`` (every order to one CA). A renewal that names the certificate
it ``replaces`` skips the per-account and per-domain buckets when the directory's policy
says the CA exempts them (Let's Encrypt does).

A job refused a token is not failed: it raises ``DeferUntil`` and comes back when a
token is free. So that hundreds of waiting jobs do not all wake at the same moment, each
takes a place in the bucket's waiting line (``ticket_at`` advances by W/N per place).
A CA's ``rateLimited`` answer drains the bucket it names until its ``Retry-After``.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric
from pymongo import ReturnDocument
from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.errors import DuplicateKeyError

from app import db as dbm
from app.config import Settings
from app.config.ca_budgets import BudgetPolicy, Limit
from app.db import Doc

log = logging.getLogger(__name__)

ORDERS_PER_ACCOUNT = "new_orders_per_account"
CERTS_PER_DOMAIN = "new_certificates_per_domain"
FAILED_VALIDATIONS = "failed_validations_per_identifier"
PACE = "orders_pace"
BUCKETS = (ORDERS_PER_ACCOUNT, CERTS_PER_DOMAIN, FAILED_VALIDATIONS, PACE)
# A job whose token comes free this soon waits for it rather than queueing: a retry.
_SETTLE_MS = 50

# Let's Encrypt names the limit in its problem detail by the anchor of its documentation
# page; that is the one place a rateLimited answer says which bucket is empty.
_LIMIT_ANCHORS = (
    (re.compile(r"new-orders-per-account|too many new orders", re.I), ORDERS_PER_ACCOUNT),
    (re.compile(r"new-certificates-per-registered-domain|too many certificates", re.I),
     CERTS_PER_DOMAIN),
    (re.compile(r"authorization-failures|failed-validation|too many failed", re.I),
     FAILED_VALIDATIONS),
)


@dataclass(frozen=True)
class Bucket:
    ca: str
    kind: str
    subject: str
    limit: Limit

    @property
    def key(self) -> str:
        return f"{self.ca}|{self.kind}|{self.subject}"

    @property
    def window_ms(self) -> int:
        return int(self.limit.window_seconds * 1000)


@dataclass(frozen=True)
class Grant:
    """Tokens taken at ``taken_ms`` (server clock) from ``buckets``."""

    buckets: tuple[Bucket, ...]
    taken_ms: int


@dataclass(frozen=True)
class Refusal:
    """No token before ``until``: which bucket, and how long its line is."""

    bucket: Bucket
    until: datetime

    def reason(self) -> str:
        return (f"CA budget {self.bucket.kind} for {self.bucket.subject} is spent "
                f"({self.bucket.limit}); next token at {self.until.isoformat()}")


def _ms(value: datetime) -> int:
    return int(value.timestamp() * 1000)


def _dt(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def _coll(db: Database[Doc]) -> Collection[Doc]:
    return dbm.primary(db)[dbm.CA_BUDGETS]


@lru_cache(maxsize=1)
def _suffix_list() -> Any:
    from publicsuffixlist import PublicSuffixList

    return PublicSuffixList()  # the list bundled with the package; no download


def registered_domain(name: str) -> str:
    """The registered domain (eTLD+1) a CA counts a name under: ``a.b.example.co.uk`` →
    ``example.co.uk``; an IP address counts as itself."""
    value = name.strip().lower().rstrip(".")
    if value.startswith("*."):
        value = value[2:]
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        pass
    return str(_suffix_list().privatesuffix(value) or value)


def policy_for(settings: Settings, directory_url: str) -> BudgetPolicy:
    return settings.ca_budgets.for_directory(directory_url)


def order_buckets(settings: Settings, directory_url: str, account_id: str,
                  names: Iterable[str], *, replaces: bool) -> list[Bucket]:
    """The buckets a new order takes a token from, most contended first."""
    policy = policy_for(settings, directory_url)
    buckets = []
    if not (replaces and policy.ari_renewals_exempt):
        if policy.new_orders_per_account is not None:
            buckets.append(Bucket(directory_url, ORDERS_PER_ACCOUNT, account_id,
                                  policy.new_orders_per_account))
        if policy.new_certificates_per_domain is not None:
            for domain in sorted({registered_domain(n) for n in names}):
                buckets.append(Bucket(directory_url, CERTS_PER_DOMAIN, domain,
                                      policy.new_certificates_per_domain))
    if policy.orders_pace is not None:
        buckets.append(Bucket(directory_url, PACE, "*", policy.orders_pace))
    return buckets


def validation_buckets(settings: Settings, directory_url: str, account_id: str,
                       names: Iterable[str]) -> list[Bucket]:
    limit = policy_for(settings, directory_url).failed_validations_per_identifier
    if limit is None:
        return []
    return [Bucket(directory_url, FAILED_VALIDATIONS, f"{account_id}:{name.lower()}", limit)
            for name in sorted(set(names))]


# ------------------------------------------------------------------ bucket documents


def _ensure(coll: Collection[Doc], bucket: Bucket, now_ms: int) -> None:
    """Create the bucket full, or resize it when its configured limit changed."""
    count, window = bucket.limit.count, bucket.window_ms
    try:
        res = coll.update_one({"_id": bucket.key}, {"$setOnInsert": {
            "ca": bucket.ca, "bucket": bucket.kind, "subject": bucket.subject,
            "count": count, "window_ms": window, "slots": [0] * count, "ticket_at": 0,
            "created_at": _dt(now_ms)}}, upsert=True)
    except DuplicateKeyError:  # a peer created it at the same moment
        res = None
    if res is not None and res.upserted_id is not None:
        return
    doc = coll.find_one({"_id": bucket.key}, {"count": 1, "window_ms": 1})
    if doc is None or (doc.get("count") == count and doc.get("window_ms") == window):
        return
    old = int(doc.get("count") or 0)
    # Conditional on the count read: a resize happens once even if workers race on it.
    coll.update_one({"_id": bucket.key, "count": old}, {
        "$set": {"count": count, "window_ms": window},
        "$push": {"slots": {"$each": [0] * max(0, count - old), "$sort": 1,
                            "$slice": -count}}})


def _take_one(coll: Collection[Doc], bucket: Bucket, now_ms: int) -> bool:
    res = coll.update_one(
        {"_id": bucket.key, "slots": {"$lte": now_ms - bucket.window_ms}},
        {"$push": {"slots": {"$each": [now_ms], "$sort": 1, "$slice": -bucket.limit.count}},
         "$set": {"taken_at": _dt(now_ms)}})
    return res.modified_count == 1


def _give_back(coll: Collection[Doc], bucket: Bucket, now_ms: int) -> None:
    """Undo ``_take_one`` of ``now_ms`` (another bucket of the same order refused)."""
    coll.update_one({"_id": bucket.key, "slots": now_ms}, {"$set": {"slots.$": 0}})


def _free_at(coll: Collection[Doc], bucket: Bucket, now_ms: int) -> int:
    doc = coll.find_one({"_id": bucket.key}, {"slots": 1}) or {}
    slots = [int(s) for s in doc.get("slots") or [0]]
    return max(now_ms, min(slots) + bucket.window_ms)


def _place_in_line(coll: Collection[Doc], bucket: Bucket, free_ms: int) -> int:
    """A place in the bucket's waiting line, at or after ``free_ms``: one update that
    moves the line's end on by W/N and returns the place it held."""
    spacing = max(1, bucket.window_ms // bucket.limit.count)
    doc = coll.find_one_and_update(
        {"_id": bucket.key},
        [{"$set": {"ticket_at": {"$add": [{"$max": ["$ticket_at", free_ms]}, spacing]}}}],
        projection={"ticket_at": 1}, return_document=ReturnDocument.AFTER)
    return int((doc or {}).get("ticket_at", free_ms + spacing)) - spacing


def take(db: Database[Doc], buckets: list[Bucket]) -> Grant | Refusal:
    """Take one token from every bucket, or none: a Grant, or a Refusal saying when to
    come back. A refusal by a later bucket gives back the tokens already taken. After
    the request the tokens were taken for, ``settle`` the grant."""
    coll = _coll(db)
    # Read now, not the process's estimate (``app.db.clock``): an estimate may run ahead
    # by up to half a round trip, which on a loaded database is long enough for a token
    # to come back early. A fresh reading was stamped before the request is sent.
    now_ms = _ms(dbm.server_now(db, fresh=True))
    taken: list[Bucket] = []
    for bucket in buckets:
        _ensure(coll, bucket, now_ms)
        if _take_one(coll, bucket, now_ms):
            taken.append(bucket)
            continue
        for done in taken:
            _give_back(coll, done, now_ms)
        free_ms = _free_at(coll, bucket, now_ms)
        when = free_ms + _SETTLE_MS if free_ms - now_ms < bucket.window_ms / \
            bucket.limit.count else _place_in_line(coll, bucket, free_ms)
        return Refusal(bucket, _dt(max(when, now_ms + _SETTLE_MS)))
    return Grant(tuple(taken), now_ms)


def settle(db: Database[Doc], grant: Grant) -> None:
    """Re-stamp the grant's tokens with the time its request was answered. The CA counts
    a request when it receives it, which is after the token was taken, by a delay that
    varies (a loaded worker, a nonce fetch): stamped at the answer, a token comes back W
    after the CA surely counted it, so the CA never sees more than N in a window."""
    coll = _coll(db)
    done_ms = _ms(dbm.server_now(db, fresh=True))  # stamped after the answer (see take)
    if done_ms <= grant.taken_ms:
        return
    for bucket in grant.buckets:
        coll.update_one({"_id": bucket.key, "slots": grant.taken_ms},
                        {"$set": {"slots.$": done_ms}})


def check(db: Database[Doc], buckets: list[Bucket]) -> Refusal | None:
    """Is a token free in every bucket (none is taken)? For buckets spent by outcomes,
    e.g. failed validations: an order waits until the identifier may fail again."""
    coll = _coll(db)
    now_ms = _ms(dbm.server_now(db))
    for bucket in buckets:
        doc = coll.find_one({"_id": bucket.key}, {"slots": 1, "window_ms": 1})
        if doc is None:
            continue
        window = bucket.window_ms
        slots = [int(s) for s in doc.get("slots") or []]
        if len(slots) < bucket.limit.count or min(slots) <= now_ms - window:
            continue
        return Refusal(bucket, _dt(min(slots) + window + _SETTLE_MS))
    return None


def spend(db: Database[Doc], buckets: list[Bucket]) -> None:
    """Spend a token whatever the level (something the CA counts has happened)."""
    coll = _coll(db)
    now_ms = _ms(dbm.server_now(db))
    for bucket in buckets:
        _ensure(coll, bucket, now_ms)
        coll.update_one({"_id": bucket.key}, {"$push": {"slots": {
            "$each": [now_ms], "$sort": 1, "$slice": -bucket.limit.count}}})


def drain(db: Database[Doc], bucket: Bucket, until: datetime) -> None:
    """Empty ``bucket`` until ``until`` (the CA said it is spent): every slot is moved to
    ``until - W`` unless it is already later. Conditional on the slots read, retried."""
    coll = _coll(db)
    now_ms = _ms(dbm.server_now(db))
    _ensure(coll, bucket, now_ms)
    floor = _ms(until) - bucket.window_ms
    for _ in range(5):
        doc = coll.find_one({"_id": bucket.key}, {"slots": 1}) or {}
        slots = [int(s) for s in doc.get("slots") or []]
        drained = sorted(max(s, floor) for s in slots)
        if coll.update_one({"_id": bucket.key, "slots": slots},
                           {"$set": {"slots": drained, "drained_until": until}}
                           ).modified_count == 1 or drained == slots:
            return


def bucket_named_by(problem_detail: str | None, buckets: list[Bucket]) -> Bucket | None:
    """The bucket a CA's ``rateLimited`` answer names (by Let's Encrypt's documentation
    anchor or wording), else the per-account orders bucket, else the first."""
    kind = next((k for pattern, k in _LIMIT_ANCHORS
                 if problem_detail and pattern.search(problem_detail)), ORDERS_PER_ACCOUNT)
    return next((b for b in buckets if b.kind == kind),
                next((b for b in buckets if b.kind == ORDERS_PER_ACCOUNT),
                     buckets[0] if buckets else None))


# ------------------------------------------------------------------ levels


def levels(db: Database[Doc], *, ca: str | None = None, limit: int = 1000) -> list[Doc]:
    """Every bucket's level now: tokens free, the limit, the next token's time."""
    coll = _coll(db)
    now = dbm.server_now(db)
    now_ms = _ms(now)
    query: Doc = {"ca": ca} if ca else {}
    rows = []
    for doc in dbm.retry(lambda: list(coll.find(query).sort([("ca", 1), ("bucket", 1),
                                                             ("subject", 1)]).limit(limit)),
                         what="read CA budgets"):
        window = int(doc.get("window_ms") or 0)
        slots = [int(s) for s in doc.get("slots") or []]
        free = sum(1 for s in slots if s <= now_ms - window)
        rows.append({
            "ca": doc.get("ca"), "bucket": doc.get("bucket"), "subject": doc.get("subject"),
            "tokens": free, "capacity": int(doc.get("count") or len(slots)),
            "window_seconds": window / 1000,
            "next_token_at": None if free or not slots else _dt(min(slots) + window),
            "waiting_until": _dt(int(doc["ticket_at"]))
            if int(doc.get("ticket_at") or 0) > now_ms else None,
        })
    return rows


def budget_metrics(db: Database[Doc]) -> Iterator[Metric]:
    """Scrape-time gauge ``certautopilot_ca_budget_tokens{ca,bucket}``: tokens free now,
    summed over a CA's buckets of one kind (subjects would be one series per domain)."""
    tokens = GaugeMetricFamily(
        "certautopilot_ca_budget_tokens",
        "Tokens free now in the shared CA rate-limit budget, summed by CA and bucket kind.",
        labels=["ca", "bucket"])
    totals: dict[tuple[str, str], int] = {}
    for row in levels(db, limit=10000):
        key = (str(row["ca"]), str(row["bucket"]))
        totals[key] = totals.get(key, 0) + int(row["tokens"])
    for (ca, kind), value in sorted(totals.items()):
        tokens.add_metric([ca, kind], float(value))
    yield tokens
