from marshmallow import Schema, fields, validate

from app.api.common import JsonValue


class RenewalBatchCreateSchema(Schema):
    all = fields.Boolean(metadata={"description": "Every live issued certificate in scope"})
    issuer = fields.String(validate=validate.Length(min=1, max=500), metadata={
        "description": "Part of the issuer's name (case-insensitive), e.g. 'R11'"})
    project_id = fields.String(validate=validate.Length(min=1, max=64))
    expiring_before = fields.AwareDateTime(metadata={
        "description": "Certificates whose notAfter is before this time"})
    serials = fields.List(fields.String(validate=validate.Length(min=1, max=200)),
                          validate=validate.Length(min=1, max=100000), metadata={
                              "description": "Serials (hex) from a CA's revocation notice"})


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
