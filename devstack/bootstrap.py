"""What a newcomer needs after ``scripts/run``: an admin token kept in a file (mode 0600,
created once), and a ``demo`` project with an ACME account on the local test CA, so
``certautopilot certs issue --project demo www.example.test`` issues a real certificate.
The environment the stack runs with is written to ``dev.env`` beside them, which the
CLI run from the checkout reads when ``CAP_MONGO_URI`` is unset (``app/cli/base.py``)."""

from __future__ import annotations

import os
from pathlib import Path

from pymongo.database import Database

from app import db as dbm
from app.audit import system_actor
from app.config import Settings
from app.domain import accounts, projects, tokens
from app.errors import NotFound, Unauthorized

DEMO_PROJECT = "demo"
ENV_FILE = "dev.env"
TOKEN_FILE = "admin-token"
# What the CLI needs to reach the dev stack; everything else keeps its default.
ENV_KEYS = ("CAP_MONGO_URI", "CAP_KEK_DIR", "CAP_KEK_FILE", "CAP_KEK_COMMAND",
            "CAP_ACME_DIRECTORY_URL", "CAP_ACME_CA_BUNDLE", "CAP_CA_BUDGETS", "CAP_API_BIND",
            "CAP_DATA_DIR")


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by its owner only (replacing it atomically)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def write_env_file(data_dir: Path, env: dict[str, str]) -> Path:
    path = data_dir / ENV_FILE
    lines = [f"{key}={env[key]}" for key in ENV_KEYS if env.get(key)]
    write_private(path, "# written by `certautopilot dev`; read by the CLI in this checkout\n"
                  + "\n".join(lines) + "\n")
    return path


def ensure_admin_token(db: Database[dbm.Doc], data_dir: Path) -> Path:
    """The dev admin token's file; a new token only when the file is missing or its token
    no longer authenticates (a wiped database)."""
    path = data_dir / TOKEN_FILE
    if path.exists():
        try:
            tokens.authenticate(db, path.read_text().strip())
            return path
        except Unauthorized:
            pass
    _, plaintext = tokens.create_token(db, project_id=None, scopes=["admin"],
                                       actor=system_actor("dev"), name="dev admin")
    write_private(path, plaintext + "\n")
    return path


def ensure_demo_project(db: Database[dbm.Doc], settings: Settings) -> str:
    """The ``demo`` project with a registered account on ``settings``' directory."""
    actor = system_actor("dev")
    try:
        project = projects.find_project(db, DEMO_PROJECT)
    except NotFound:
        project = projects.create_project(db, name=DEMO_PROJECT, actor=actor,
                                          description="local demo (certautopilot dev)")
    project_id = str(project["_id"])
    existing = db[dbm.ACME_ACCOUNTS].find_one(
        {"project_id": project_id, "directory_url": settings.acme_directory_url,
         "status": "valid"})
    if existing is None:
        # The local CA keeps nothing across restarts: a new directory URL, a new account.
        accounts.create_account(db, project_id,
                                {"name": f"dev-{settings.acme_directory_url.rsplit(':', 1)[-1]}"
                                         .replace("/", "-")[:63],
                                 "directory_url": settings.acme_directory_url,
                                 "terms_agreed": True},
                                actor, settings=settings)
    return project_id
