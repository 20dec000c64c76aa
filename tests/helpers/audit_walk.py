"""Helpers for tests that hold the line of invariant 4: every mutating API route and CLI
command writes exactly one audit entry per mutation.

A test lists every route (``mutating_routes``) and command (``cli_commands``) in a table
that says, for each, either how to run it and which audit actions it must write, or why
it changes nothing a user relies on; anything not in the table fails the test, so a new
route or command cannot arrive unaudited by accident. ``AuditProbe`` counts what one
call wrote.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import click
from pymongo.database import Database

from app import db as dbm

Doc = dict[str, Any]

MUTATING_METHODS = ("POST", "PUT", "PATCH", "DELETE")


def mutating_routes(app: Any) -> list[str]:
    """``"METHOD /rule"`` for every route of the Flask app that accepts a method that can
    change state (POST, PUT, PATCH, DELETE), sorted."""
    found = set()
    for rule in app.url_map.iter_rules():
        for method in sorted((rule.methods or set()) & set(MUTATING_METHODS)):
            found.add(f"{method} {rule.rule}")
    return sorted(found)


def cli_commands(group: click.Group, prefix: tuple[str, ...] = ()) -> list[str]:
    """Every runnable command under ``group``, as its path (``"jobs retry"``), sorted."""
    found: list[str] = []
    for name, command in group.commands.items():
        path = (*prefix, name)
        if isinstance(command, click.Group):
            found.extend(cli_commands(command, path))
        else:
            found.append(" ".join(path))
    return sorted(found)


def unclassified(found: Iterable[str], table: Mapping[str, Any]) -> list[str]:
    return sorted(set(found) - set(table))


def stale(found: Iterable[str], table: Mapping[str, Any]) -> list[str]:
    return sorted(set(table) - set(found))


class AuditProbe:
    """What a piece of code wrote to the audit log: ``with AuditProbe(db) as probe:``
    then ``probe.entries`` (in seq order) and ``probe.actions``."""

    def __init__(self, db: Database[Doc]) -> None:
        self.db = dbm.primary(db)
        self.before = 0
        self.entries: list[Doc] = []

    def __enter__(self) -> AuditProbe:
        head = self.db[dbm.COUNTERS].find_one({"_id": "audit"}) or {}
        self.before = int(head.get("seq", 0))
        return self

    def __exit__(self, *exc: object) -> None:
        self.entries = list(self.db[dbm.AUDIT].find({"seq": {"$gt": self.before}})
                            .sort("seq", 1))

    @property
    def actions(self) -> list[str]:
        return [str(e.get("action")) for e in self.entries]
