"""Projects: list and read (own project, or all for admins); create and delete (admin)."""

from typing import Any

from flask.views import MethodView

from app import db as dbm
from app.api import idempotency
from app.api.auth import ADMIN, READ, WRITE, scope
from app.api.common import API_PREFIX, Blueprint, current_db, ensure_visible, paginate, principal
from app.api.projects.schemas import (
    ProjectCreateSchema,
    ProjectListArgsSchema,
    ProjectPageSchema,
    ProjectSchema,
    ProjectUpdateSchema,
)
from app.domain import projects

blp = Blueprint("projects", __name__, url_prefix=f"{API_PREFIX}/projects",
                description="Projects (tenants). Admin tokens manage them; a project "
                            "token sees only its own.")


@blp.route("")
class Projects(MethodView):
    @scope(READ)
    @blp.arguments(ProjectListArgsSchema, location="query")
    @blp.response(200, ProjectPageSchema)
    def get(self, args: dict[str, Any]) -> dict[str, Any]:
        """List projects (admin: all; project token: its own)."""
        caller = principal()
        query: dict[str, Any] = {} if caller.is_admin else {"_id": caller.project_id}
        if args.get("name"):
            query["name"] = args["name"]
        return paginate(current_db()[dbm.PROJECTS], query, limit=args["limit"],
                        cursor=args["cursor"])

    @scope(ADMIN)
    @blp.arguments(ProjectCreateSchema)
    @blp.response(201, ProjectSchema)
    def post(self, data: dict[str, Any]) -> dict[str, Any]:
        """Create a project (admin)."""
        return projects.create_project(current_db(), name=data["name"],
                                       description=data.get("description"),
                                       actor=principal().actor,
                                       request_key=idempotency.current_key())


@blp.route("/<string:project_id>")
class ProjectById(MethodView):
    @scope(READ)
    @blp.response(200, ProjectSchema)
    def get(self, project_id: str) -> dict[str, Any]:
        """Read a project."""
        return ensure_visible(_get(project_id), "project", project_id, "_id")

    @scope(WRITE)
    @blp.arguments(ProjectUpdateSchema)
    @blp.response(200, ProjectSchema)
    def patch(self, data: dict[str, Any], project_id: str) -> dict[str, Any]:
        """Change a project's description."""
        ensure_visible(_get(project_id), "project", project_id, "_id")
        return projects.update_project(current_db(), project_id, actor=principal().actor,
                                       description=data["description"])

    @scope(ADMIN)
    @blp.response(204)
    def delete(self, project_id: str) -> None:
        """Delete an empty project and revoke its tokens (admin; 409 while it owns
        certificates or ACME accounts)."""
        projects.delete_project(current_db(), project_id, actor=principal().actor)


def _get(project_id: str) -> dict[str, Any] | None:
    from app.errors import NotFound

    try:
        return projects.get_project(current_db(), project_id)
    except NotFound:
        return None
