"""Migrations: every index exists, re-running is a no-op, concurrent runs apply once."""

import json
import re
import subprocess
import sys

from app import db as dbm
from app.migrations import discover, migrate, status


def test_migrate_creates_every_index_and_is_idempotent(db) -> None:
    applied = migrate(db)
    assert applied == [m.version for m in discover()]
    assert migrate(db) == []
    jobs = db[dbm.JOBS].index_information()
    assert jobs["dedupe_key_active"]["unique"] is True
    assert db[dbm.CHALLENGES].index_information()["ttl_expires_at"]["expireAfterSeconds"] == 0
    assert db[dbm.AUDIT].index_information()["seq_unique"]["unique"] is True
    assert db[dbm.API_TOKENS].index_information()["token_hash_unique"]["unique"] is True
    assert "next_renewal_at" in db[dbm.CERTIFICATES].index_information()
    assert all(row["applied_at"] is not None for row in status(db))


def test_active_dedupe_key_is_unique_only_while_active(migrated_db) -> None:
    jobs = migrated_db[dbm.JOBS]
    jobs.insert_one({"dedupe_key": "k", "state": "queued"})
    try:
        jobs.insert_one({"dedupe_key": "k", "state": "running"})
        raise AssertionError("a second active job with the same dedupe key was accepted")
    except Exception as exc:  # DuplicateKeyError
        assert "duplicate" in str(exc).lower() or "E11000" in str(exc)
    jobs.update_one({"dedupe_key": "k"}, {"$set": {"state": "succeeded"}})
    jobs.insert_one({"dedupe_key": "k", "state": "queued"})


def test_two_migrate_processes_at_once_apply_each_migration_exactly_once(db, cap_env) -> None:
    argv = [sys.executable, "-m", "app.cli", "migrate"]
    runs = [subprocess.Popen(argv, env=cap_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for _ in range(2)]
    outputs = [run.communicate(timeout=120) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    counts = []
    for out, _ in outputs:
        match = re.search(r"applied (\d+) migration", out)
        counts.append(int(match.group(1)) if match else 0)
    assert sorted(counts) == [0, len(discover())], outputs
    records = list(db[dbm.MIGRATIONS].find())
    assert sorted(r["_id"] for r in records) == [m.version for m in discover()]

    listing = subprocess.run([*argv, "--status", "--json"], env=cap_env, capture_output=True,
                             text=True, timeout=60)
    assert listing.returncode == 0, listing.stderr
    assert all(row["applied_at"] for row in json.loads(listing.stdout))
