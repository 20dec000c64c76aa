"""API tokens. A token is shown once, at creation; tokens of a project are visible to
that project's tokens; a token never grants more than its creator holds."""

from typing import Any

from flask import g
from flask.views import MethodView

from app import db as dbm
from app.api import idempotency
from app.api.auth import READ, WRITE, scope
from app.api.common import (
    API_PREFIX,
    Blueprint,
    current_db,
    ensure_visible,
    paginate,
    principal,
    required_project,
    scoped_query,
)
from app.api.tokens.schemas import (
    DEFAULT_SCOPES,
    CreatedTokenSchema,
    TokenCreateSchema,
    TokenListArgsSchema,
    TokenPageSchema,
    TokenSchema,
)
from app.domain import tokens
from app.errors import Forbidden, NotFound

blp = Blueprint("tokens", __name__, url_prefix=f"{API_PREFIX}/tokens",
                description="API tokens: 256 random bits, stored as a hash, shown once.")


@blp.route("")
class Tokens(MethodView):
    @scope(READ)
    @blp.arguments(TokenListArgsSchema, location="query")
    @blp.response(200, TokenPageSchema)
    def get(self, args: dict[str, Any]) -> dict[str, Any]:
        """List tokens (metadata only, never the token itself)."""
        query = scoped_query(args)
        if not args["include_revoked"]:
            query["revoked_at"] = None
        return paginate(current_db()[dbm.API_TOKENS], query, limit=args["limit"],
                        cursor=args["cursor"], projection={"token_hash": 0, "request_key": 0})

    @scope(WRITE)
    @blp.arguments(TokenCreateSchema)
    @blp.response(201, CreatedTokenSchema)
    def post(self, data: dict[str, Any]) -> dict[str, Any]:
        """Create a token; the answer holds it once (store it now)."""
        caller = principal()
        if data["admin"]:
            if not caller.is_admin:
                raise Forbidden("only an admin token can create admin tokens")
            project_id, scopes = None, [tokens.ADMIN]
        else:
            project_id = required_project(data["project_id"])
            scopes = data["scopes"] or list(DEFAULT_SCOPES)
        tokens.check_grant(caller, project_id, scopes)
        db = current_db()
        retaken = idempotency.retaken_key()
        if retaken is not None:
            tokens.revoke_made_under(db, retaken, project_id=project_id, actor=caller.actor)
        doc, plaintext = tokens.create_token(
            db, project_id=project_id, scopes=scopes, actor=caller.actor,
            name=data["name"], expires_in_days=data["expires_in_days"],
            request_key=idempotency.current_key())
        # An idempotent replay of this answer must not come from a stored plaintext.
        g.idempotency_redact = {"token": "(shown only in the first answer)"}
        return {**doc, "token": plaintext}


@blp.route("/<string:token_id>")
class TokenById(MethodView):
    @scope(READ)
    @blp.response(200, TokenSchema)
    def get(self, token_id: str) -> dict[str, Any]:
        """Read a token's metadata."""
        return ensure_visible(_get(token_id), "token", token_id)

    @scope(WRITE)
    @blp.response(204)
    def delete(self, token_id: str) -> None:
        """Revoke a token (takes effect on every replica within 5 seconds)."""
        ensure_visible(_get(token_id), "token", token_id)
        tokens.revoke_token(current_db(), token_id, actor=principal().actor)


def _get(token_id: str) -> dict[str, Any] | None:
    try:
        return tokens.get_token(current_db(), token_id)
    except NotFound:
        return None
