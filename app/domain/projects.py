"""Projects: the tenants. Every certificate, account, order, key and token (except admin
tokens) belongs to exactly one project, referred to elsewhere by ``project_id: str``.

A project is created by an admin (API or ``certautopilot projects create``) and deleted
only when it owns nothing any more; its tokens are revoked with it.
"""

from __future__ import annotations

import re
import secrets
from datetime import UTC, datetime
from typing import Any

from pymongo.client_session import ClientSession
from pymongo.database import Database
from pymongo.errors import DuplicateKeyError

from app import db as dbm
from app.audit import Actor, record
from app.db import Doc
from app.domain import tokencache
from app.errors import Conflict, NotFound, ValidationFailed

# A DNS-label-like name: easy to put in URLs, metric labels and CLI arguments.
NAME_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
ID_RE = re.compile(r"^prj_[0-9a-f]{16}$")
MAX_DESCRIPTION = 1000


def new_project_id() -> str:
    return "prj_" + secrets.token_hex(8)


def now_ms() -> datetime:
    """Now, UTC, truncated to milliseconds (what BSON keeps)."""
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def validate_name(name: Any) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ValidationFailed(
            "invalid project name: use 1-63 lowercase letters, digits and '-', starting "
            "and ending with a letter or digit",
            errors={"name": ["must match " + NAME_RE.pattern]})
    return name


def validate_description(description: Any) -> str:
    if description is None:
        return ""
    if not isinstance(description, str) or len(description) > MAX_DESCRIPTION:
        raise ValidationFailed(f"description must be text of at most {MAX_DESCRIPTION} "
                               "characters", errors={"description": ["too long"]})
    return description


def create_project(db: Database[Doc], *, name: str, actor: Actor,
                   description: str | None = None, request_key: str | None = None) -> Doc:
    """Create a project; a taken name is a Conflict, except for the project this
    ``request_key`` (an API request's idempotency reservation) already created: a retry
    that took over the key of a request whose process died after its commit gets that
    project, as the first answer would have said."""
    name = validate_name(name)
    doc: Doc = {
        "_id": new_project_id(),
        "name": name,
        "description": validate_description(description),
        "created_at": now_ms(),
        "updated_at": now_ms(),
        "created_by": actor.as_doc(),
    }
    if request_key is not None:
        doc["request_key"] = request_key

    def write(session: ClientSession) -> Doc:
        db[dbm.PROJECTS].insert_one(doc, session=session)
        record(db, session, actor=actor, action="project.create",
               target=f"project:{doc['_id']}", project_id=doc["_id"],
               details={"name": name})
        return doc

    try:
        return dbm.transaction(db, write, what="create project")
    except DuplicateKeyError:
        if request_key is not None:
            made = dbm.retry(lambda: db[dbm.PROJECTS].find_one(
                {"name": name, "request_key": request_key}), what="read project")
            if made is not None:
                return made
        raise Conflict(f"a project named {name!r} already exists",
                       errors={"name": ["already exists"]}) from None


def get_project(db: Database[Doc], project_id: str) -> Doc:
    if not isinstance(project_id, str) or not ID_RE.match(project_id):
        raise NotFound(f"project {project_id!r} not found")
    doc = dbm.retry(lambda: db[dbm.PROJECTS].find_one({"_id": project_id}),
                    what="read project")
    if doc is None:
        raise NotFound(f"project {project_id!r} not found")
    return doc


def find_project(db: Database[Doc], id_or_name: str) -> Doc:
    """A project by id or by name (for the CLI)."""
    if ID_RE.match(id_or_name):
        return get_project(db, id_or_name)
    doc = dbm.retry(lambda: db[dbm.PROJECTS].find_one({"name": id_or_name}),
                    what="read project")
    if doc is None:
        raise NotFound(f"project {id_or_name!r} not found")
    return doc


def update_project(db: Database[Doc], project_id: str, *, actor: Actor,
                   description: str | None = None) -> Doc:
    """Change a project's description (its name and id are permanent)."""
    get_project(db, project_id)
    changes: Doc = {}
    if description is not None:
        changes["description"] = validate_description(description)

    def write(session: ClientSession) -> Doc:
        doc = db[dbm.PROJECTS].find_one({"_id": project_id}, session=session)
        if doc is None:
            raise NotFound(f"project {project_id!r} not found")
        if not changes:
            return doc
        changes["updated_at"] = now_ms()
        db[dbm.PROJECTS].update_one({"_id": project_id}, {"$set": changes}, session=session)
        record(db, session, actor=actor, action="project.update",
               target=f"project:{project_id}", project_id=project_id,
               details={"fields": sorted(k for k in changes if k != "updated_at")})
        doc.update(changes)
        return doc

    return dbm.transaction(db, write, what="update project")


def delete_project(db: Database[Doc], project_id: str, *, actor: Actor) -> None:
    """Delete an empty project and revoke its tokens; Conflict while it owns certificates
    or ACME accounts (delete those first)."""
    get_project(db, project_id)

    def write(session: ClientSession) -> None:
        if db[dbm.PROJECTS].find_one({"_id": project_id}, session=session) is None:
            raise NotFound(f"project {project_id!r} not found")
        owned = {
            "certificates": db[dbm.CERTIFICATES].count_documents(
                {"project_id": project_id, "deleted_at": None}, session=session),
            "acme_accounts": db[dbm.ACME_ACCOUNTS].count_documents(
                {"project_id": project_id, "deleted_at": None}, session=session),
        }
        if any(owned.values()):
            raise Conflict(f"project {project_id!r} still owns "
                           + ", ".join(f"{n} {k}" for k, n in owned.items() if n)
                           + "; delete them first", errors={"owned": owned})
        now = now_ms()
        revoked = db[dbm.API_TOKENS].update_many(
            {"project_id": project_id, "revoked_at": None},
            {"$set": {"revoked_at": now, "revoked_by": actor.as_doc()}},
            session=session).modified_count
        db[dbm.PROJECTS].delete_one({"_id": project_id}, session=session)
        record(db, session, actor=actor, action="project.delete",
               target=f"project:{project_id}", project_id=project_id,
               details={"tokens_revoked": revoked})

    dbm.transaction(db, write, what="delete project")
    tokencache.forget_project(project_id)
