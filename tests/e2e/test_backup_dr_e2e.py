"""Backup while the service works, restore into a fresh server, and the DR drill.

One stack (gunicorn answering HTTP-01 on Pebble's port, a Celery worker, the scheduler
with a fast renewal scan) issues certificates; ``certautopilot backup`` runs while
renewals, audit writes and API calls go on. The backup is restored into a second,
fresh embedded server; there every certificate, account, key (it decrypts) and audit
entry of the backup is back, and ``certautopilot dr-test`` passes against Pebble through
a new api and worker. Restored without the KEK, ``dr-test`` and ``health`` fail at the
KEK with a message saying how to supply it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import bson
import pytest
import requests
from pymongo import MongoClient

from app import db as dbm
from app.audit import system_actor
from app.audit.verify import verify_chain
from app.config import load_settings
from app.domain import accounts
from app.keys import open_private_key
from devstack import embedded
from tests.conftest import uri_with_db
from tests.e2e.test_acme_e2e import stack_env, start_api, wait_issued
from tests.helpers import wait_for
from tests.helpers.api import make_admin
from tests.integration.test_acme_helpers import make_project

ACTOR = system_actor("cli")


def cli(env: dict[str, str], *args: str, timeout: float = 600
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "app.cli", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def fresh_server(tmp_path: Path) -> Any:
    """A second embedded server: the clean cluster of the drill."""
    proc, uri = embedded.start(tmp_path / "fresh-db", embedded.free_port(),
                               log_path=tmp_path / "fresh-db.log")
    yield uri
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def env_on(base_env: dict[str, str], uri: str, name: str) -> dict[str, str]:
    return dict(base_env, CAP_MONGO_URI=uri_with_db(uri, name), CAP_MONGO_DB=name,
                CAP_BROKER_DB=name + "_broker")


def read_backup_docs(out: Path, manifest: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Every application collection of the backup, read with bson alone."""
    found = {}
    for item in manifest["collections"]:
        if item["db"] == "app":
            with open(out / item["bson"], "rb") as handle:
                found[item["name"]] = list(bson.decode_file_iter(
                    handle, bson.CodecOptions(tz_aware=True)))
    return found


def test_backup_live_restore_fresh_server_and_dr_test(migrated_db, settings, pebble, cap_env,
                                                      procs, fresh_server, tmp_path):
    db = migrated_db
    s = settings.with_overrides(acme_directory_url=pebble.directory_url,
                                acme_ca_bundle=pebble.ca_cert)
    scan = {"name": "test.renewal_scan", "every_seconds": 2,
            "kind": "certificates.renewal_scan"}
    env = stack_env(cap_env, pebble, CAP_SCHEDULER_EXTRA_ENTRIES=json.dumps([scan]))
    api = start_api(procs, env, pebble)
    procs.worker(env, concurrency=2)
    procs.scheduler(env)

    # The fixture project of the drill, and a working project, each with an account.
    fixture_id = make_project(db, "dr-fixture")
    work_id = make_project(db, "work")
    for project_id in (fixture_id, work_id):
        accounts.create_account(db, project_id, {"contact": ["ops@example.test"],
                                                 "terms_agreed": True}, ACTOR,
                                register=False, settings=s)
    # Through the api process (an in-process kombu publisher would outlive the test).
    admin = make_admin(db)
    base = f"http://127.0.0.1:{pebble.http_port}/api/v1"
    specs = [(fixture_id, ["dr.e2e.test"])] + [
        (work_id, [f"w{i}.backup.e2e.test"]) for i in range(4)]
    certs = []
    for project_id, names in specs:
        answer = requests.post(f"{base}/certificates", headers=admin.headers, timeout=30,
                               json={"project_id": project_id, "names": names})
        assert answer.status_code == 201, answer.text
        certs.append(answer.json()["id"])
    issued = [wait_issued(db, c) for c in certs]

    # Renewals fall due (the scan enqueues them every 2 s) and API calls go on while the
    # backup runs.
    for doc in issued[1:]:
        db[dbm.CERTIFICATES].update_one({"_id": doc["_id"]}, {"$set": {
            "next_renewal_at": dbm.server_now(db)}})
    stop = threading.Event()
    created: list[str] = []

    def api_writes() -> None:
        i = 0
        while not stop.is_set():
            answer = requests.post(f"{base}/certificates", headers=admin.headers, json={
                "project_id": work_id, "names": [f"live{i}.backup.e2e.test"]}, timeout=30)
            assert answer.status_code == 201, answer.text
            created.append(answer.json()["id"])
            i += 1

    writer = threading.Thread(target=api_writes, daemon=True)
    wait_for(lambda: db[dbm.JOBS].count_documents({"payload.reason": "renewal"}) >= 1,
             timeout=60, message="a renewal job enqueued by the scan")
    writer.start()
    out = tmp_path / "backup"
    try:
        done = cli(cap_env, "backup", "--out", str(out), "--json")
    finally:
        stop.set()
        writer.join(60)
    assert done.returncode == 0, done.stderr
    manifest = json.loads(done.stdout)
    assert created, "no API write happened during the backup"
    # the source keeps working after the backup: wait for the live work to settle
    for cert_id in created:
        wait_issued(db, cert_id)
    api.stop()
    procs.stop_all()

    # ---- restore into a fresh server
    name = "cap_restored"
    fresh = env_on(env, fresh_server, name)
    done = cli(fresh, "restore", "--from", str(out), "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["verified"] and report["documents"] == manifest["documents"]
    client: MongoClient[dict[str, Any]] = MongoClient(fresh_server, tz_aware=True,
                                                      uuidRepresentation="standard")
    try:
        rdb = client[name]
        backup_docs = read_backup_docs(out, manifest)
        for item in manifest["collections"]:
            # Entries pending in the backup (committed, not yet sealed) are chained by
            # the seal after the restore's own entry: checked below.
            if item["db"] == "app" and item["name"] not in (dbm.AUDIT, dbm.COUNTERS,
                                                            dbm.LEASES, dbm.AUDIT_PENDING):
                assert rdb[item["name"]].count_documents({}) == item["count"], item
        for coll in (dbm.CERTIFICATES, dbm.ACME_ACCOUNTS, dbm.KEYS, dbm.ORDERS, dbm.JOBS,
                     dbm.PROJECTS, dbm.API_TOKENS):
            by_id = {d["_id"]: d for d in rdb[coll].find()}
            assert {d["_id"]: d for d in backup_docs[coll]} == by_id, coll
        entries = list(rdb[dbm.AUDIT].find({}, sort=[("seq", 1)]))
        head = manifest["audit_head"]
        assert entries[:head["seq"]] == sorted(backup_docs[dbm.AUDIT], key=lambda e: e["seq"])
        assert [e["seq"] for e in entries] == list(range(1, len(entries) + 1))
        assert entries[head["seq"] - 1]["hash"] == head["hash"]
        pending = sorted(backup_docs.get(dbm.AUDIT_PENDING, []), key=lambda e: e["_id"])
        assert rdb[dbm.AUDIT_PENDING].count_documents({}) == 0
        assert [e["action"] for e in entries[head["seq"]:]] == \
            [p["action"] for p in pending] + ["ops.restore"]
        # one point in time: nothing refers to a document missing from the copy
        cert_ids = {c["_id"] for c in rdb[dbm.CERTIFICATES].find()}
        assert {j["payload"]["certificate_id"] for j in rdb[dbm.JOBS].find(
            {"kind": "certificates.issue"})} <= cert_ids
        key_ids = {k["_id"] for k in rdb[dbm.KEYS].find()}
        assert {c["key_id"] for c in rdb[dbm.CERTIFICATES].find({"key_id": {"$ne": None}})
                } <= key_ids
        assert {a["key_id"] for a in rdb[dbm.ACME_ACCOUNTS].find()} <= key_ids
        created_entries = {e["target"].split(":", 1)[1] for e in entries
                           if e["action"] == "certificate.create"}
        assert created_entries == cert_ids

        restored = dbm.get_db(load_settings(fresh))
        assert verify_chain(restored).intact
        for key in rdb[dbm.KEYS].find():  # every key decrypts (never printed)
            assert open_private_key(restored, key["_id"], project_id=key["project_id"])
        dbm.close_clients()

        # ---- the drill against Pebble through a new api and worker on the restored db
        start_api(procs, fresh, pebble)
        procs.worker(fresh, concurrency=1)
        drill = cli(fresh, "dr-test", "--directory", pebble.directory_url, "--project",
                    "dr-fixture", "--api-url", f"http://127.0.0.1:{pebble.http_port}",
                    "--json", "--timeout", "240")
        result = json.loads(drill.stdout)
        assert drill.returncode == 0, json.dumps(result, indent=1) + drill.stderr
        assert [st["name"] for st in result["steps"]] == ["audit", "kek", "health", "issue",
                                                          "revoke"]
        assert all(st["ok"] and st["seconds"] >= 0 for st in result["steps"])
        assert "with the manifest's hash" in result["steps"][0]["message"]
        issue = result["steps"][3]["detail"]
        assert issue["names"] == ["dr.e2e.test"]
        test_cert = rdb[dbm.CERTIFICATES].find_one({"_id": issue["certificate_id"]})
        assert test_cert["status"] == "revoked"
        assert rdb[dbm.JOBS].find_one({"_id": issue["job_id"]})["state"] == "succeeded"
        # the drill's token is revoked; its key never printed
        assert rdb[dbm.API_TOKENS].find_one({"name": "dr-test"})["revoked_at"] is not None
        assert "PRIVATE KEY" not in drill.stdout + drill.stderr
        procs.stop_all()

        # ---- the same backup restored without the KEK: the drill stops at the KEK
        no_kek = env_on(env, fresh_server, "cap_restored_nokek")
        no_kek.pop("CAP_KEK_DIR")
        done = cli(no_kek, "restore", "--from", str(out))
        assert done.returncode == 0, done.stderr
        drill = cli(no_kek, "dr-test", "--directory", pebble.directory_url, "--json")
        result = json.loads(drill.stdout)
        assert drill.returncode == 1
        assert result["failed_step"] == "kek"
        kek_step = result["steps"][1]
        assert "no KEK configured" in kek_step["message"]
        assert "CAP_KEK_DIR" in kek_step["message"] and "kept apart" in kek_step["message"]
        assert [st["message"] for st in result["steps"][3:]] == [
            "skipped: an earlier step failed"] * 2
        health = cli(no_kek, "health")
        assert health.returncode == 1
        assert "FAIL kek" in health.stdout and "no KEK configured" in health.stdout
        assert "CAP_KEK_DIR" in health.stdout
    finally:
        client.drop_database(name)
        client.drop_database(name + "_broker")
        client.close()
