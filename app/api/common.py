"""Pieces every resource shares: the URL prefix, the error schema, cursor pagination,
ETags, and the visibility rule (a token sees its own project only).

Pagination is by cursor: a list is sorted on keys ending in a unique one (creation time
then ``_id``; ``seq`` for the audit log) and the cursor holds the last item's keys, so a
page is the next ``limit`` items *after* it. Items inserted while a client pages through
never cause an item to be skipped or repeated.

A cursor is the position itself, written plainly (``d<epoch ms>~s<id>``, ``i<seq>``), not
an opaque blob: every string that matches ``CURSOR_PATTERN`` (published in the OpenAPI
document) names a position and is accepted, so what the schema calls valid the server
takes (a position of another list's shape just pages from there).
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import flask_smorest
from bson import ObjectId
from flask import Response, g, request
from marshmallow import RAISE, Schema, ValidationError, fields, pre_load, validate
from pymongo.collection import Collection
from webargs.flaskparser import FlaskParser

from app import db as dbm
from app.db import Doc
from app.domain.tokens import Principal
from app.errors import CertAutoPilotError, NotFound, PreconditionFailed

API_PREFIX = "/api/v1"
DEFAULT_LIMIT = 50
MAX_LIMIT = 200


class BadRequest(CertAutoPilotError):
    status, code = 400, "bad_request"


class ErrorSchema(Schema):
    """The one error envelope of every API error."""

    code = fields.String(required=True, metadata={
        "description": "Stable machine-readable code, e.g. not_found, validation_failed",
        "example": "not_found"})
    status = fields.Integer(required=True, metadata={"description": "HTTP status",
                                                     "example": 404})
    message = fields.String(required=True, metadata={"description": "What went wrong"})
    errors = fields.Dict(required=True, metadata={
        "description": "Details by field or location (e.g. {'json': {'names': [...]}})"})


class Blueprint(flask_smorest.Blueprint):
    """flask-smorest's Blueprint whose argument parser lets each schema decide about
    unknown fields (ours: refuse them, in the body and in the query)."""

    ARGUMENTS_PARSER = FlaskParser(unknown=None)


class StrictQuery(Schema):
    """Query arguments: an unknown one is a 422 (a typo like ?stauts= must not be
    silently ignored and return everything), and so is a single-valued one given more
    than once (``?ca=a&ca=b`` must not silently mean ``?ca=a``)."""

    class Meta:
        unknown = RAISE

    @pre_load
    def _one_value_each(self, data: Any, **_: Any) -> Any:
        raw = getattr(data, "data", data)  # webargs' MultiDictProxy wraps the MultiDict
        if not hasattr(raw, "getlist"):
            return data
        single = {f.data_key or name for name, f in self.fields.items()
                  if not isinstance(f, fields.List)}
        repeated = sorted(k for k in raw if k in single and len(raw.getlist(k)) > 1)
        if repeated:
            raise ValidationError({k: ["given more than once"] for k in repeated})
        return data


# One position value: d<epoch ms> (a date), i<integer>, o<ObjectId hex>, s<id>, n (null).
_CURSOR_VALUE = r"(?:d[0-9]{1,13}|i-?[0-9]{1,18}|o[0-9a-f]{24}|s[A-Za-z0-9_.:-]{0,200}|n)"
CURSOR_PATTERN = rf"^{_CURSOR_VALUE}(?:~{_CURSOR_VALUE}){{0,3}}$"
_CURSOR_RE = re.compile(CURSOR_PATTERN)
_ID_RE = re.compile(r"[A-Za-z0-9_.:-]{0,200}")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class PageArgsSchema(StrictQuery):
    limit = fields.Integer(load_default=DEFAULT_LIMIT,
                           validate=validate.Range(min=1, max=MAX_LIMIT),
                           metadata={"description": f"Page size (1-{MAX_LIMIT})"})
    cursor = fields.String(load_default=None, validate=validate.Regexp(CURSOR_PATTERN),
                           metadata={"description": "next_cursor of the previous page"})


def plain_json(value: Any) -> Any:
    """A stored value as JSON: datetimes as ISO-8601 UTC, ObjectIds as strings."""
    if isinstance(value, dict):
        return {str(k): plain_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_json(v) for v in value]
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.astimezone(UTC).isoformat()
    if isinstance(value, ObjectId):
        return str(value)
    return value


class JsonValue(fields.Raw):
    """A free-form stored value (error details, history...), rendered as plain JSON."""

    def _serialize(self, value: Any, attr: str | None, obj: Any, **kwargs: Any) -> Any:
        return plain_json(value)


def page_schema(item: type[Schema], name: str) -> type[Schema]:
    """A ``{items: [...], next_cursor}`` schema for a list of ``item``."""
    return Schema.from_dict({
        "items": fields.List(fields.Nested(item), required=True),
        "next_cursor": fields.String(required=True, allow_none=True, metadata={
            "description": "Pass as ?cursor= for the next page; null on the last page"}),
    }, name=name)


# -- the caller ----------------------------------------------------------------------

def principal() -> Principal:
    """The authenticated caller of this request (set by app.api.auth)."""
    found = g.get("principal")
    if found is None:
        raise RuntimeError("no authenticated principal: is the view missing @scope(...)?")
    assert isinstance(found, Principal)
    return found


def ensure_visible(doc: Mapping[str, Any] | None, what: str, ident: Any,
                   project_key: str = "project_id") -> Any:
    """Return ``doc`` if the caller may see it; NotFound otherwise (never 403: a token
    of another project must not learn that the object exists)."""
    if doc is None or not principal().can_see(doc.get(project_key)):
        raise NotFound(f"{what} {ident!r} not found")
    return doc


def project_scope(requested: str | None) -> str | None:
    """The project a list or create applies to: a project token's own project (asking
    for another is NotFound), or, for an admin, the one requested (None = all)."""
    caller = principal()
    if caller.is_admin:
        if requested is not None:
            from app.domain.projects import get_project

            get_project(current_db(), requested)
        return requested
    if requested is not None and requested != caller.project_id:
        raise NotFound(f"project {requested!r} not found")
    return caller.project_id


def scoped_query(args: dict[str, Any], *equal_keys: str) -> dict[str, Any]:
    """The filter of a list view: the caller's project scope (see ``project_scope``) plus
    an exact match on each of ``equal_keys`` given in ``args``."""
    project_id = project_scope(args.get("project_id"))
    query: dict[str, Any] = {} if project_id is None else {"project_id": project_id}
    for key in equal_keys:
        if args.get(key):
            query[key] = args[key]
    return query


def required_project(requested: str | None) -> str:
    """For creates: the project the new object belongs to (admins must name one)."""
    project_id = project_scope(requested)
    if project_id is None:
        # 403, not 422: the body is well formed for the schema; what is missing is a
        # project this credential implies (a project token's own), and an admin token
        # has none.
        raise ProjectRequired("an admin token must say which project: set project_id",
                              errors={"project_id": ["required for admin tokens"]})
    return project_id


class ProjectRequired(CertAutoPilotError):
    status, code = 403, "project_required"


def visibility_filter(project_id: str | None) -> Doc:
    return {} if project_id is None else {"project_id": project_id}


def current_db() -> Any:
    """The application database of the current Flask app (one client per process)."""
    from flask import current_app

    return dbm.get_db(current_app.extensions["cap_settings"])


# -- cursors -------------------------------------------------------------------------

def _encode_value(value: Any) -> str:
    if value is None:
        return "n"
    if isinstance(value, ObjectId):
        return f"o{value}"
    if isinstance(value, datetime):
        # Exact integer milliseconds (BSON dates hold no more); float maths could land
        # a millisecond early and repeat an item.
        return f"d{(value.astimezone(UTC) - _EPOCH) // timedelta(milliseconds=1)}"
    if isinstance(value, bool):
        raise TypeError("cannot page on a boolean key")
    if isinstance(value, int):
        return f"i{value}"
    if isinstance(value, str) and _ID_RE.fullmatch(value):
        return f"s{value}"
    raise TypeError(f"cannot page on a key of type {type(value).__name__}")


def _decode_value(token: str) -> Any:
    kind, rest = token[0], token[1:]
    if kind == "n":
        return None
    if kind == "o":
        return ObjectId(rest)
    if kind == "d":
        return _EPOCH + timedelta(milliseconds=int(rest))
    if kind == "i":
        return int(rest)
    return rest


def encode_cursor(values: list[Any]) -> str:
    return "~".join(_encode_value(v) for v in values)


def decode_cursor(cursor: str) -> list[Any]:
    if not _CURSOR_RE.match(cursor):  # the schema checks this too; keep the helper safe
        raise BadRequest("invalid cursor: pass next_cursor from a previous page unchanged",
                         errors={"query": {"cursor": ["invalid"]}})
    return [_decode_value(token) for token in cursor.split("~")]


def _after(keys: tuple[str, ...], values: list[Any], descending: bool) -> Doc:
    """Documents strictly after ``values`` in the (keys...) order; a shorter position
    compares on its prefix, extra values are ignored."""
    op = "$lt" if descending else "$gt"
    keys = keys[:len(values)]
    clauses = []
    for i, key in enumerate(keys):
        clause = {k: values[j] for j, k in enumerate(keys[:i])}
        clause[key] = {op: values[i]}
        clauses.append(clause)
    return clauses[0] if len(clauses) == 1 else {"$or": clauses}


def _with_bound(query: Doc, key: str, ops: Doc) -> Doc:
    """``query`` and ``key`` within ``ops``, merged into the query's own condition on
    ``key`` when it has one: a flat filter keeps the planner on the index, where a
    top-level ``$and``/``$or`` sends the embedded server to a collection scan."""
    current = query.get(key)
    if current is None and key not in query:
        return {**query, key: ops}
    if isinstance(current, dict) and current and all(k.startswith("$") for k in current) \
            and not set(current) & set(ops):
        return {**query, key: {**current, **ops}}
    return {"$and": [query, {key: ops}]}


def page_query(query: Doc, keys: tuple[str, ...], after: list[Any] | None,
               descending: bool = False) -> tuple[Doc, list[Any] | None]:
    """The filter of the page after the cursor values ``after``, and the values the
    caller must still drop ties against (None when the filter is exact)."""
    if after is None:
        return query, None
    if len(keys) == 1:
        return _with_bound(query, keys[0], {"$lt" if descending else "$gt": after[0]}), None
    if len(after) < len(keys) or any(v is None for v in after):
        return {"$and": [query, _after(keys, after, descending)]}, None
    if descending and isinstance(after[0], datetime):
        # ``< value + 1 ms`` rather than ``<= value`` (stored dates have millisecond
        # precision, so the same documents): the embedded server drops the entries equal
        # to a $lte bound on a date after an equality in a compound index (secantusdb
        # 0.7.0b3), which skipped every item tying with the cursor on a later page.
        bound: Doc = {"$lt": after[0] + _MILLISECOND}
    else:
        bound = {"$lte" if descending else "$gte": after[0]}
    return _with_bound(query, keys[0], bound), after


def paginate(collection: Collection[Doc], query: Doc, *, limit: int, cursor: str | None,
             keys: tuple[str, ...] = ("created_at", "_id"), projection: Doc | None = None,
             descending: bool = False) -> dict[str, Any]:
    """One page of ``query`` in ``keys`` order (the last key unique): ``{items,
    next_cursor}``. The default order is creation order, so items inserted while a
    client pages come last.

    The page after a cursor is asked of the database as a range on the first key (from
    the cursor's value, inclusive) and the few items that tie on it but do not come after
    the cursor are dropped here: one index range, never a count or a skip, whatever the
    page's depth."""
    order = -1 if descending else 1
    after: list[Any] | None = decode_cursor(cursor)[:len(keys)] if cursor else None
    query, after = page_query(query, keys, after, descending)

    def beyond(doc: Doc) -> bool:
        assert after is not None
        if doc.get(keys[0]) != after[0]:
            return True
        rest = tuple(doc.get(k) for k in keys[1:])
        try:
            return rest < tuple(after[1:]) if descending else rest > tuple(after[1:])
        except TypeError:  # a hand-made position of other types: the database ordered it
            return True

    def fetch(extra: int) -> list[Doc]:
        return list(collection.find(query, projection).sort([(k, order) for k in keys])
                    .limit(limit + 1 + extra))

    # After a cursor the range includes the cursor's own document (its first key's
    # value, inclusive), which is dropped here: ask for it too, or every such page takes
    # a second read.
    extra = 0 if after is None else 1
    while True:
        fetched = dbm.retry(functools.partial(fetch, extra), what=f"list {collection.name}")
        items = fetched if after is None else [d for d in fetched if beyond(d)]
        if len(items) > limit or len(fetched) < limit + 1 + extra:
            break
        extra = max(2 * extra, len(fetched) - len(items), 1)
    next_cursor = None
    if len(items) > limit:
        items = items[:limit]
        next_cursor = encode_cursor([items[-1].get(k) for k in keys])
    return {"items": items, "next_cursor": next_cursor}


# -- pages read through bounded ranges of their first key -----------------------------

_RANGE_OPS = frozenset({"$gt", "$gte", "$lt", "$lte"})
WINDOW_GROWTH = 4
MAX_WINDOWS = 12
# A deep page of a list this process has not paged yet starts with an hour of its key.
COLD_SPAN = timedelta(hours=1)
_MIN_SPAN = timedelta(seconds=1)
_MILLISECOND = timedelta(milliseconds=1)
_HINTS_KEPT = 512


@dataclass
class _Hint:
    """What the last pages of one list (a filter, whatever its range on the key) showed:
    where its first page ended, and how much of the key one page covered."""

    first_upper: datetime | None = None
    span: timedelta | None = None


_hints: OrderedDict[tuple[Any, ...], _Hint] = OrderedDict()
_hints_lock = threading.Lock()


def _hint(shape: tuple[Any, ...]) -> _Hint:
    with _hints_lock:
        hint = _hints.pop(shape, None) or _Hint()
        _hints[shape] = hint
        while len(_hints) > _HINTS_KEPT:
            _hints.popitem(last=False)
        return hint


def narrow_range(condition: Doc | None, ops: Doc) -> Doc | None:
    """The range ``condition`` ∧ ``ops`` (both made of $gt/$gte/$lt/$lte) as one operator
    document, or None when it is empty."""
    lower: tuple[Any, bool] | None = None  # (value, inclusive)
    upper: tuple[Any, bool] | None = None
    for source in (condition or {}, ops):
        for op, value in source.items():
            inclusive = op in ("$gte", "$lte")
            if op in ("$gt", "$gte"):
                if lower is None or value > lower[0] or (value == lower[0] and not inclusive):
                    lower = (value, inclusive)
            elif upper is None or value < upper[0] or (value == upper[0] and not inclusive):
                upper = (value, inclusive)
    if lower is not None and upper is not None and (
            lower[0] > upper[0] or (lower[0] == upper[0] and not (lower[1] and upper[1]))):
        return None
    out: Doc = {}
    if lower is not None:
        out["$gte" if lower[1] else "$gt"] = lower[0]
    if upper is not None:
        out["$lte" if upper[1] else "$lt"] = upper[0]
    return out


def windowed_paginate(collection: Collection[Doc], query: Doc, *, limit: int,
                      cursor: str | None, keys: tuple[str, str],
                      projection: Doc | None = None) -> dict[str, Any]:
    """``paginate``'s page (ascending ``keys``: a date every document has, then a unique
    key; the same cursors), asked of the database as bounded ranges of the date.

    The embedded server reads every index entry of a query's range before it sorts and
    limits (a page of "every issued certificate" costs it the whole set; mongod stops
    after ``limit + 1`` keys). So the page is read through disjoint windows of the first
    key, ascending, together covering the query's whole range: the first page from below
    where this list's last first page ended, a deep page from its cursor over twice what
    one page covered last time; each next window is ``WINDOW_GROWTH`` times wider and the
    last one is unbounded. Each window is one (equality..., date) index range with the
    sort and limit, so a page costs about its own documents on either server, plus a
    round trip per extra window when the list's density changed. The hints are per
    process and only choose the windows: the result never depends on them. A list this
    process has not paged yet reads its first page in one unbounded range."""
    first = keys[0]
    own = query.get(first)
    if own is not None and not (isinstance(own, dict) and own and set(own) <= _RANGE_OPS):
        return paginate(collection, query, limit=limit, cursor=cursor, keys=keys,
                        projection=projection)
    after: list[Any] | None = decode_cursor(cursor)[:len(keys)] if cursor else None
    if after is not None and (len(after) < len(keys) or not isinstance(after[0], datetime)):
        return paginate(collection, query, limit=limit, cursor=cursor, keys=keys,
                        projection=projection)
    base = {k: v for k, v in query.items() if k != first}
    shape = (collection.name, first, tuple(sorted((k, repr(v)) for k, v in base.items())))
    hint = _hint(shape)
    own_upper = narrow_range(own, {})
    upper_value = None
    if own_upper:
        upper_value = own_upper.get("$lt", own_upper.get("$lte"))
    order = [(k, 1) for k in keys]

    def windows() -> Iterator[Doc]:
        # Half-open windows, [low, high): the embedded server drops the entries equal to
        # a $lte bound on a date followed by _id in the index (secantusdb 0.7.0b3), and
        # stored dates have millisecond precision.
        if after is None:
            if hint.first_upper is None:
                yield {}
                return
            low = hint.first_upper + _MILLISECOND
            yield {"$lt": low}
        else:
            low = after[0]
        span = 2 * hint.span if hint.span else COLD_SPAN
        for _ in range(MAX_WINDOWS):
            try:
                high = low + span
            except OverflowError:  # past year 9999: the rest is the last window
                break
            yield {"$gte": low, "$lt": high}
            if upper_value is not None and high >= upper_value:
                return  # the query's own range ends inside this window
            low = high
            try:
                span *= WINDOW_GROWTH
            except OverflowError:
                break
        yield {"$gte": low}

    def beyond(doc: Doc) -> bool:
        """After the cursor (only a document tying on the date can be at or before it)."""
        assert after is not None
        if doc.get(first) != after[0]:
            return True
        try:
            return bool(doc.get(keys[1]) > after[1])
        except TypeError:  # a hand-made position of another type: the database ordered it
            return True

    def read(find: Doc, wanted: int) -> list[Doc]:
        return list(collection.find(find, projection).sort(order).limit(wanted))

    def fetch(window: Doc, need: int) -> list[Doc]:
        """The first ``need`` documents of the window that come after the cursor."""
        narrowed = narrow_range(own, window)
        if narrowed is None:
            return []  # outside the query's own range on the date
        if narrowed and not {"$gt", "$gte"} & set(narrowed):
            # Not through the documents whose date is null (dbm.EARLIEST).
            narrowed = {"$gte": dbm.EARLIEST, **narrowed}
        find = {**base, first: narrowed} if narrowed else dict(base)
        # The window that starts at the cursor's date holds the cursor's own document,
        # dropped by ``beyond``: ask for it too, or every deep page takes a second read.
        extra = 1 if after is not None and window.get("$gte") == after[0] else 0
        while True:
            wanted = need + extra
            fetched = dbm.retry(functools.partial(read, find, wanted),
                                what=f"list {collection.name}")
            kept = fetched if after is None else [d for d in fetched if beyond(d)]
            if len(kept) >= need or len(fetched) < wanted:
                return kept[:need]
            extra = max(2 * extra, len(fetched) - len(kept), 1)

    items: list[Doc] = []
    for window in windows():
        items.extend(fetch(window, limit + 1 - len(items)))
        if len(items) > limit:
            break
    next_cursor = None
    if len(items) > limit:
        first_value, last_value = items[0].get(first), items[limit].get(first)
        if isinstance(first_value, datetime) and isinstance(last_value, datetime):
            with _hints_lock:
                if after is None:
                    hint.first_upper = last_value
                hint.span = max(_MIN_SPAN, last_value - first_value)
        items = items[:limit]
        next_cursor = encode_cursor([items[-1].get(k) for k in keys])
    elif after is None:
        with _hints_lock:
            hint.first_upper = None  # a list of one page: read it whole next time
    return {"items": items, "next_cursor": next_cursor}


# -- ETags ---------------------------------------------------------------------------

def etag_of(representation: Any) -> str:
    """A strong ETag: a hash of the JSON representation a GET returns."""
    body = json.dumps(representation, sort_keys=True, separators=(",", ":"), default=str)
    return '"' + hashlib.sha256(body.encode()).hexdigest()[:32] + '"'


def _etags(header: str | None) -> list[str]:
    if not header:
        return []
    return [part.strip().removeprefix("W/") for part in header.split(",") if part.strip()]


def not_modified(etag: str) -> Response | None:
    """A 304 when the client's If-None-Match holds the current ETag."""
    wanted = _etags(request.headers.get("If-None-Match"))
    if "*" in wanted or etag in wanted:
        response = Response(status=304)
        response.headers["ETag"] = etag
        return response
    return None


def check_if_match(etag: str) -> None:
    """412 when the client sent If-Match and the object changed since it read it."""
    header = request.headers.get("If-Match")
    if header is None:
        return
    wanted = _etags(header)
    if "*" not in wanted and etag not in wanted:
        raise PreconditionFailed("the object changed since you read it (If-Match does not "
                                 "match its ETag); read it again and retry",
                                 errors={"etag": etag})


IF_NONE_MATCH_PARAM = {"in": "header", "name": "If-None-Match", "required": False,
                       "schema": {"type": "string", "maxLength": 1000},
                       "description": "ETag of a copy you hold: 304 if unchanged"}
IF_MATCH_PARAM = {"in": "header", "name": "If-Match", "required": False,
                  "schema": {"type": "string", "maxLength": 1000},
                  "description": "ETag the change is based on: 412 if the object changed"}
ETAG_HEADER = {"ETag": {"description": "Version of the representation",
                        "schema": {"type": "string"}}}
