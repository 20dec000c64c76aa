from marshmallow import Schema, fields, validate, validates_schema
from marshmallow.exceptions import ValidationError

from app.api.common import PageArgsSchema, page_schema
from app.api.projects.schemas import ActorSchema
from app.domain.tokens import MAX_EXPIRY_DAYS, NAME_RE, PROJECT_SCOPES, SCOPES


class TokenSchema(Schema):
    id = fields.String(attribute="_id", required=True,
                       metadata={"example": "tok_0123456789abcdef"})
    name = fields.String(required=True)
    hint = fields.String(required=True, metadata={
        "description": "The first characters of the token, to recognise it"})
    project_id = fields.String(required=True, allow_none=True,
                               metadata={"description": "null for admin tokens"})
    scopes = fields.List(fields.String(validate=validate.OneOf(SCOPES)), required=True)
    created_at = fields.DateTime(required=True)
    created_by = fields.Nested(ActorSchema, required=True)
    expires_at = fields.DateTime(required=True, allow_none=True)
    revoked_at = fields.DateTime(required=True, allow_none=True)
    last_used_at = fields.DateTime(required=True, allow_none=True)


class CreatedTokenSchema(TokenSchema):
    token = fields.String(required=True, metadata={
        "description": "The token itself. Shown in this answer only: it is stored as a "
                       "hash and cannot be read again."})


# A project token created without scopes can read only: the least it can be useful with.
DEFAULT_SCOPES = ("read",)


class TokenCreateSchema(Schema):
    class Meta:
        # An admin token belongs to no project: admin true with a project_id is refused.
        openapi_extra = {"not": {"required": ["admin", "project_id"], "properties": {
            "admin": {"enum": [True]}, "project_id": {"type": "string"}}}}

    name = fields.String(load_default="", validate=validate.Regexp(NAME_RE.pattern + "|^$"))
    scopes = fields.List(fields.String(validate=validate.OneOf(PROJECT_SCOPES)),
                         load_default=None, validate=validate.Length(min=1, max=3),
                         metadata={"description": "Among read, write, keys:export "
                                                  "(default: read; ignored for admin "
                                                  "tokens)"})
    project_id = fields.String(load_default=None, validate=validate.Length(max=64),
                               metadata={"description": "The project (admin callers); a "
                                                        "project token creates tokens of "
                                                        "its own project"})
    admin = fields.Boolean(load_default=False, metadata={
        "description": "Create an admin token (no project, scope admin; admin callers)"})
    expires_in_days = fields.Integer(load_default=None,
                                     validate=validate.Range(min=1, max=MAX_EXPIRY_DAYS))

    @validates_schema
    def _shape(self, data: dict, **kwargs: object) -> None:
        if data.get("admin") and data.get("project_id"):
            raise ValidationError("an admin token belongs to no project", "project_id")


class TokenListArgsSchema(PageArgsSchema):
    project_id = fields.String(validate=validate.Length(max=64),
                               metadata={"description": "Only this project's tokens"})
    include_revoked = fields.Boolean(load_default=False)


TokenPageSchema = page_schema(TokenSchema, "TokenPage")
