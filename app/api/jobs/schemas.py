from marshmallow import Schema, fields, validate

from app.api.common import JsonValue, PageArgsSchema, page_schema

JOB_STATES = ("queued", "running", "succeeded", "dead", "cancelled")


class JobLeaseSchema(Schema):
    owner = fields.String(allow_none=True, metadata={"description": "The worker holding it"})
    expires_at = fields.DateTime(allow_none=True)
    claimed_at = fields.DateTime(allow_none=True)


class JobSchema(Schema):
    id = fields.String(attribute="_id", required=True)
    kind = fields.String(required=True, metadata={"example": "certificates.issue"})
    state = fields.String(required=True, metadata={"example": "queued"})
    project_id = fields.String(allow_none=True)
    payload = JsonValue(allow_none=True)
    dedupe_key = fields.String(allow_none=True)
    attempts = fields.Integer(allow_none=True)
    max_attempts = fields.Integer(allow_none=True)
    run_after = fields.DateTime(allow_none=True)
    created_at = fields.DateTime(allow_none=True)
    updated_at = fields.DateTime(allow_none=True)
    started_at = fields.DateTime(allow_none=True)
    finished_at = fields.DateTime(allow_none=True)
    last_error = JsonValue(allow_none=True, metadata={"description": "Why the last "
                                                                      "attempt failed"})
    result = JsonValue(allow_none=True)
    lease = fields.Nested(JobLeaseSchema, allow_none=True,
                          metadata={"description": "Current or last claim (no token)"})
    history = fields.List(JsonValue(), metadata={"description": "Last transitions"})


class CancelSchema(Schema):
    reason = fields.String(load_default="", validate=validate.Length(max=500))


class JobListArgsSchema(PageArgsSchema):
    project_id = fields.String(validate=validate.Length(max=64))
    state = fields.String(validate=validate.OneOf(JOB_STATES))
    kind = fields.String(validate=validate.Length(min=1, max=100))


JobPageSchema = page_schema(JobSchema, "JobPage")
