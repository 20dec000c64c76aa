"""ACME accounts: thin views over ``app.domain.accounts``."""

from __future__ import annotations

from typing import Any

from flask.views import MethodView

from app import db as dbm
from app.api import idempotency
from app.api.accounts.schemas import (
    AccountCreateSchema,
    AccountListArgsSchema,
    AccountPageSchema,
    AccountSchema,
    AccountUpdateSchema,
)
from app.api.auth import READ, WRITE, scope
from app.api.common import (
    API_PREFIX,
    Blueprint,
    current_db,
    paginate,
    principal,
    required_project,
    scoped_query,
)
from app.domain import accounts
from app.errors import NotFound

blp = Blueprint("acme_accounts", __name__, url_prefix=f"{API_PREFIX}/acme-accounts",
                description="ACME accounts (one per project, CA directory and name).")


def _load(account_id: str) -> dict[str, Any]:
    caller = principal()
    if len(account_id) > 100:
        raise NotFound("ACME account not found")
    return accounts.get_account(current_db(), account_id,
                                project_id=None if caller.is_admin else caller.project_id)


@blp.route("")
class Accounts(MethodView):
    @scope(READ)
    @blp.arguments(AccountListArgsSchema, location="query")
    @blp.response(200, AccountPageSchema)
    def get(self, args: dict[str, Any]) -> dict[str, Any]:
        """List ACME accounts."""
        query = scoped_query(args)
        return paginate(current_db()[dbm.ACME_ACCOUNTS], query, limit=args["limit"],
                        cursor=args["cursor"], projection={"key_id": 0})

    @scope(WRITE)
    @blp.arguments(AccountCreateSchema)
    @blp.response(201, AccountSchema)
    @blp.alt_response(502, response="BadGateway")
    def post(self, data: dict[str, Any]) -> dict[str, Any]:
        """Create an ACME account (new key, sealed) and register it at the CA."""
        project_id = required_project(data.pop("project_id", None))
        register = data.pop("register", True)
        return accounts.create_account(current_db(), project_id, data, principal().actor,
                                       register=register,
                                       request_key=idempotency.current_key())


@blp.route("/<string:account_id>")
class AccountById(MethodView):
    @scope(READ)
    @blp.response(200, AccountSchema)
    def get(self, account_id: str) -> dict[str, Any]:
        """Read an ACME account."""
        return _load(account_id)

    @scope(WRITE)
    @blp.arguments(AccountUpdateSchema)
    @blp.response(200, AccountSchema)
    @blp.alt_response(502, response="BadGateway")
    def patch(self, data: dict[str, Any], account_id: str) -> dict[str, Any]:
        """Change contact emails (also at the CA) or agree to the terms."""
        current = _load(account_id)
        if not data:  # a merge patch that changes nothing (RFC 7396): no write, no audit
            return current
        return accounts.update_account(current_db(), account_id, data, principal().actor,
                                       project_id=current["project_id"])

    @scope(WRITE)
    @blp.response(204)
    def delete(self, account_id: str) -> None:
        """Delete an account no certificate uses (409 otherwise)."""
        current = _load(account_id)
        accounts.delete_account(current_db(), account_id, principal().actor,
                                project_id=current["project_id"])
