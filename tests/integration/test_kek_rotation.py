"""KEK rotation steps, refusals and retirement, driven directly (no worker processes)."""

from __future__ import annotations

import base64
import secrets
import threading
import time
from pathlib import Path

import pytest
from bson import Binary

from app import db as dbm
from app.audit import system_actor
from app.config import load_settings
from app.keys import (
    KeyUnavailable,
    RotationConflict,
    generate_private_key,
    load_keyring,
    open_private_key,
    seal_private_key,
)
from app.keys.rotation import (
    KEK_ROTATIONS,
    retire_version,
    run_step,
    start_rotation,
    status,
)

CLI = system_actor("cli")


def add_version(kek_dir: Path, version: int, key: bytes | None = None) -> None:
    path = kek_dir / f"v{version}.key"
    path.write_text(base64.b64encode(key or secrets.token_bytes(32)).decode() + "\n")
    path.chmod(0o600)


def keyring(kek_dir: Path):
    return load_keyring(load_settings({"CAP_KEK_DIR": str(kek_dir)}))


def seal_many(db, count: int, project_id: str = "p") -> dict[str, bytes]:
    pems = {}
    for _ in range(count):
        pem = generate_private_key("ec256")
        pems[seal_private_key(db, pem, project_id=project_id, purpose="cert")] = pem
    return pems


def test_rotation_rewraps_every_key_once_and_each_still_opens(migrated_db, kek_dir) -> None:
    db = migrated_db
    pems = seal_many(db, 60)
    add_version(kek_dir, 2)
    ring = keyring(kek_dir)
    doc = start_rotation(db, 2, keyring=ring, actor=CLI)
    assert (doc["state"], doc["total"], doc["from_versions"]) == ("running", 60, [1])
    # From now on new keys are sealed under the target.
    new_id = seal_private_key(db, generate_private_key("ec384"), project_id="p",
                              purpose="cert")
    assert db[dbm.KEYS].find_one({"_id": new_id})["kek_version"] == 2
    assert status(db, ring)["rotation"]["progress"] == 0.0

    summary = run_step(db, ring, owner="t", batch_size=25, budget_seconds=60)
    assert summary["state"] == "done" and summary["rewrapped"] == 60
    assert summary["batches"] == 3
    for key_id, pem in pems.items():
        record = db[dbm.KEYS].find_one({"_id": key_id})
        assert record["kek_version"] == 2 and record["rewrap_count"] == 1
        assert record["rotation_id"] == doc["_id"] and record["rewrapped_at"] is not None
        assert open_private_key(db, key_id, project_id="p", keyring=ring) == pem
    assert db[dbm.KEYS].find_one({"_id": new_id})["rewrap_count"] == 0
    info = status(db, ring)
    assert info["rotation"]["state"] == "done" and info["rotation"]["progress"] == 1.0
    assert info["keys_by_version"] == {"2": 61} and info["active_version"] == 2
    actions = [e["action"] for e in db[dbm.AUDIT].find({"action": {"$regex": "^kek\\."}},
                                                        sort=[("seq", 1)])]
    assert actions == ["kek.canary_create", "kek.canary_create", "kek.rotate", "kek.rewrap",
                       "kek.rewrap", "kek.rewrap", "kek.rotation_complete"]
    assert run_step(db, ring, owner="t") == {"state": "idle"}


def test_steps_resume_after_a_step_dies_holding_the_lease(migrated_db, kek_dir) -> None:
    db = migrated_db
    pems = seal_many(db, 30)
    add_version(kek_dir, 2)
    ring = keyring(kek_dir)
    doc = start_rotation(db, 2, keyring=ring, actor=CLI)
    first = run_step(db, ring, owner="a", batch_size=10, budget_seconds=0)
    assert (first["state"], first["rewrapped"]) == ("running", 10)
    # A step that died mid-way: its lease is held until it expires.
    now = dbm.server_now(db)
    from datetime import timedelta

    db[KEK_ROTATIONS].update_one({"_id": doc["_id"]}, {"$set": {"step_lease": {
        "owner": "dead", "expires_at": now + timedelta(seconds=1.5)}}})
    assert run_step(db, ring, owner="b", batch_size=10)["state"] == "busy"
    assert status(db, ring)["rotation"]["remaining"] == 20
    time.sleep(2.0)
    assert run_step(db, ring, owner="b", batch_size=10, budget_seconds=60)["state"] == "done"
    counts = [r["rewrap_count"] for r in db[dbm.KEYS].find({}, {"rewrap_count": 1})]
    assert counts == [1] * 30
    assert all(open_private_key(db, k, project_id="p", keyring=ring) == v
               for k, v in pems.items())
    assert db[KEK_ROTATIONS].find_one({"_id": doc["_id"]})["rewrapped"] == 30


def test_concurrent_steps_rewrap_each_key_once(migrated_db, kek_dir) -> None:
    db = migrated_db
    seal_many(db, 40)
    add_version(kek_dir, 2)
    ring = keyring(kek_dir)
    start_rotation(db, 2, keyring=ring, actor=CLI)
    results: list[dict] = []

    def step(owner: str) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            result = run_step(db, ring, owner=owner, batch_size=5, budget_seconds=0)
            results.append(result)
            if result["state"] in ("done", "idle"):
                return

    threads = [threading.Thread(target=step, args=(f"w{i}",)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(r.get("rewrapped", 0) for r in results) == 40
    assert [r["rewrap_count"] for r in db[dbm.KEYS].find()] == [1] * 40


def test_second_rotate_while_one_runs_is_refused_clearly(migrated_db, kek_dir) -> None:
    db = migrated_db
    seal_many(db, 3)
    add_version(kek_dir, 2)
    add_version(kek_dir, 3)
    ring = keyring(kek_dir)
    doc = start_rotation(db, 2, keyring=ring, actor=CLI)
    with pytest.raises(RotationConflict) as info:
        start_rotation(db, 3, keyring=ring, actor=CLI)
    assert "already in progress" in info.value.message and doc["_id"] in info.value.message
    assert info.value.status == 409
    assert db[KEK_ROTATIONS].count_documents({}) == 1
    assert db[dbm.AUDIT].count_documents({"action": "kek.rotate"}) == 1


def test_racing_rotates_record_only_one(migrated_db, kek_dir) -> None:
    db = migrated_db
    seal_many(db, 2)
    add_version(kek_dir, 2)
    ring = keyring(kek_dir)
    outcomes: list[object] = []
    barrier = threading.Barrier(4)

    def rotate() -> None:
        barrier.wait()
        try:
            outcomes.append(start_rotation(db, 2, keyring=ring, actor=CLI)["_id"])
        except RotationConflict as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=rotate) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(isinstance(o, str) for o in outcomes) == 1
    assert db[KEK_ROTATIONS].count_documents({"state": "running"}) == 1
    assert db[dbm.AUDIT].count_documents({"action": "kek.rotate"}) == 1


def test_rotate_refusals_change_nothing(migrated_db, kek_dir, tmp_path) -> None:
    db = migrated_db
    seal_many(db, 2)
    ring = keyring(kek_dir)
    with pytest.raises(RotationConflict, match="v5 is not in this process's keyring"):
        start_rotation(db, 5, keyring=ring, actor=CLI)
    with pytest.raises(RotationConflict, match="already active and every key uses it"):
        start_rotation(db, 1, keyring=ring, actor=CLI)
    # A v2 that differs from the v2 whose canary is stored.
    add_version(kek_dir, 2)
    seal_many(db, 0)
    from app.keys import canary

    canary.ensure(db, keyring(kek_dir), 2)
    add_version(kek_dir, 2)  # replaced by another key: wrong now
    with pytest.raises(KeyUnavailable, match="v2 .* is the wrong key"):
        start_rotation(db, 2, keyring=keyring(kek_dir), actor=CLI)
    # Keys under a version the keyring lacks cannot be re-wrapped.
    other = tmp_path / "only3"
    other.mkdir()
    add_version(other, 3)
    with pytest.raises(RotationConflict, match="sealed under KEK v1 which"):
        start_rotation(db, 3, keyring=keyring(other), actor=CLI)
    with pytest.raises(Exception, match="positive integer"):
        start_rotation(db, 0, keyring=ring, actor=CLI)
    assert db[KEK_ROTATIONS].count_documents({}) == 0
    assert db[dbm.AUDIT].count_documents({"action": "kek.rotate"}) == 0


def test_retire_only_when_no_key_uses_the_version(migrated_db, kek_dir) -> None:
    db = migrated_db
    seal_many(db, 12)
    add_version(kek_dir, 2)
    ring = keyring(kek_dir)
    with pytest.raises(RotationConflict, match="v1 is the active version"):
        retire_version(db, 1, keyring=ring, actor=CLI)
    start_rotation(db, 2, keyring=ring, actor=CLI)
    with pytest.raises(RotationConflict, match="rotation to v2 is in progress"):
        retire_version(db, 1, keyring=ring, actor=CLI)
    run_step(db, ring, owner="t", batch_size=5, budget_seconds=0)
    assert status(db, ring)["rotation"]["remaining"] == 7
    # A stray key under v1 (e.g. sealed by a pod that had not seen the rotation yet).
    stray = db[dbm.KEYS].find_one({"kek_version": 1})
    run_step(db, ring, owner="t", budget_seconds=60)
    db[dbm.KEYS].update_one({"_id": stray["_id"]}, {"$set": {
        "kek_version": 1, "wrapped_dek": stray["wrapped_dek"], "dek_nonce": stray["dek_nonce"]}})
    with pytest.raises(RotationConflict, match="still used by 1 key"):
        retire_version(db, 1, keyring=ring, actor=CLI)
    db[dbm.KEYS].delete_one({"_id": stray["_id"]})
    with pytest.raises(RotationConflict, match="v2 is the active version"):
        retire_version(db, 2, keyring=ring, actor=CLI)
    result = retire_version(db, 1, keyring=ring, actor=CLI)
    assert result["state"] == "retired"
    entry = db[dbm.AUDIT].find_one({"action": "kek.retire"})
    assert entry["target"] == "kek:v1" and entry["actor"]["id"].startswith("cli@")
    with pytest.raises(RotationConflict, match="already retired"):
        retire_version(db, 1, keyring=ring, actor=CLI)
    with pytest.raises(RotationConflict, match="v1 is retired"):
        start_rotation(db, 1, keyring=ring, actor=CLI)
    assert status(db, ring)["retired_versions"] == [1]


def test_step_with_a_wrong_old_kek_changes_nothing(migrated_db, kek_dir, tmp_path) -> None:
    db = migrated_db
    seal_many(db, 5)
    v2 = secrets.token_bytes(32)
    add_version(kek_dir, 2, v2)
    doc = start_rotation(db, 2, keyring=keyring(kek_dir), actor=CLI)
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    add_version(wrong, 1)
    add_version(wrong, 2, v2)
    before = list(db[dbm.KEYS].find(sort=[("_id", 1)]))
    with pytest.raises(KeyUnavailable, match="v1 .* is the wrong key"):
        run_step(db, keyring(wrong), owner="t", batch_size=2)
    assert list(db[dbm.KEYS].find(sort=[("_id", 1)])) == before
    rotation = db[KEK_ROTATIONS].find_one({"_id": doc["_id"]})
    assert "wrong key" in rotation["last_error"] and rotation["step_lease"] is None
    assert rotation["error_count"] == 1 and rotation["not_before"] > dbm.server_now(db)
    # Steps back off (no hammering) and say why.
    backing = run_step(db, keyring(kek_dir), owner="t")
    assert backing["state"] == "backing_off" and "wrong key" in backing["reason"]
    assert status(db)["rotation"]["last_error"] == rotation["last_error"]
    # Once the back-off is over, with the right keyring the next step finishes the job.
    db[KEK_ROTATIONS].update_one({"_id": doc["_id"]}, {"$set": {"not_before": None}})
    assert run_step(db, keyring(kek_dir), owner="t", budget_seconds=60)["state"] == "done"
    done = db[KEK_ROTATIONS].find_one({"_id": doc["_id"]})
    assert done["last_error"] is None and done["error_count"] == 0


def test_tampered_record_is_flagged_skipped_and_blocks_retirement(migrated_db, kek_dir) -> None:
    db = migrated_db
    pems = seal_many(db, 6)
    bad_id = next(iter(pems))
    record = db[dbm.KEYS].find_one({"_id": bad_id})
    data = bytes(record["wrapped_dek"])
    db[dbm.KEYS].update_one({"_id": bad_id}, {"$set": {
        "wrapped_dek": Binary(bytes([data[0] ^ 1]) + data[1:])}})
    add_version(kek_dir, 2)
    ring = keyring(kek_dir)
    start_rotation(db, 2, keyring=ring, actor=CLI)
    summary = run_step(db, ring, owner="t", budget_seconds=60)
    assert (summary["state"], summary["rewrapped"], summary["failed"]) == ("done", 5, 1)
    flagged = db[dbm.KEYS].find_one({"_id": bad_id})
    assert flagged["kek_version"] == 1 and "record altered" in flagged["rewrap_error"]["reason"]
    assert bytes(flagged["ciphertext"]) == bytes(record["ciphertext"])
    assert status(db, ring)["rotation"]["failed"] == 1
    with pytest.raises(RotationConflict, match="still used by 1 key"):
        retire_version(db, 1, keyring=ring, actor=CLI)
