#!/usr/bin/env python
"""Backup/restore benchmark: ``certautopilot backup`` and ``restore`` against the floor.

A database of ``--certificates`` certificates (default 10,000; each with its issued PEM
chain and its sealed private key in ``keys``) and ``--audit`` audit entries (default
100,000, a real hash chain) is

- backed up by ``app.ops.backup.run_backup`` (what ``certautopilot backup`` runs):
  ``backup_docs_per_s``;
- restored by ``app.ops.restore.read_backup`` + ``run_restore`` (hash check of every
  file, load, indexes, migrations, the ops.restore entry) into a fresh database:
  ``restore_docs_per_s``;
- and the same work with ``bson`` + pymongo alone, in the same run, as the floor:
  ``floor_backup_docs_per_s`` (``find()`` + ``bson.encode`` to the same files, no
  snapshot, no hashes) and ``floor_docs_per_s`` (``bson.decode_file_iter`` +
  ``insert_many`` into a fresh database, no index build, no checks), and that load
  followed by one ``createIndexes`` per collection with the source's indexes
  (``floor_indexed_docs_per_s``: the restore's work with none of its checks).

Target: backup and restore each at least 50 % of their floor (``backup_ratio``,
``restore_ratio``; ``restore_ratio_indexed`` is the restore against the indexed floor).
Runs on the embedded server (started here) unless ``CAP_MONGO_URI`` is set. The last
line printed is one JSON object.

    .venv/bin/python scripts/bench/backup.py [--certificates 10000] [--audit 100000]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _pem_chain() -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    pems = []
    for cn in ("bench.example.com", "Bench Intermediate"):
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now).not_valid_after(now + timedelta(days=90))
                .sign(key, hashes.SHA256()))
        pems.append(cert.public_bytes(serialization.Encoding.PEM).decode())
    return "".join(pems)


def populate(db: Any, certificates: int, audit_entries: int) -> int:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from app import db as dbm
    from app.keys.store import build_record
    sys.path.insert(0, str(ROOT / "scripts" / "bench"))
    from audit import build_chain

    kek = AESGCM(os.urandom(32))
    chain = _pem_chain()
    now = datetime.now(UTC)
    certs, keys = [], []
    for i in range(certificates):
        pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption())
        key_id = f"key_{i:08d}"
        project = f"prj_{i % 50:04d}"
        keys.append(build_record(pem, key_id=key_id, project_id=project, purpose="certificate",
                                 key_type="ec256", fingerprint=f"{i:064x}", kek=kek,
                                 kek_version=1))
        certs.append({"_id": f"crt_{i:016x}", "project_id": project, "name": f"c{i}",
                      "names": [f"c{i}.bench.example.com", f"www.c{i}.bench.example.com"],
                      "key_type": "ec256", "challenge": {"type": "http-01"},
                      "account_id": "acc_bench", "status": "issued", "version": 3,
                      "created_at": now, "updated_at": now, "issued_at": now,
                      "next_renewal_at": now + timedelta(days=60), "serial": f"{i:032x}",
                      "not_before": now, "not_after": now + timedelta(days=90),
                      "certificate_pem": chain[:len(chain) // 2],
                      "chain_pem": chain[len(chain) // 2:], "fullchain_pem": chain,
                      "fingerprint_sha256": f"{i:064x}", "issuer": "CN=Bench Intermediate",
                      "key_id": key_id, "order_id": f"ord_{i:016x}", "issue_count": 1})
        if len(certs) == 1000:
            db[dbm.CERTIFICATES].insert_many(certs, ordered=False)
            db[dbm.KEYS].insert_many(keys, ordered=False)
            certs, keys = [], []
    if certs:
        db[dbm.CERTIFICATES].insert_many(certs, ordered=False)
        db[dbm.KEYS].insert_many(keys, ordered=False)
    build_chain(db, audit_entries, hmac=False)
    return certificates * 2 + audit_entries


def floor_backup(db: Any, out: Path) -> tuple[int, float]:
    import bson

    started = time.perf_counter()
    total = 0
    (out / db.name).mkdir(parents=True)
    for name in db.list_collection_names():
        with open(out / db.name / f"{name}.bson", "wb") as handle:
            for doc in db[name].find():
                handle.write(bson.encode(doc))
                total += 1
    return total, time.perf_counter() - started


def floor_restore(src: Path, db: Any) -> tuple[int, float]:
    import bson

    started = time.perf_counter()
    total = 0
    for path in sorted(src.glob("*/*.bson")):
        with open(path, "rb") as handle:
            batch: list[Any] = []
            for doc in bson.decode_file_iter(handle):
                batch.append(doc)
                if len(batch) == 1000:
                    db[path.name[:-5]].insert_many(batch)
                    total += len(batch)
                    batch = []
            if batch:
                db[path.name[:-5]].insert_many(batch)
                total += len(batch)
    return total, time.perf_counter() - started


def copy_indexes(source: Any, db: Any) -> float:
    """Build on ``db`` the indexes of ``source``'s collections (one ``createIndexes`` per
    collection, as a plain script would); the seconds it took."""
    from pymongo import IndexModel

    started = time.perf_counter()
    for name in source.list_collection_names():
        models = []
        for spec in source[name].list_indexes():
            if spec["name"] == "_id_":
                continue
            options = {k: v for k, v in spec.items() if k not in ("key", "v", "ns")}
            models.append(IndexModel(list(spec["key"].items()), **options))
        if models:
            db[name].create_indexes(models)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--certificates", type=int, default=10_000)
    parser.add_argument("--audit", type=int, default=100_000)
    args = parser.parse_args()

    from app import db as dbm
    from app.config import load_settings
    from app.migrations import migrate
    from app.ops.backup import run_backup
    from app.ops.restore import read_backup, run_restore
    from devstack import embedded

    workdir = Path(tempfile.mkdtemp(prefix="cap-bench-backup-"))
    proc = None
    base = os.environ.get("CAP_MONGO_URI")
    if not base:
        proc, base = embedded.start(workdir / "db", embedded.free_port(),
                                    log_path=workdir / "server.log")
    names: list[str] = []

    def database(migrated: bool = True) -> Any:
        name = f"cap_bench_backup_{uuid.uuid4().hex[:8]}"
        names.extend([name, name + "_broker"])
        db = dbm.get_db(load_settings({"CAP_MONGO_URI": base, "CAP_MONGO_DB": name}))
        if migrated:
            migrate(db)
        return db

    try:
        # Loaded before the indexes exist (migrate builds them after): inserting into the
        # audit collection's indexes one document at a time is what would take longest.
        source = database(migrated=False)
        log(f"populating {args.certificates} certificates + keys, {args.audit} audit entries")
        populate(source, args.certificates, args.audit)
        migrate(source)

        log("floor: find + bson.encode")
        floor_dir = workdir / "floor"
        floor_docs, floor_b_s = floor_backup(source, floor_dir)
        log("certautopilot backup")
        out = workdir / "backup"
        started = time.perf_counter()
        manifest = run_backup(source, source.name + "_broker", out)
        backup_s = time.perf_counter() - started
        docs = int(manifest["documents"])

        log("floor: bson.decode_file_iter + insert_many")
        floor_r_docs, floor_r_s = floor_restore(floor_dir, database(migrated=False))
        log("floor with the indexes: bson.decode_file_iter + insert_many + createIndexes")
        indexed = database(migrated=False)
        _, floor_i_load_s = floor_restore(floor_dir, indexed)
        floor_i_s = floor_i_load_s + copy_indexes(source, indexed)
        log("certautopilot restore")
        target = database(migrated=False)
        started = time.perf_counter()
        report = run_restore(target, target.name + "_broker", read_backup(out))
        restore_s = time.perf_counter() - started
        assert report["documents"] == docs, (report["documents"], docs)

        figures = {
            "documents": docs,
            "certificates": args.certificates, "audit_entries": args.audit,
            "backup_seconds": round(backup_s, 2), "restore_seconds": round(restore_s, 2),
            "backup_docs_per_s": round(docs / backup_s, 1),
            "restore_docs_per_s": round(docs / restore_s, 1),
            "floor_backup_docs_per_s": round(floor_docs / floor_b_s, 1),
            "floor_docs_per_s": round(floor_r_docs / floor_r_s, 1),
            "floor_indexed_docs_per_s": round(floor_r_docs / floor_i_s, 1),
            "backup_bytes": sum(int(f["bytes"]) for f in manifest["files"].values()),
            "restore_phases": report.get("phases"),
            "load_average": os.getloadavg(),
        }
        figures["backup_ratio"] = round(figures["backup_docs_per_s"]
                                        / figures["floor_backup_docs_per_s"], 3)
        figures["restore_ratio"] = round(figures["restore_docs_per_s"]
                                         / figures["floor_docs_per_s"], 3)
        figures["restore_ratio_indexed"] = round(figures["restore_docs_per_s"]
                                                 / figures["floor_indexed_docs_per_s"], 3)
        print(json.dumps(figures))
    finally:
        if proc is None:  # an external server keeps nothing of ours; ours is just removed
            try:
                client = dbm.get_client(load_settings({"CAP_MONGO_URI": base}))
                for name in names:
                    client.drop_database(name)
            except Exception:  # noqa: BLE001 - best effort cleanup
                pass
        dbm.close_clients()
        if proc is not None:
            proc.terminate()
            proc.wait(30)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
