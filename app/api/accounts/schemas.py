from marshmallow import Schema, fields, validate

from app.api.common import JsonValue, PageArgsSchema, page_schema
from app.domain.accounts import ACCOUNT_NAME_PATTERN, EMAIL_PATTERN


class EabSchema(Schema):
    kid = fields.String(required=True, validate=validate.Length(min=1, max=500))
    hmac_key = fields.String(required=True, validate=validate.Length(min=16, max=1024),
                             load_only=True, metadata={
                                 "description": "base64url HMAC key; used once to "
                                                "register, never stored or shown"})


class AccountSchema(Schema):
    id = fields.String(attribute="_id", required=True,
                       metadata={"example": "acc_0123456789abcdef"})
    project_id = fields.String(required=True)
    name = fields.String(required=True)
    directory_url = fields.String(required=True)
    contact = fields.List(fields.String(), required=True)
    terms_agreed = fields.Boolean(required=True)
    eab_kid = fields.String(allow_none=True)
    account_url = fields.String(allow_none=True)
    key_type = fields.String(allow_none=True)
    status = fields.String(required=True, metadata={"example": "registered"})
    created_at = fields.DateTime(allow_none=True)
    updated_at = fields.DateTime(allow_none=True)
    registered_at = fields.DateTime(allow_none=True)
    last_error = JsonValue(allow_none=True)


# An email address, optionally as a mailto: URI; at most 254 characters (RFC 5321).
def contact_field() -> fields.String:
    return fields.String(validate=[validate.Length(min=3, max=254),
                                   validate.Regexp("^(?:mailto:)?" + EMAIL_PATTERN[1:])])


class AccountCreateSchema(Schema):
    project_id = fields.String(load_default=None, validate=validate.Length(max=64),
                               metadata={"description": "Required for admin tokens"})
    name = fields.String(validate=validate.Regexp(ACCOUNT_NAME_PATTERN),
                         metadata={"example": "default"})
    directory_url = fields.String(validate=[validate.Length(min=9, max=2000),
                                            validate.Regexp(r"^https://[\x21-\x7e]+$")], metadata={
        "description": "https:// URL of the CA's ACME directory (default: "
                       "CAP_ACME_DIRECTORY_URL)"})
    contact = fields.List(contact_field(), validate=validate.Length(max=10),
                          metadata={"example": ["ops@example.com"]})
    terms_agreed = fields.Boolean(metadata={"description": "You agree to the CA's terms"})
    eab = fields.Nested(EabSchema, metadata={"description": "External Account Binding"})
    register = fields.Boolean(load_default=True, metadata={
        "description": "Register at the CA now (else at the first issuance; an EAB key "
                       "is only usable now)"})


class AccountUpdateSchema(Schema):
    contact = fields.List(contact_field(), validate=validate.Length(max=10))
    terms_agreed = fields.Boolean(validate=validate.Equal(True), metadata={
        "description": "Agree to the CA's terms (once agreed, they cannot be withdrawn)"})


class AccountListArgsSchema(PageArgsSchema):
    project_id = fields.String(validate=validate.Length(max=64))


AccountPageSchema = page_schema(AccountSchema, "AccountPage")
