"""Helpers for API tests: an app on the test database, and tokens made the way an
operator makes them (the domain functions the CLI calls)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from app.audit import system_actor
from app.domain import projects, tokens

API = "/api/v1"


@dataclass
class Tok:
    id: str
    token: str
    project_id: str | None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def make_admin(db: Any) -> Tok:
    doc, plaintext = tokens.create_token(db, project_id=None, scopes=["admin"],
                                         actor=system_actor("cli"), name="test-admin")
    return Tok(doc["_id"], plaintext, None)


def make_project(db: Any, name: str) -> str:
    return projects.create_project(db, name=name, actor=system_actor("cli"))["_id"]


def make_token(db: Any, project_id: str, scopes: list[str], name: str = "t") -> Tok:
    doc, plaintext = tokens.create_token(db, project_id=project_id, scopes=scopes,
                                         actor=system_actor("cli"), name=name)
    return Tok(doc["_id"], plaintext, project_id)
