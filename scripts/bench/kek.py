#!/usr/bin/env python
"""KEK benchmark: DEK re-wrap throughput of a rotation, and seal/open in memory.

- ``rewrap_keys_per_s``: ``--keys`` EC P-256 keys (default 5000) sealed under KEK v1 are
  loaded into a fresh database on the embedded MongoDB-wire server (started here on a free
  port, stopped at the end; or ``CAP_MONGO_URI`` if set), a rotation to v2 is recorded,
  and rotation steps (``app.keys.rotation.run_step``, the code a ``kek.rotation_step`` job
  runs, batches of ``--batch`` re-wraps per transaction with its audit entry) run until
  the rotation is done. Keys re-wrapped divided by the wall time of the steps.
- ``seal_open_per_s``: envelope seal + open of one P-256 PEM (new DEK, AES-256-GCM, DEK
  wrap and unwrap), in memory, for ``--seconds``; one seal plus one open counts as one.
- ``rewrap_in_memory_per_s``: the crypto of one re-wrap alone (unwrap + wrap the DEK).

The last line printed is one JSON object.

    .venv/bin/python scripts/bench/kek.py [--keys 5000] [--batch 200] [--seconds 3]
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: E402

from app.keys import envelope, generate_private_key  # noqa: E402


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def bench_memory(seconds: float) -> tuple[float, float]:
    kek1, kek2 = AESGCM(os.urandom(32)), AESGCM(os.urandom(32))
    pem = generate_private_key("ec256")
    count, deadline = 0, time.perf_counter() + seconds
    started = time.perf_counter()
    while time.perf_counter() < deadline:
        for _ in range(100):
            sealed = envelope.seal(pem, key_id="k", project_id="p", kek=kek1, kek_version=1)
            assert envelope.open_sealed(sealed, key_id="k", project_id="p", kek=kek1) == pem
        count += 100
    seal_open = count / (time.perf_counter() - started)
    sealed = envelope.seal(pem, key_id="k", project_id="p", kek=kek1, kek_version=1)
    count, deadline = 0, time.perf_counter() + seconds
    started = time.perf_counter()
    while time.perf_counter() < deadline:
        for _ in range(100):
            envelope.rewrap(sealed, key_id="k", project_id="p", old_kek=kek1, new_kek=kek2,
                            new_version=2)
        count += 100
    return seal_open, count / (time.perf_counter() - started)


def bench_rotation(keys: int, batch: int, workdir: Path) -> dict[str, float]:
    from app import db as dbm
    from app.audit import system_actor
    from app.config import load_settings
    from app.keys import canary, load_keyring
    from app.keys.keygen import key_type_of, load_private_key, public_key_sha256
    from app.keys.rotation import run_step, start_rotation
    from app.keys.store import build_record
    from app.migrations import migrate
    from devstack import embedded

    proc = None
    base = os.environ.get("CAP_MONGO_URI")
    if not base:
        port = embedded.free_port()
        proc, base = embedded.start(workdir / "db", port, log_path=workdir / "server.log")
    name = f"bench_kek_{uuid.uuid4().hex[:8]}"
    kek_dir = workdir / "kek"
    kek_dir.mkdir()
    import base64

    for version in (1, 2):
        (kek_dir / f"v{version}.key").write_text(base64.b64encode(os.urandom(32)).decode())
        (kek_dir / f"v{version}.key").chmod(0o600)
    settings = load_settings({"CAP_MONGO_URI": base, "CAP_MONGO_DB": name,
                              "CAP_KEK_DIR": str(kek_dir)})
    db = dbm.get_db(settings)
    try:
        migrate(db)
        ring = load_keyring(settings)
        canary.ensure(db, ring, 1)
        log(f"generating and sealing {keys} P-256 keys under v1")
        pem = generate_private_key("ec256")
        parsed = load_private_key(pem)
        kind, fingerprint = key_type_of(parsed), public_key_sha256(parsed)
        docs = []
        for _ in range(keys):
            docs.append(build_record(pem, key_id=uuid.uuid4().hex, project_id="bench",
                                     purpose="bench", key_type=kind, fingerprint=fingerprint,
                                     kek=ring.aead(1), kek_version=1))
            if len(docs) == 1000:
                db[dbm.KEYS].insert_many(docs)
                docs = []
        if docs:
            db[dbm.KEYS].insert_many(docs)
        start_rotation(db, 2, keyring=ring, actor=system_actor("bench"))
        log(f"rotating to v2 in batches of {batch}")
        started = time.perf_counter()
        rewrapped = steps = 0
        while True:
            summary = run_step(db, ring, owner="bench", batch_size=batch, budget_seconds=8.0)
            steps += 1
            rewrapped += summary.get("rewrapped", 0)
            if summary["state"] in ("done", "idle"):
                break
        elapsed = time.perf_counter() - started
        left = db[dbm.KEYS].count_documents({"kek_version": {"$ne": 2}})
        if rewrapped != keys or left:
            raise SystemExit(f"rotation incomplete: rewrapped {rewrapped}, left {left}")
        log(f"re-wrapped {rewrapped} keys in {elapsed:.1f} s ({steps} steps)")
        return {"rewrap_keys_per_s": round(rewrapped / elapsed, 1),
                "rewrap_seconds": round(elapsed, 2)}
    finally:
        try:
            db.client.drop_database(name)
        finally:
            dbm.close_clients()
            if proc is not None:
                proc.terminate()
                try:
                    proc.wait(10)
                except Exception:  # noqa: BLE001
                    proc.kill()
                    proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keys", type=int, default=5000)
    parser.add_argument("--batch", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-kek-"))
    try:
        log("seal/open in memory")
        seal_open, rewrap_mem = bench_memory(args.seconds)
        rotation = bench_rotation(args.keys, args.batch, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps({"keys": args.keys, "batch_size": args.batch, **rotation,
                      "seal_open_per_s": round(seal_open, 1),
                      "rewrap_in_memory_per_s": round(rewrap_mem, 1)}))


if __name__ == "__main__":
    main()
