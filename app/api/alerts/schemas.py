from marshmallow import Schema, fields, validate

from app.api.common import JsonValue, PageArgsSchema, page_schema
from app.ops.alerts.channels import FORMATS
from app.ops.alerts.engine import RULES


class ChannelCreateSchema(Schema):
    project_id = fields.String(load_default=None, validate=validate.Length(max=64),
                               metadata={"description": "Admin: the project (or global)"})
    global_ = fields.Boolean(data_key="global", load_default=False, metadata={
        "description": "Admin only: a global channel (receives every alert, including "
                       "those about the service itself)"})
    name = fields.String(required=True, validate=validate.Length(min=1, max=64),
                         metadata={"example": "ops-slack"})
    url = fields.String(required=True, validate=validate.Length(min=1, max=2000), metadata={
        "description": "https://... (webhook; sealed, never shown again), smtp://[user@]"
                       "host[:587] (STARTTLS) or smtps://[user@]host[:465] (TLS)"})
    format = fields.String(validate=validate.OneOf(FORMATS),
                           metadata={"description": "Webhook body: generic (default) or "
                                                    "slack"})
    secret = fields.String(validate=validate.Length(min=16, max=512), load_only=True,
                           metadata={"description": "Webhook signing secret (sealed)"})
    secret_env = fields.String(validate=validate.Length(min=1, max=128), metadata={
        "description": "Or: the CAP_ALERT_* variable holding the signing secret"})
    password_env = fields.String(validate=validate.Length(min=1, max=128), metadata={
        "description": "SMTP: the CAP_ALERT_* variable holding the password"})
    from_ = fields.String(data_key="from", validate=validate.Length(min=3, max=320))
    to = fields.List(fields.String(validate=validate.Length(min=3, max=320)),
                     validate=validate.Length(min=1, max=20))
    allow_http = fields.Boolean(metadata={"description": "Allow an http:// webhook"})
    ca_file = fields.String(validate=validate.Length(min=1, max=1000), metadata={
        "description": "PEM of CAs to trust (path on the api and worker pods)"})
    rules = fields.List(fields.String(validate=validate.OneOf(RULES)),
                        validate=validate.Length(min=1))
    enabled = fields.Boolean()


class ChannelSchema(Schema):
    id = fields.String(required=True)
    project_id = fields.String(allow_none=True)
    global_ = fields.Boolean(data_key="global", attribute="global")
    name = fields.String(required=True)
    type = fields.String(required=True, metadata={"description": "webhook or smtp"})
    target = fields.String(required=True, metadata={
        "description": "Where it goes, without secrets (webhook: scheme://host/…)"})
    format = fields.String(allow_none=True)
    signed = fields.Boolean(allow_none=True)
    secret_env = fields.String(allow_none=True)
    tls = fields.String(allow_none=True)
    password_env = fields.String(allow_none=True)
    sender = fields.String(allow_none=True, data_key="from")
    to = fields.List(fields.String(), allow_none=True)
    allow_http = fields.Boolean()
    ca_file = fields.String(allow_none=True)
    rules = fields.List(fields.String(), allow_none=True)
    enabled = fields.Boolean()
    created_at = fields.DateTime(allow_none=True)
    last_success_at = fields.DateTime(allow_none=True)
    failure = JsonValue(allow_none=True, metadata={"description": "count, last_error, since"})


class ChannelListArgsSchema(PageArgsSchema):
    project_id = fields.String(validate=validate.Length(max=64))


class TestSentSchema(Schema):
    channel = fields.String(required=True)
    target = fields.String(required=True)
    sent = fields.Boolean(required=True)


class AlertSchema(Schema):
    id = fields.String(attribute="_id", required=True)
    rule = fields.String(required=True)
    threshold = fields.String(allow_none=True)
    subject = fields.String(required=True)
    project_id = fields.String(allow_none=True)
    state = fields.String(required=True)
    summary = fields.String(required=True)
    details = JsonValue(allow_none=True)
    opened_at = fields.DateTime(allow_none=True)
    resolved_at = fields.DateTime(allow_none=True)


class AlertListArgsSchema(PageArgsSchema):
    project_id = fields.String(validate=validate.Length(max=64))
    state = fields.String(load_default="open", validate=validate.OneOf(["open", "resolved",
                                                                         "all"]))
    rule = fields.String(validate=validate.OneOf(RULES))


ChannelPageSchema = page_schema(ChannelSchema, "AlertChannelPage")
AlertPageSchema = page_schema(AlertSchema, "AlertPage")
