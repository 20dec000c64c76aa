from marshmallow import Schema, fields, validate

from app.api.common import PageArgsSchema, page_schema
from app.domain.projects import MAX_DESCRIPTION, NAME_RE


class ActorSchema(Schema):
    kind = fields.String(required=True, metadata={"example": "token"})
    id = fields.String(required=True)


class ProjectSchema(Schema):
    id = fields.String(attribute="_id", required=True, metadata={"example": "prj_0123456789abcdef"})
    name = fields.String(required=True, metadata={"example": "payments"})
    description = fields.String(required=True)
    created_at = fields.DateTime(required=True)
    updated_at = fields.DateTime(required=True)
    created_by = fields.Nested(ActorSchema, required=True)


class ProjectCreateSchema(Schema):
    name = fields.String(required=True, validate=validate.Regexp(NAME_RE), metadata={
        "description": "1-63 lowercase letters, digits and '-'", "example": "payments"})
    description = fields.String(load_default="", validate=validate.Length(max=MAX_DESCRIPTION))


class ProjectUpdateSchema(Schema):
    description = fields.String(required=True, validate=validate.Length(max=MAX_DESCRIPTION))


class ProjectListArgsSchema(PageArgsSchema):
    name = fields.String(validate=validate.Length(min=1, max=63),
                         metadata={"description": "Exact project name"})


ProjectPageSchema = page_schema(ProjectSchema, "ProjectPage")
