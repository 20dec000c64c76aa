from datetime import UTC

from marshmallow import Schema, fields, validate

from app.api.common import JsonValue, PageArgsSchema, page_schema
from app.api.projects.schemas import ActorSchema


class AuditEntrySchema(Schema):
    seq = fields.Integer(required=True, metadata={"description": "Gap-free sequence"})
    time = fields.DateTime(required=True)
    actor = fields.Nested(ActorSchema, required=True)
    project_id = fields.String(allow_none=True)
    action = fields.String(required=True, metadata={"example": "certificate.create"})
    target = fields.String(required=True, metadata={"example": "certificate:crt_0123"})
    details = JsonValue(required=True)
    request_id = fields.String(allow_none=True)
    prev_hash = fields.String(required=True)
    hash = fields.String(required=True)
    hash_alg = fields.String(allow_none=True)


class AuditQueryArgsSchema(PageArgsSchema):
    project_id = fields.String(validate=validate.Length(max=64),
                               metadata={"description": "Admin: only this project"})
    since = fields.AwareDateTime(default_timezone=UTC, metadata={
        "description": "Entries at or after this time. With since or until (and no "
                       "target or actor) a page comes in time order, ties by seq"})
    until = fields.AwareDateTime(default_timezone=UTC,
                                 metadata={"description": "Entries before this time"})
    actor = fields.String(validate=validate.Length(min=1, max=200), metadata={
        "description": "Actor id: a token id (tok_...) or a system actor (worker@host)"})
    action = fields.String(validate=validate.Length(min=1, max=100), metadata={
        "description": "Exact action, or a prefix ending in '.' (e.g. certificate.)"})
    target = fields.String(validate=validate.Length(min=1, max=500),
                           metadata={"example": "certificate:crt_0123456789abcdef"})
    order = fields.String(load_default="desc", validate=validate.OneOf(["asc", "desc"]),
                          metadata={"description": "desc: newest first (highest seq, or latest "
                                                   "time for a time range)"})


AuditPageSchema = page_schema(AuditEntrySchema, "AuditPage")
