"""KEK rotation over 10,000 keys with real workers and scheduler, one worker kill -9'd
mid-way: every key re-wrapped exactly once, each still opens, none lost."""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import subprocess
import sys
import uuid

import pytest

from app import db as dbm
from app.config import load_settings
from app.keys import canary, envelope, load_keyring, open_private_key, seal_private_key
from app.keys.keygen import key_type_of, load_private_key, public_key_sha256
from app.keys.rotation import KEK_ROTATIONS
from app.keys.store import build_record, sealed_of
from tests.helpers import wait_for

KEYS = 10_000


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "app.cli", *args], env=env,
                          capture_output=True, text=True, timeout=120)


def _load_keys(db, ring) -> dict[str, str]:
    """10,000 distinct P-256 keys sealed under v1 (bulk insert of the records
    seal_private_key writes). Returns key id -> SHA-256 of its PEM."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    # One sealed the ordinary way: stores the v1 canary and an audit entry.
    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    digests = {seal_private_key(db, pem, project_id="p0", purpose="cert"):
               hashlib.sha256(pem).hexdigest()}
    kek, docs = ring.aead(1), []
    for index in range(KEYS - 1):
        pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption())
        parsed = load_private_key(pem)
        key_id = uuid.uuid4().hex
        docs.append(build_record(pem, key_id=key_id, project_id=f"p{index % 7}",
                                 purpose="cert", key_type=key_type_of(parsed),
                                 fingerprint=public_key_sha256(parsed), kek=kek,
                                 kek_version=1))
        digests[key_id] = hashlib.sha256(pem).hexdigest()
        if len(docs) == 1000:
            db[dbm.KEYS].insert_many(docs)
            docs = []
    if docs:
        db[dbm.KEYS].insert_many(docs)
    return digests


@pytest.mark.timeout(900)  # its own waits (180 s + 300 s) decide, not the 300 s default
def test_rotation_of_10000_keys_survives_a_worker_kill9(migrated_db, cap_env, kek_dir,
                                                        procs) -> None:
    db = migrated_db
    ring = load_keyring(load_settings(cap_env))
    digests = _load_keys(db, ring)
    assert db[dbm.KEYS].count_documents({"kek_version": 1}) == KEYS
    (kek_dir / "v2.key").write_text(base64.b64encode(secrets.token_bytes(32)).decode())
    (kek_dir / "v2.key").chmod(0o600)

    env = {**cap_env, "CAP_JOB_LEASE_SECONDS": "10", "CAP_REAPER_REPUBLISH_SECONDS": "5"}
    workers = [procs.worker(env, name=f"w{i}") for i in range(2)]
    procs.scheduler(env)

    rotate = _cli(env, "kek", "rotate", "--to", "2")
    assert rotate.returncode == 0, rotate.stderr
    assert f"{KEYS} key(s) to re-wrap" in rotate.stdout
    # A second rotate while this one runs is refused clearly, and changes nothing.
    (kek_dir / "v3.key").write_text(base64.b64encode(secrets.token_bytes(32)).decode())
    (kek_dir / "v3.key").chmod(0o600)
    again = _cli(env, "kek", "rotate", "--to", "3")
    assert again.returncode == 1
    assert "a KEK rotation to v2 is already in progress" in again.stderr
    assert db[KEK_ROTATIONS].count_documents({}) == 1

    # Kill -9 the worker that runs the step once it is part-way through.
    def in_flight() -> dict | None:
        doc = db[KEK_ROTATIONS].find_one({})
        lease = doc.get("step_lease") or {}
        if 1000 <= doc["rewrapped"] < KEYS - 2000 and lease.get("owner"):
            return doc
        return None

    doc = wait_for(in_flight, timeout=180, interval=0.05,
                   message="rotation steps to start re-wrapping")
    pid = int(doc["step_lease"]["owner"].split(":")[1])
    group = os.getpgid(pid)
    victim = next(w for w in workers if w.pid == group)
    at_kill = db[KEK_ROTATIONS].find_one({})["rewrapped"]
    victim.kill9()
    assert 0 < at_kill < KEYS

    def finished() -> dict | None:
        doc = db[KEK_ROTATIONS].find_one({})
        return doc if doc["state"] == "done" else None

    done = wait_for(finished, timeout=300, interval=0.5, message="rotation to finish")
    assert done["rewrapped"] == KEYS and done["failed"] == 0

    # Every key re-wrapped exactly once, none lost, each still opens to the same PEM.
    assert db[dbm.KEYS].count_documents({}) == KEYS
    ring = load_keyring(load_settings(cap_env))
    opened = 0
    for record in db[dbm.KEYS].find({}):
        assert record["kek_version"] == 2 and record["rewrap_count"] == 1, record["_id"]
        assert record["rotation_id"] == done["_id"]
        pem = envelope.open_sealed(sealed_of(record), key_id=record["_id"],
                                   project_id=record["project_id"], kek=ring.aead(2))
        assert hashlib.sha256(pem).hexdigest() == digests.pop(record["_id"])
        opened += 1
    assert opened == KEYS and not digests
    sample = db[dbm.KEYS].find_one({"project_id": "p3"})
    assert open_private_key(db, sample["_id"], project_id="p3")
    assert canary.check(db, ring, 2) is True

    status = _cli(env, "kek", "status")
    assert status.returncode == 0, status.stderr
    assert "100.0%" in status.stdout and f"{KEYS}/{KEYS} keys re-wrapped" in status.stdout
    retire = _cli(env, "kek", "retire", "1")
    assert retire.returncode == 0, retire.stderr
    assert db[dbm.AUDIT].count_documents({"action": "kek.rewrap"}) >= KEYS // 200
    for worker in workers:
        if worker is not victim:
            assert worker.alive()
    logs = "".join(p.log() for p in procs.procs)
    assert "PRIVATE KEY-----" not in logs
