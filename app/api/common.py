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

import hashlib
import json
import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import flask_smorest
from bson import ObjectId
from flask import Response, g, request
from marshmallow import RAISE, Schema, fields, validate
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
    silently ignored and return everything)."""

    class Meta:
        unknown = RAISE


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


def paginate(collection: Collection[Doc], query: Doc, *, limit: int, cursor: str | None,
             keys: tuple[str, ...] = ("created_at", "_id"), projection: Doc | None = None,
             descending: bool = False) -> dict[str, Any]:
    """One page of ``query`` in ``keys`` order (the last key unique): ``{items,
    next_cursor}``. The default order is creation order, so items inserted while a
    client pages come last."""
    if cursor:
        query = {"$and": [query, _after(keys, decode_cursor(cursor), descending)]}
    order = -1 if descending else 1

    def fetch() -> list[Doc]:
        return list(collection.find(query, projection).sort([(k, order) for k in keys])
                    .limit(limit + 1))

    items = dbm.retry(fetch, what=f"list {collection.name}")
    next_cursor = None
    if len(items) > limit:
        items = items[:limit]
        next_cursor = encode_cursor([items[-1].get(k) for k in keys])
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
