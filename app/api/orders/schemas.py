from marshmallow import Schema, fields, validate

from app.api.common import JsonValue, PageArgsSchema, page_schema


class OrderSchema(Schema):
    id = fields.String(attribute="_id", required=True)
    certificate_id = fields.String(required=True)
    project_id = fields.String(required=True)
    account_id = fields.String(allow_none=True)
    directory_url = fields.String(allow_none=True)
    job_id = fields.String(allow_none=True)
    attempt = fields.Integer(allow_none=True)
    reason = fields.String(allow_none=True)
    names = fields.List(fields.String(), allow_none=True)
    key_type = fields.String(allow_none=True)
    challenge = JsonValue(allow_none=True)
    profile = fields.String(allow_none=True)
    replaces = fields.String(allow_none=True)
    state = fields.String(required=True)
    order_url = fields.String(allow_none=True)
    finalize_url = fields.String(allow_none=True)
    certificate_url = fields.String(allow_none=True)
    authorizations = JsonValue(allow_none=True)
    expires = JsonValue(allow_none=True)
    error = JsonValue(allow_none=True)
    history = JsonValue(allow_none=True)
    created_at = fields.DateTime(allow_none=True)
    updated_at = fields.DateTime(allow_none=True)
    started_at = fields.DateTime(allow_none=True)
    completed_at = fields.DateTime(allow_none=True)


class OrderListArgsSchema(PageArgsSchema):
    project_id = fields.String(validate=validate.Length(max=64))
    certificate_id = fields.String(validate=validate.Length(min=1, max=100))
    state = fields.String(validate=validate.Length(min=1, max=32))


OrderPageSchema = page_schema(OrderSchema, "OrderPage")
