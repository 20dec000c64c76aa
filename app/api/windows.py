"""Pages whose cost is the page's, not the collection's: the audit log and the jobs.

The embedded server reads every index entry of a query's range before it sorts and
limits (``app.api.common.windowed_paginate``): "the newest 50 entries" of a 700,000-entry
log sorted the whole ``seq`` index (about 2 s per 60,000 entries), and "one day, by seq"
read and sorted the whole day. So a page that has no selective clause is read through
windows of its sort key that grow until the page is full, each window one bounded index
range with the sort and the limit:

- no filter but an action prefix (an admin's "everything"): ``seq`` windows. ``seq`` is
  gap-free from 1 to the chain head, so a window of ``n`` seqs holds at most ``n``
  entries; the newest page starts below the head with an open upper bound (entries
  sealed meanwhile are read too).
- a time range (``since``/``until``): ``time`` windows inside the range, and the page
  comes in time order, ties by ``seq`` (cursor: time and seq). Seq order is not time
  order near the edges of a range (an entry is stamped when its transaction runs and
  numbered when it is sealed, after the commit), so a seq-ordered page of a time range
  cannot be read through time windows exactly.

Audit pages with a selective clause (a target, an actor, an exact action, a project)
stay one index range in ``seq`` order (``app.api.common.paginate``). The jobs list, newest
first in ``(created_at, _id)`` order, is read through ``created_at`` windows the same way
(``time_page`` with that key and tie): an unfiltered page sorted every job before. The
dashboard's lists read their pages through the same two functions.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo.collection import Collection

from app import db as dbm
from app.api.common import decode_cursor, encode_cursor, narrow_range, paginate
from app.audit.log import CHAIN_ID
from app.db import Doc

GROWTH = 4
MAX_WINDOWS = 12
FIRST_SEQ_SPAN = 200
FIRST_TIME_SPAN = timedelta(hours=1)
_LONGEST_TIME_SPAN = timedelta(days=50 * 365)

# The span that filled the last page of each list shape (per process): most pages then
# cost one or two windows instead of climbing from the first span each time.
_spans: dict[tuple[Any, ...], Any] = {}
_spans_lock = threading.Lock()


class _OtherShape(Exception):
    """A cursor that is not a position of this list's order (hand-made, or from a list
    in the other order)."""


def _position(cursor: str | None, *types: type) -> list[Any] | None:
    if not cursor:
        return None
    values = decode_cursor(cursor)  # a malformed cursor is a 400 there
    if len(values) != len(types) or not all(
            isinstance(v, t) and not isinstance(v, bool)
            for v, t in zip(values, types, strict=True)):
        raise _OtherShape
    return values


def _remember(shape: tuple[Any, ...], span: Any) -> None:
    with _spans_lock:
        _spans[shape] = span
        while len(_spans) > 256:
            _spans.pop(next(iter(_spans)))


def _recalled(shape: tuple[Any, ...], first: Any) -> Any:
    with _spans_lock:
        return max(first, _spans.get(shape, first) / GROWTH)


def seq_page(collection: Collection[Doc], query: Doc, *, limit: int, cursor: str | None,
             descending: bool, projection: Doc | None = None) -> Doc:
    """One page in ``seq`` order (the cursor: the last seq), read through seq windows."""
    try:
        position = _position(cursor, int)
    except _OtherShape:  # as paginate answers it: the database orders the position
        return paginate(collection, query, keys=("seq",), limit=limit, cursor=cursor,
                        descending=descending, projection=projection)
    order = -1 if descending else 1
    shape = ("seq", descending, tuple(sorted(query)))
    span = int(_recalled(shape, FIRST_SEQ_SPAN))
    if position is not None:
        edge, open_edge = position[0] + (0 if descending else 1), False
    elif descending:
        head = dbm.retry(lambda: collection.database[dbm.COUNTERS].find_one(
            {"_id": CHAIN_ID}, {"seq": 1}), what="read the audit chain head") or {}
        # Open above: entries sealed after the head was read belong to the page too.
        edge, open_edge = int(head.get("seq") or 0) + 1, True
    else:
        edge, open_edge = 1, False
    items: list[Doc] = []
    used = span
    for i in range(MAX_WINDOWS):
        last = i == MAX_WINDOWS - 1
        bound: Doc
        if descending:
            lower = 0 if last else max(0, edge - span)
            bound = {"$gte": lower} if open_edge and i == 0 else {"$gte": lower, "$lt": edge}
            last = last or lower == 0
            edge = lower
        else:
            bound = {"$gte": edge} if last else {"$gte": edge, "$lt": edge + span}
            edge += span
        wanted = limit + 1 - len(items)
        find = {"seq": bound, **query}  # the key first: the clause served from an index
        items.extend(dbm.retry(lambda f=find, n=wanted: list(  # type: ignore[misc]
            collection.find(f, projection).sort("seq", order).limit(n)), what="list audit"))
        used = span
        if len(items) > limit or last:
            break
        span *= GROWTH
    next_cursor = None
    if len(items) > limit:
        _remember(shape, used)
        items = items[:limit]
        next_cursor = encode_cursor([items[-1]["seq"]])
    return {"items": items, "next_cursor": next_cursor}


def time_page(collection: Collection[Doc], query: Doc, *, limit: int, cursor: str | None,
              descending: bool, projection: Doc | None = None, key: str = "time",
              tie: str = "seq", tie_type: type = int, key_first: bool = True,
              earliest: Callable[[], datetime | None] | None = None,
              first_span: timedelta = FIRST_TIME_SPAN) -> Doc:
    """One page in ``(key, tie)`` order (``key`` a date every document has, ``tie``
    unique; the cursor: the last document's two values), read through windows of
    ``key`` inside the query's own range on it. The embedded server serves the first
    clause it can from an index: ``key_first`` puts the window first (the audit log has
    no index of a filter and its time), else the filter's equalities lead (the jobs'
    ``(state|kind|project_id, created_at, _id)`` indexes). An ascending page with no
    lower bound starts from ``earliest()`` (about the first document's key), else
    from 1970. The first window is ``first_span`` wide (then what filled this list's
    last page, per process)."""
    try:
        position = _position(cursor, datetime, tie_type)
    except _OtherShape:  # as paginate answers it: the database orders the position
        return paginate(collection, query, keys=(key, tie), limit=limit, cursor=cursor,
                        descending=descending, projection=projection)
    order = -1 if descending else 1
    own = narrow_range(query.get(key), {})
    base = {k: v for k, v in query.items() if k != key}
    shape = (collection.name, key, descending, tuple(sorted(base)))
    items: list[Doc] = []

    def read(find: Doc, wanted: int, sort: list[tuple[str, int]]) -> list[Doc]:
        return dbm.retry(lambda: list(collection.find(find, projection).sort(sort)
                                      .limit(wanted)), what=f"list {collection.name}")

    remaining = own
    if position is not None:
        at, last = position
        # The documents that tie with the cursor on the key and come after it, then the
        # rest.
        items = read({key: at, **base, tie: {"$lt" if descending else "$gt": last}},
                     limit + 1, [(tie, order)])
        remaining = narrow_range(own, {"$lt" if descending else "$gt": at})
    if remaining is None:
        return _finish(items, limit, shape, None, (key, tie))
    if descending:
        anchor = remaining.get("$lt", remaining.get("$lte"))
        if anchor is None:
            anchor = dbm.server_now(collection.database)
    else:
        anchor = remaining.get("$gte", remaining.get("$gt"))
        if anchor is None and earliest is not None:
            anchor = earliest()
        if anchor is None:
            anchor = datetime(1970, 1, 1, tzinfo=UTC)
    span = _recalled(shape, first_span)
    used = span

    def windows() -> Iterator[Doc | None]:
        nonlocal used
        edge, width = anchor, span
        for i in range(MAX_WINDOWS):
            last = i == MAX_WINDOWS - 1 or width > _LONGEST_TIME_SPAN
            used = width
            far = None if last else _shift(edge, -width if descending else width)
            last = far is None  # past year 1 or 9999 (a range's own bound may be there)
            # [far, edge) going down, [edge, far) going up; the first window is open on
            # the near side, the last one on the far side.
            window: Doc = {} if i == 0 else {"$lt" if descending else "$gte": edge}
            if far is not None:
                window["$gte" if descending else "$lt"] = far
            narrowed = narrow_range(remaining, window)
            # None: the window is outside the range; {}: the whole range (no clause).
            yield narrowed
            if last:
                return
            edge = far
            width = width * GROWTH

    for window in windows():
        if window is None:
            continue  # outside the range
        wanted = limit + 1 - len(items)
        find = dict(base)
        if window:
            find = {key: window, **base} if key_first else {**base, key: window}
        items.extend(read(find, wanted, [(key, order), (tie, order)]))
        if len(items) > limit:
            break
    return _finish(items, limit, shape, used, (key, tie))


def _shift(value: datetime, by: timedelta) -> datetime | None:
    try:
        return value + by
    except OverflowError:
        return None


def _finish(items: list[Doc], limit: int, shape: tuple[Any, ...], span: Any,
            keys: tuple[str, str]) -> Doc:
    next_cursor = None
    if len(items) > limit:
        if span is not None:
            _remember(shape, span)
        items = items[:limit]
        next_cursor = encode_cursor([items[-1][keys[0]], items[-1][keys[1]]])
    return {"items": items, "next_cursor": next_cursor}
