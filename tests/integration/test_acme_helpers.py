"""Shared pieces of the ACME tests (no tests here): a project, an account on Pebble, and
CertAutoPilot's own HTTP-01 responder (the Flask app) served in a thread on the port
where Pebble's VA fetches challenges."""

from __future__ import annotations

import json
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from werkzeug.serving import make_server

from app.audit import system_actor
from app.domain import accounts, projects

ACTOR = system_actor("cli")


def make_project(db: Any, name: str = "acme-test") -> str:
    return projects.create_project(db, name=name, actor=ACTOR)["_id"]


def make_account(db: Any, project_id: str, settings: Any, *, register: bool = False,
                 name: str = "default") -> dict[str, Any]:
    return accounts.create_account(
        db, project_id, {"name": name, "contact": ["ops@example.test"], "terms_agreed": True},
        ACTOR, register=register, settings=settings)


def acme_settings(settings: Any, pebble: Any) -> Any:
    return settings.with_overrides(acme_directory_url=pebble.directory_url,
                                   acme_ca_bundle=pebble.ca_cert,
                                   acme_order_timeout_seconds=30.0)


@contextmanager
def responder(settings: Any, port: int) -> Iterator[None]:
    """The real api app (its HTTP-01 route) listening on 127.0.0.1:port in a thread."""
    from app import create_app

    app = create_app(settings)
    server = make_server("127.0.0.1", port, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def challtest(pebble: Any, path: str, body: dict[str, Any]) -> None:
    request = urllib.request.Request(f"{pebble.challtestsrv_url}/{path}",
                                     data=json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(request, timeout=5):
        pass


def pebble_order_count(pebble: Any) -> int:
    return pebble.log().count("Added order")
