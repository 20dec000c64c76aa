from marshmallow import Schema, fields, validate

from app.api.common import PageArgsSchema, page_schema

JOB_STATES = ("queued", "running", "succeeded", "failed", "dead", "cancelled")


class JobSchema(Schema):
    id = fields.String(attribute="_id", required=True)
    kind = fields.String(required=True, metadata={"example": "certificates.issue"})
    state = fields.String(required=True, metadata={"example": "queued"})
    project_id = fields.String(allow_none=True)
    payload = fields.Dict(allow_none=True)
    dedupe_key = fields.String(allow_none=True)
    attempts = fields.Integer(allow_none=True)
    max_attempts = fields.Integer(allow_none=True)
    run_after = fields.DateTime(allow_none=True)
    created_at = fields.DateTime(allow_none=True)
    updated_at = fields.DateTime(allow_none=True)
    started_at = fields.DateTime(allow_none=True)
    finished_at = fields.DateTime(allow_none=True)
    last_error = fields.Raw(allow_none=True, metadata={"description": "Why the last "
                                                                      "attempt failed"})
    result = fields.Raw(allow_none=True)


class JobListArgsSchema(PageArgsSchema):
    project_id = fields.String(validate=validate.Length(max=64))
    state = fields.String(validate=validate.OneOf(JOB_STATES))
    kind = fields.String(validate=validate.Length(min=1, max=100))


JobPageSchema = page_schema(JobSchema, "JobPage")
