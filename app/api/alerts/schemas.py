from typing import Any

from marshmallow import Schema, fields, validate

from app.api.common import JsonValue, PageArgsSchema, page_schema
from app.ops.alerts.channels import (
    EMAIL_PATTERN,
    ENV_PATTERN,
    FORMATS,
    HTTP_URL_PATTERN,
    HTTPS_URL_PATTERN,
    NAME_PATTERN,
    SMTP_ONLY,
    SMTP_URL_PATTERN,
    SMTP_USER_URL_PATTERN,
    WEBHOOK_ONLY,
)
from app.ops.alerts.engine import RULES


def _without(*names: str) -> list[dict[str, Any]]:
    return [{"not": {"required": [name]}} for name in names]


# A webhook takes no SMTP field and at most one of secret and secret_env.
_WEBHOOK_RULES = [*_without(*SMTP_ONLY), {"not": {"required": ["secret", "secret_env"]}}]


class ChannelCreateSchema(Schema):
    class Meta:
        # The form of the URL decides which other fields go with it (one branch each);
        # a global channel names no project. The server refuses the same (409 only for
        # a named CAP_ALERT_* variable or ca_file this server lacks).
        openapi_extra = {
            "oneOf": [
                {"properties": {"url": {"pattern": HTTPS_URL_PATTERN}},
                 "allOf": _WEBHOOK_RULES},
                {"properties": {"url": {"pattern": HTTP_URL_PATTERN},
                                "allow_http": {"enum": [True]}},
                 "required": ["allow_http"], "allOf": _WEBHOOK_RULES},
                {"properties": {"url": {"pattern": SMTP_URL_PATTERN}}, "required": ["to"],
                 "allOf": _without(*WEBHOOK_ONLY, "password_env")},
                {"properties": {"url": {"pattern": SMTP_USER_URL_PATTERN}},
                 "required": ["to", "password_env"], "allOf": _without(*WEBHOOK_ONLY)},
            ],
            "not": {"required": ["global", "project_id"], "properties": {
                "global": {"enum": [True]}, "project_id": {"type": "string", "minLength": 1}}},
        }

    project_id = fields.String(load_default=None, validate=validate.Length(max=64),
                               metadata={"description": "Admin: the project (or global)"})
    global_ = fields.Boolean(data_key="global", load_default=False, metadata={
        "description": "Admin only: a global channel (receives every alert, including "
                       "those about the service itself)"})
    name = fields.String(required=True, validate=[validate.Length(min=1, max=64),
                                                  validate.Regexp(NAME_PATTERN)],
                         metadata={"example": "ops-slack"})
    url = fields.String(required=True, validate=validate.Length(min=1, max=2000), metadata={
        "description": "https://host[:port][/path] (webhook; sealed, never shown again; "
                       "http:// with allow_http), smtp://[user@]host[:587] (STARTTLS) or "
                       "smtps://[user@]host[:465] (TLS); a host is a DNS name or an IPv4 "
                       "address"})
    format = fields.String(validate=validate.OneOf(FORMATS),
                           metadata={"description": "Webhook body: generic (default) or "
                                                    "slack"})
    secret = fields.String(validate=validate.Length(min=16, max=512), load_only=True,
                           metadata={"description": "Webhook signing secret (sealed)"})
    secret_env = fields.String(validate=[validate.Length(min=1, max=128),
                                         validate.Regexp(ENV_PATTERN)], metadata={
        "description": "Or: the CAP_ALERT_* variable holding the signing secret (409 "
                       "when it is not set on this server)"})
    password_env = fields.String(validate=[validate.Length(min=1, max=128),
                                           validate.Regexp(ENV_PATTERN)], metadata={
        "description": "SMTP with a user in the URL: the CAP_ALERT_* variable holding the "
                       "password (409 when it is not set on this server)"})
    from_ = fields.String(data_key="from", validate=[validate.Length(min=3, max=320),
                                                     validate.Regexp(EMAIL_PATTERN)])
    to = fields.List(fields.String(validate=[validate.Length(min=3, max=320),
                                             validate.Regexp(EMAIL_PATTERN)]),
                     validate=validate.Length(min=1, max=20))
    allow_http = fields.Boolean(metadata={"description": "Allow an http:// webhook"})
    ca_file = fields.String(validate=validate.Length(min=1, max=1000), metadata={
        "description": "PEM of CAs to trust (path on the api and worker pods; 409 when "
                       "this server has no such file)"})
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
