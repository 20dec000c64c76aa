from typing import Any

from marshmallow import Schema, ValidationError, fields, validate, validates_schema

from app.api.common import JsonValue

# Some character Python's str.strip() keeps (spelled out: ECMA's \S and Python's differ).
NOT_BLANK = ("^[\\s\\S]*?[^\\t\\n\\v\\f\\r\\x1c-\\x1f \\x85\\xa0\\u1680\\u2000-\\u200a"
             "\\u2028\\u2029\\u202f\\u205f\\u3000]")
# A serial as hex (optionally 0x) or colon-separated bytes, at most 32 bytes.
SERIAL_PATTERN = "^(?:0[xX])?[0-9A-Fa-f]{1,64}$|^[0-9A-Fa-f]{2}(?::[0-9A-Fa-f]{2}){0,31}$"


class RenewalBatchCreateSchema(Schema):
    class Meta:
        # At least one selection; 'all' stands alone (a 409 when nothing matches now).
        openapi_extra = {"minProperties": 1,
                         "not": {"required": ["all"], "minProperties": 2}}

    all = fields.Boolean(validate=validate.OneOf([True]), metadata={
        "description": "Every live issued certificate in scope (true; alone)"})
    issuer = fields.String(validate=[validate.Length(min=1, max=500),
                                     validate.Regexp(NOT_BLANK)], metadata={
        "description": "Part of the issuer's name (case-insensitive), e.g. 'R11'"})
    project_id = fields.String(validate=validate.Length(min=1, max=64))
    expiring_before = fields.AwareDateTime(metadata={
        "description": "Certificates whose notAfter is before this time"})
    serials = fields.List(fields.String(validate=[validate.Length(min=1, max=200),
                                                  validate.Regexp(SERIAL_PATTERN)]),
                          validate=validate.Length(min=1, max=100000), metadata={
                              "description": "Serials (hex) from a CA's revocation notice"})

    @validates_schema
    def one_selection(self, data: dict[str, Any], **kwargs: Any) -> None:
        """The same rules as the schema's minProperties and not (marshmallow cannot state
        them as keywords)."""
        if not data:
            raise ValidationError("say which certificates to renew: all, issuer, "
                                  "project_id, expiring_before or serials")
        if "all" in data and len(data) > 1:
            raise ValidationError("'all' cannot be combined with another selection")


class RenewalCountsSchema(Schema):
    total = fields.Integer(required=True)
    queued = fields.Integer(required=True, metadata={"description": "Queued or running"})
    running = fields.Integer(required=True)
    done = fields.Integer(required=True)
    failed = fields.Integer(required=True)
    cancelled = fields.Integer(required=True)


class RenewalBatchSchema(Schema):
    id = fields.String(attribute="_id", required=True)
    project_id = fields.String(allow_none=True)
    selector = JsonValue(required=True)
    reason = fields.String(required=True)
    state = fields.String(required=True, metadata={"description": "active or cancelled"})
    finished = fields.Boolean(required=True)
    counts = fields.Nested(RenewalCountsSchema, required=True)
    certificates = fields.List(fields.String(), required=True)
    unmatched_serials = fields.List(fields.String())
    created_at = fields.DateTime(allow_none=True)
    created_by = fields.String(allow_none=True)
    cancelled_at = fields.DateTime(allow_none=True)
