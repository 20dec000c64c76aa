#!/usr/bin/env python
"""Drift-scan benchmark: endpoints probed per second by a ``certificates.drift_scan``.

``--endpoints`` endpoints (default 200: certificates of 50 endpoints each, every endpoint a
distinct SNI name on one of ``--servers`` local TLS listeners) are made due at once on a
fresh database on the embedded MongoDB-wire server (started here; or ``CAP_MONGO_URI``),
then ``app.domain.drift.scan_due`` (the job's code: find due endpoints, probe them in
parallel threads, record each result, move each to its next slot) runs until none is
due. The same scan with one probe thread (what a sequential cron script checking
endpoints one after the other does) is the baseline: ``ratio`` = parallel / sequential.

The last line printed is one JSON object.

    .venv/bin/python scripts/bench/drift.py [--endpoints 200] [--servers 10]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run(endpoints: int, servers: int, workdir: Path) -> dict[str, object]:
    from app import db as dbm
    from app.audit import system_actor
    from app.config import load_settings
    from app.domain import accounts, certificates, drift, projects
    from app.domain.issued import describe_issued
    from app.migrations import migrate
    from devstack import embedded
    from tests.helpers.receivers import CertFactory, TlsEndpoint

    proc = None
    base = os.environ.get("CAP_MONGO_URI")
    if not base:
        proc, base = embedded.start(workdir / "db", embedded.free_port(),
                                    log_path=workdir / "server.log")
    name = f"bench_drift_{uuid.uuid4().hex[:8]}"
    os.environ["CAP_MONGO_URI"] = base.split("?")[0].rsplit("/", 1)[0] + "/" + name + (
        "?" + base.split("?", 1)[1] if "?" in base else "")
    os.environ["CAP_MONGO_DB"] = name
    kek = workdir / "kek"
    kek.mkdir()
    (kek / "v1.key").write_text(base64.b64encode(os.urandom(32)).decode())
    (kek / "v1.key").chmod(0o600)
    os.environ["CAP_KEK_DIR"] = str(kek)  # the ACME account key is sealed
    settings = load_settings()
    db = dbm.get_db(settings)
    listeners: list[TlsEndpoint] = []
    try:
        migrate(db)
        actor = system_actor("bench")
        project = projects.create_project(db, name="bench", actor=actor)["_id"]
        accounts.create_account(db, project, {"directory_url": "https://127.0.0.1:1/dir",
                                              "terms_agreed": True}, actor, register=False)
        ca = CertFactory(workdir / "certs")
        leaf = ca.leaf("bench.example.com")
        listeners = [TlsEndpoint(leaf.cert_path, leaf.key_path) for _ in range(servers)]
        made = 0
        while made < endpoints:
            batch = min(50, endpoints - made)
            specs = [{"host": "127.0.0.1", "port": listeners[(made + i) % servers].port,
                      "sni": f"h{made + i}.example.com"} for i in range(batch)]
            cert = certificates.create_certificate(
                db, project, {"names": [f"c{made}.example.com"], "endpoints": specs}, actor)
            db[dbm.CERTIFICATES].update_one({"_id": cert["_id"]}, {"$set": {
                **describe_issued(leaf.pem), "status": "issued"}})
            made += batch
        figures: dict[str, object] = {"endpoints": endpoints, "servers": servers}
        for label, threads in (("sequential", 1), ("parallel", drift.PROBE_THREADS)):
            past = dbm.server_now(db) - timedelta(seconds=1)
            db[dbm.ENDPOINT_SCANS].update_many({}, {"$set": {"next_scan_at": past}})
            drift.PROBE_THREADS = threads
            started = time.perf_counter()
            scanned = 0
            while True:
                summary = drift.scan_due(db, settings=settings, budget_seconds=3600)
                scanned += int(summary["scanned"])
                if not summary["scanned"]:
                    break
            elapsed = time.perf_counter() - started
            assert scanned == endpoints, (label, scanned)
            figures[f"{label}_endpoints_per_s"] = round(scanned / elapsed, 1)
            figures[f"{label}_seconds"] = round(elapsed, 2)
            log(f"{label}: {scanned} endpoints in {elapsed:.2f} s")
        figures["ratio"] = round(float(figures["parallel_endpoints_per_s"])  # type: ignore[arg-type]
                                 / float(figures["sequential_endpoints_per_s"]), 2)  # type: ignore[arg-type]
        figures["all_ok"] = db[dbm.ENDPOINT_SCANS].count_documents({"state": "ok"}) == endpoints
        return figures
    finally:
        for listener in listeners:
            listener.close()
        try:
            db.client.drop_database(name)
        finally:
            dbm.close_clients()
            if proc is not None:
                proc.terminate()
                proc.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--endpoints", type=int, default=200)
    parser.add_argument("--servers", type=int, default=10)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-drift-"))
    try:
        figures = run(args.endpoints, args.servers, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
