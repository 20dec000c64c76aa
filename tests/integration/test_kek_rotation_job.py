"""The ``kek.rotation_step`` job handler, run through the job runner in this process."""

from __future__ import annotations

import base64
import secrets

import pytest

from app import db as dbm
from app.audit import system_actor
from app.config import load_settings
from app.handlers import load_handlers
from app.jobs import enqueue, get_job
from app.jobs.runner import run_job
from app.keys import generate_private_key, load_keyring, open_private_key, seal_private_key
from app.keys.rotation import KEK_ROTATIONS, STEP_KIND, start_rotation


@pytest.fixture(autouse=True)
def _kinds() -> None:
    load_handlers()  # kek.rotation_step among them


def _seal(db, count: int) -> dict[str, bytes]:
    pems = {}
    for _ in range(count):
        pem = generate_private_key("ec256")
        pems[seal_private_key(db, pem, project_id="p", purpose="cert")] = pem
    return pems


def _run_step_job(db, settings) -> dict:
    job = enqueue(db, STEP_KIND, {}, publish=False)
    outcome = run_job(job["_id"], db=db, settings=settings, worker="test-worker")
    assert outcome == "succeeded", outcome
    return get_job(db, str(job["_id"]))["result"]


def test_step_job_idle_without_rotation(migrated_db, settings) -> None:
    assert _run_step_job(migrated_db, settings) == {"state": "idle"}


def test_step_job_rewraps_under_the_jobs_lease(migrated_db, settings, kek_dir) -> None:
    db = migrated_db
    pems = _seal(db, 25)
    (kek_dir / "v2.key").write_text(base64.b64encode(secrets.token_bytes(32)).decode())
    ring = load_keyring(settings)
    start_rotation(db, 2, keyring=ring, actor=system_actor("cli"))
    result = _run_step_job(db, settings)
    assert result["state"] == "done" and result["rewrapped"] == 25
    assert all(r["rewrap_count"] == 1 and r["kek_version"] == 2 for r in db[dbm.KEYS].find())
    assert all(open_private_key(db, k, project_id="p") == v for k, v in pems.items())
    assert db[dbm.AUDIT].find_one({"action": "kek.rewrap"})["actor"]["id"].startswith("worker@")


def test_step_job_with_a_wrong_kek_is_blocked_not_crashed(migrated_db, cap_env, kek_dir,
                                                          tmp_path) -> None:
    db = migrated_db
    _seal(db, 5)
    v2 = base64.b64encode(secrets.token_bytes(32)).decode()
    (kek_dir / "v2.key").write_text(v2)
    start_rotation(db, 2, keyring=load_keyring(load_settings(cap_env)),
                   actor=system_actor("cli"))
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "v1.key").write_text(base64.b64encode(secrets.token_bytes(32)).decode())
    (wrong / "v2.key").write_text(v2)
    before = list(db[dbm.KEYS].find(sort=[("_id", 1)]))
    result = _run_step_job(db, load_settings({**cap_env, "CAP_KEK_DIR": str(wrong)}))
    assert result["state"] == "blocked" and "v1" in result["reason"]
    assert "wrong key" in result["reason"]
    assert list(db[dbm.KEYS].find(sort=[("_id", 1)])) == before
    rotation = db[KEK_ROTATIONS].find_one({"state": "running"})
    assert rotation["error_count"] == 1 and rotation["not_before"] is not None
    # The next step backs off instead of hammering.
    result = _run_step_job(db, load_settings(cap_env))
    assert result["state"] == "backing_off"
    empty = tmp_path / "empty"
    empty.mkdir()
    db[KEK_ROTATIONS].update_one({"_id": rotation["_id"]}, {"$set": {"not_before": None}})
    result = _run_step_job(db, load_settings({**cap_env, "CAP_KEK_DIR": str(empty)}))
    assert result["state"] == "blocked" and "no KEK file" in result["reason"]
