"""``certautopilot backup`` / ``restore`` as real CLI processes against the embedded
server: the layout (read back with ``bson.decode_file_iter``), a round trip that brings
every document, index and key back, consistency while audited writes go on, and each
refusal leaving the target untouched."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import bson
import pytest
from bson import json_util

from app import db as dbm
from app.audit import system_actor
from app.audit.verify import verify_chain
from app.domain import certificates, projects
from app.keys import open_private_key, seal_private_key
from app.keys.keygen import generate_private_key
from app.ops.backup import SKIPPED_COLLECTIONS
from tests.conftest import uri_with_db
from tests.helpers.api import make_project, make_token
from tests.integration.test_acme_helpers import make_account

ACTOR = system_actor("cli")
# Written by the restore itself: its record, the ops.restore audit entry, the chain head,
RESTORE_WRITES = {dbm.RESTORES, dbm.COUNTERS, dbm.AUDIT, dbm.LEASES}  # + migrations lock


def cli(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-m", "app.cli", *args], env=env,
                          capture_output=True, text=True, timeout=300)
    if check:
        assert done.returncode == 0, f"{args}: {done.stdout}\n{done.stderr}"
    return done


@pytest.fixture
def source(migrated_db: Any, settings: Any, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A database with a bit of everything: projects, tokens, an account (sealed key),
    certificates with queued issuance jobs (and a wake-up each in the broker database),
    sealed keys. (Real kombu publishes are in tests/e2e/test_backup_dr_e2e.py; an
    in-process kombu publisher here leaves a client that only closes at exit.)"""
    db = migrated_db
    broker = db.client[settings.broker_db]
    monkeypatch.setattr("app.jobs.publish_wakeup", lambda job_id, *a, **k: bool(
        broker["messages"].insert_one({"queue": "certautopilot", "payload": job_id,
                                       "priority": 9})))
    project_id = make_project(db, "backup-src")
    make_token(db, project_id, ["read", "write"])
    account = make_account(db, project_id, settings)
    certs = [certificates.create_certificate(db, project_id, {"names": [f"c{i}.bk.test"]},
                                             ACTOR, settings=settings) for i in range(3)]
    for cert in certs:
        certificates.request_issuance(db, cert["_id"], ACTOR, "initial")
    keys = []
    for _ in range(3):
        def seal(session: Any) -> str:
            return seal_private_key(db, generate_private_key("ec256"), project_id=project_id,
                                    purpose="certificate", session=session)
        keys.append(dbm.transaction(db, seal))
    return {"db": db, "project_id": project_id, "account": account, "keys": keys}


@pytest.fixture
def target(cap_env: dict[str, str], db_name: str, mongo_base_uri: str) -> Any:
    """Env and handle of a second, empty pair of databases on the same server."""
    from pymongo import MongoClient

    name = db_name + "_r"
    env = dict(cap_env, CAP_MONGO_URI=uri_with_db(mongo_base_uri, name), CAP_MONGO_DB=name,
               CAP_BROKER_DB=name + "_broker")
    client: MongoClient[dict[str, Any]] = MongoClient(mongo_base_uri, tz_aware=True,
                                                      uuidRepresentation="standard")
    yield env, client[name], client[name + "_broker"]
    client.drop_database(name)
    client.drop_database(name + "_broker")
    client.close()


def dump_all(database: Any, skip: frozenset[str] = frozenset()) -> dict[str, list[Any]]:
    return {name: sorted(database[name].find(), key=lambda d: str(d["_id"]))
            for name in sorted(database.list_collection_names())
            if name not in skip and not name.startswith("system.")}


def indexes_of(database: Any) -> dict[str, list[tuple[str, Any]]]:
    return {name: sorted((ix["name"], dict(ix["key"]), ix.get("unique"),
                          ix.get("expireAfterSeconds"))
                         for ix in database[name].list_indexes())
            for name in database.list_collection_names()}


def test_round_trip_layout_documents_indexes_and_keys(source, settings, cap_env, target,
                                                      tmp_path: Path) -> None:
    db = source["db"]
    broker = db.client[settings.broker_db]
    out = tmp_path / "bk"
    manifest = json.loads(cli(cap_env, "backup", "--out", str(out), "--json").stdout)

    # mongodump's layout, read back with bson alone
    assert (out / "manifest.json").is_file()
    assert manifest["databases"] == {"app": db.name, "broker": settings.broker_db}
    for item in manifest["collections"]:
        with open(out / item["bson"], "rb") as handle:
            docs = list(bson.decode_file_iter(handle))
        assert len(docs) == item["count"], item
        meta = json_util.loads((out / item["metadata"]).read_text())
        assert meta["collectionName"] == item["name"]
        assert {ix["name"] for ix in meta["indexes"]} >= {"_id_"}
    counts = {(c["db"], c["name"]): c["count"] for c in manifest["collections"]}
    assert counts[("app", dbm.CERTIFICATES)] == 3
    assert counts[("app", dbm.KEYS)] == 3 + 1  # 3 certificate keys + the account key
    assert counts[("app", dbm.AUDIT)] == db[dbm.AUDIT].count_documents({})
    assert counts[("broker", "messages")] >= 1  # the issuance wake-ups
    head = db[dbm.COUNTERS].find_one({"_id": "audit"})
    assert manifest["audit_head"] == {"seq": head["seq"], "hash": head["hash"]}
    assert manifest["migration_version"] == max(
        d["_id"] for d in db[dbm.MIGRATIONS].find())
    assert "app" in manifest["tool"] or manifest["tool"] == "certautopilot"
    for rel, info in manifest["files"].items():
        assert len(info["sha256"]) == 64 and (out / rel).stat().st_size == info["bytes"]
    assert f"{db.name}.api_idempotency" in manifest["skipped"]
    assert counts[("app", "workers")] == 0  # TTL scratch: indexes kept, documents not
    assert not list(tmp_path.glob(".bk.partial-*"))

    env, tdb, tbroker = target
    report = json.loads(cli(env, "restore", "--from", str(out), "--json").stdout)
    assert report["verified"] and report["migrations_applied"] == []
    assert report["documents"] == manifest["documents"]

    src, dst = dump_all(db, RESTORE_WRITES), dump_all(tdb, RESTORE_WRITES)
    for scratch in SKIPPED_COLLECTIONS:  # documents skipped, collection and indexes kept
        src[scratch] = []
    assert sorted(src) == sorted(dst)
    assert {k for k in src if src[k] != dst[k]} == set()
    assert dump_all(broker) == dump_all(tbroker)
    restored_indexes = indexes_of(tdb)
    assert restored_indexes.pop(dbm.RESTORES)
    assert restored_indexes == indexes_of(db)
    # every audit entry is back, followed by the restore's own entry
    old = list(db[dbm.AUDIT].find({}, sort=[("seq", 1)]))
    new = list(tdb[dbm.AUDIT].find({}, sort=[("seq", 1)]))
    assert new[:len(old)] == old and [e["action"] for e in new[len(old):]] == ["ops.restore"]
    assert verify_chain(dbm.get_db(settings.with_overrides(
        mongo_db=env["CAP_MONGO_DB"], mongo_uri=env["CAP_MONGO_URI"]))).intact
    # every key decrypts with the KEK
    restored = dbm.get_db(settings.with_overrides(mongo_db=env["CAP_MONGO_DB"],
                                                  mongo_uri=env["CAP_MONGO_URI"]))
    for key_id in source["keys"]:
        assert b"PRIVATE KEY" in open_private_key(restored, key_id,
                                                  project_id=source["project_id"])
    record = tdb[dbm.RESTORES].find_one()
    assert record["state"] == "complete"
    assert record["manifest"]["audit_head"] == manifest["audit_head"]


def test_gzip_backup_restores_and_runs_missing_migrations(source, settings, cap_env, target,
                                                          tmp_path: Path) -> None:
    db = source["db"]
    # a backup taken before migration 7 existed: restore applies it
    db[dbm.MIGRATIONS].delete_one({"_id": 7})
    db.drop_collection("api_idempotency")
    out = tmp_path / "bk"
    cli(cap_env, "backup", "--out", str(out), "--gzip")
    assert all(p.name.endswith(".gz") for p in (out / db.name).iterdir())
    env, tdb, _ = target
    report = json.loads(cli(env, "restore", "--from", str(out), "--json").stdout)
    assert report["migrations_applied"] == [7]
    assert "api_idempotency" in tdb.list_collection_names()
    assert tdb[dbm.CERTIFICATES].count_documents({}) == 3


def test_backup_refuses_a_non_empty_directory(source, cap_env, tmp_path: Path) -> None:
    out = tmp_path / "bk"
    out.mkdir()
    (out / "old.txt").write_text("x")
    done = cli(cap_env, "backup", "--out", str(out), check=False)
    assert done.returncode == 1
    assert "is not empty" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    # an existing empty directory is fine
    empty = tmp_path / "empty"
    empty.mkdir()
    cli(cap_env, "backup", "--out", str(empty))
    assert (empty / "manifest.json").is_file()


@pytest.fixture
def backup_dir(source, cap_env, tmp_path: Path) -> Path:
    out = tmp_path / "bk"
    cli(cap_env, "backup", "--out", str(out))
    return out


def refused(env: dict[str, str], tdb: Any, tbroker: Any, *args: str) -> str:
    done = cli(env, "restore", *args, check=False)
    assert done.returncode == 1, done.stdout
    assert tdb.list_collection_names() == [] and tbroker.list_collection_names() == []
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    return done.stderr


def test_corrupted_file_is_refused_before_anything_is_written(backup_dir, target) -> None:
    env, tdb, tbroker = target
    path = next((backup_dir).glob("*/certificates.bson"))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    message = refused(env, tdb, tbroker, "--from", str(backup_dir))
    assert "does not match its SHA-256" in message and "certificates.bson" in message


def test_truncated_file_is_refused(backup_dir, target) -> None:
    env, tdb, tbroker = target
    path = next((backup_dir).glob("*/audit.bson"))
    path.write_bytes(path.read_bytes()[:-7])
    message = refused(env, tdb, tbroker, "--from", str(backup_dir))
    assert "truncated or edited" in message


def test_missing_manifest_is_refused(backup_dir, target) -> None:
    env, tdb, tbroker = target
    (backup_dir / "manifest.json").unlink()
    message = refused(env, tdb, tbroker, "--from", str(backup_dir))
    assert "no manifest.json" in message and "--mongodump" in message


@pytest.mark.parametrize("newer", ["migration", "format"])
def test_newer_schema_is_refused(backup_dir, target, newer: str) -> None:
    env, tdb, tbroker = target
    manifest = json.loads((backup_dir / "manifest.json").read_text())
    if newer == "migration":
        manifest["migrations"].append(9999)
        manifest["migration_version"] = 9999
    else:
        manifest["format_version"] = 2
    (backup_dir / "manifest.json").write_text(json.dumps(manifest))
    message = refused(env, tdb, tbroker, "--from", str(backup_dir))
    if newer == "migration":
        assert "newer schema" in message and "9999" in message
    else:
        assert "backup format 2, newer than this code's" in message


def test_non_empty_target_is_refused_without_drop(backup_dir, source, cap_env) -> None:
    db = source["db"]
    before = dump_all(db)
    done = cli(cap_env, "restore", "--from", str(backup_dir), check=False)
    assert done.returncode == 1
    assert "is not empty" in done.stderr and "--drop" in done.stderr
    assert dump_all(db) == before
    # --drop replaces it: the extra project made after the backup is gone
    projects.create_project(db, name="after-backup", actor=ACTOR)
    cli(cap_env, "restore", "--from", str(backup_dir), "--drop")
    assert db[dbm.PROJECTS].count_documents({"name": "after-backup"}) == 0
    assert db[dbm.CERTIFICATES].count_documents({}) == 3
    assert verify_chain(db).intact


def test_plain_mongodump_output_restores_unverified(backup_dir, target) -> None:
    env, tdb, _ = target
    (backup_dir / "manifest.json").unlink()  # exactly mongodump's layout then
    done = cli(env, "restore", "--from", str(backup_dir), "--mongodump", "--json")
    report = json.loads(done.stdout)
    assert report["verified"] is False
    assert any("cannot be checked" in note for note in report["notes"])
    assert tdb[dbm.CERTIFICATES].count_documents({}) == 3


def test_plain_mongodump_output_truncated_is_refused(backup_dir, target) -> None:
    env, tdb, tbroker = target
    (backup_dir / "manifest.json").unlink()
    path = next((backup_dir).glob("*/keys.bson"))
    path.write_bytes(path.read_bytes()[:-3])
    message = refused(env, tdb, tbroker, "--from", str(backup_dir), "--mongodump")
    assert "truncated" in message


def test_backup_is_one_point_in_time_while_audited_writes_go_on(source, settings, cap_env,
                                                                target,
                                                                tmp_path: Path) -> None:
    """Writers create audited projects and certificates' jobs all through the backup; the
    copy holds a gap-free chain whose head is its last entry, and no job refers to a
    certificate that is not in it."""
    db = source["db"]
    stop = threading.Event()
    made = [0]

    def write() -> None:
        i = 0
        while not stop.is_set():
            cert = certificates.create_certificate(
                db, source["project_id"], {"names": [f"live{i}.bk.test"]}, ACTOR,
                settings=settings)
            certificates.request_issuance(db, cert["_id"], ACTOR, "initial")
            i += 1
            made[0] = i

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    try:
        out = tmp_path / "bk"
        manifest = json.loads(cli(cap_env, "backup", "--out", str(out), "--json").stdout)
    finally:
        stop.set()
        writer.join(60)
    assert made[0] > 0
    env, tdb, _ = target
    cli(env, "restore", "--from", str(out))
    head = manifest["audit_head"]
    # Entries committed and not yet sealed at the snapshot are in the copy too; the
    # restore's own entry (ops.restore) seals them after the head.
    waiting = sum(c["count"] for c in manifest["collections"]
                  if (c["db"], c["name"]) == ("app", dbm.AUDIT_PENDING))
    entries = list(tdb[dbm.AUDIT].find({}, {"seq": 1, "hash": 1}, sort=[("seq", 1)]))
    assert [e["seq"] for e in entries] == list(range(1, head["seq"] + waiting + 2))
    assert tdb[dbm.AUDIT_PENDING].count_documents({}) == 0
    assert entries[head["seq"] - 1]["hash"] == head["hash"]
    cert_ids = {c["_id"] for c in tdb[dbm.CERTIFICATES].find({}, {"_id": 1})}
    job_certs = {j["payload"]["certificate_id"] for j in tdb[dbm.JOBS].find(
        {"kind": "certificates.issue"})}
    assert job_certs <= cert_ids
    # each certificate's creation entry is in the copy exactly when the certificate is
    created = {e["target"].split(":", 1)[1] for e in tdb[dbm.AUDIT].find(
        {"action": "certificate.create"})}
    assert created == cert_ids
