#!/usr/bin/env python
"""Dashboard benchmark: every page at scale, through gunicorn (the production config).

Seeds ``--certificates`` certificates (default 10,000, in two projects, issued ones
expiring over 0-90 days with their sealed keys, some failing), ``--jobs`` jobs
(default 100,000 over the last 24 h: mostly succeeded, some dead, queued and running),
12 workers, a scheduler lease with its entries and a day of fires (26,000), ``--audit``
audit entries, written in bulk as the services leave them. Then signs in with an admin
token (a project token for the ``project_`` rows) and requests each page ``--rounds``
times, one request at a time, and reports p50/p99 per page. The peer in the same run is
the API's own JSON for the same data
(``/api/v1/certificates``, ``/api/v1/jobs``, ``/api/v1/status/workers``,
``/api/v1/audit``): a page should cost about what the API's JSON costs.

The fleet figures (certificates by state and days left, failing renewals, the queue,
the jobs chart) are kept by one api process (``app.dashboard.snapshot``), which loads
them once when the first dashboard request starts it, then reads only what changed: the
first request's time is ``overview_cold_ms`` and the time until the figures are shown
``figures_ready_s``; pages are measured after that.

Target: every page p99 ≤ 200 ms. The embedded database is a Python server sharing the
same 2 cores (NOTES.md), so absolute figures are pessimistic; a real mongod is faster.

    .venv/bin/python scripts/bench/dashboard.py [--certificates 10000] [--jobs 100000]
        [--rounds 30] [--peer-rounds 5] [--workers 1]

The last line printed is one JSON object: {page: {p50_ms, p99_ms, first_ms}, ..., max_p99_ms,
target_ms, overview_cold_ms, figures_ready_s, seed_s}.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchlib import database, kek_dir, stop  # noqa: E402 - this directory is sys.path[0]

TARGET_MS = 200.0


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, int(round(p / 100 * len(ordered) + 0.5)) - 1))
    return ordered[index]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _bulk(collection: Any, docs: list[dict[str, Any]], batch: int = 2000) -> None:
    for i in range(0, len(docs), batch):
        collection.insert_many(docs[i:i + batch], ordered=False)


def seed(uri: str, name: str, n_certs: int, n_jobs: int, n_audit: int,
         kek_key: bytes) -> dict[str, Any]:
    from bson import ObjectId
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from app import db as dbm
    from app import metrics_snapshot
    from app.audit import system_actor
    from app.config import load_settings
    from app.domain import accounts, projects, tokens
    from app.keys.store import build_record
    from app.migrations import migrate

    rng = random.Random(15)
    db = dbm.get_db(load_settings({"CAP_MONGO_URI": uri, "CAP_MONGO_DB": name}))
    migrate(db)
    actor = system_actor("bench")
    project_ids = [projects.create_project(db, name=f"bench{i}", actor=actor)["_id"]
                   for i in range(2)]
    account_ids = [accounts.create_account(db, p, {"directory_url": "https://127.0.0.1:1/d",
                                                   "terms_agreed": True}, actor,
                                           register=False)["_id"] for p in project_ids]
    now = dbm.server_now(db)
    certs = []
    keys = []
    kek = AESGCM(kek_key)
    for i in range(n_certs):
        p = i % 2
        host = f"host{i:05d}.bench.example.com"
        created = now - timedelta(days=90) * (1 - i / n_certs)  # spread, as made over time
        status = "issued" if i % 10 < 8 else ("pending" if i % 10 == 8 else "failed")
        doc: dict[str, Any] = {
            "_id": f"crt_{i:016x}", "project_id": project_ids[p], "name": host,
            "names": [host, f"www.{host}"], "identifiers": [{"type": "dns", "value": host}],
            "key_type": "ec256", "challenge": {"type": "http-01"},
            "account_id": account_ids[p], "profile": None,
            "renewal": {"renew_before_days": None, "use_ari": True, "reuse_key": False},
            "status": status, "version": 2, "created_at": created, "updated_at": created,
            "deleted_at": None, "next_renewal_at": now + timedelta(days=rng.uniform(0, 60)),
            "renewal_source": "lifetime", "serial": None, "not_before": None,
            "not_after": None, "issuer": None, "key_id": None, "order_id": None,
            "ari": None, "failure": None, "issue_count": 0}
        if status == "issued":
            # One sealed key per issued certificate, as issuance leaves them (the KEK
            # figures count them).
            key = build_record(os.urandom(240), key_id=f"key_{i:016x}",
                               project_id=project_ids[p], purpose="certificate",
                               key_type="ec256", fingerprint=f"{i:064x}", kek=kek,
                               kek_version=1)
            keys.append(key)
            doc.update(not_before=now - timedelta(days=10), serial=f"{i:x}",
                       not_after=now + timedelta(days=rng.uniform(0, 90)),
                       issuer="CN=Bench CA", issue_count=1, key_id=key["_id"])
        if status == "failed" or i % 97 == 0:
            doc["failure"] = {"count": 2, "last_failed_at": now - timedelta(minutes=i % 600),
                              "last_error": {"type": "urn:ietf:params:acme:error:dns",
                                             "detail": f"NXDOMAIN looking up A for {host}"},
                              "next_attempt_at": now + timedelta(hours=2)}
            doc["renewal_source"] = "backoff"
        certs.append(doc)
    _bulk(db[dbm.CERTIFICATES], certs)
    _bulk(db[dbm.KEYS], keys)
    log(f"  {n_certs} certificates, {len(keys)} keys")

    kinds = ["certificates.issue", "certificates.renewal_scan", "audit.forward",
             "keys.rotation_step"]
    workers = [f"celery@worker{i:02d}" for i in range(12)]
    jobs = []
    for i in range(n_jobs):
        created = now - timedelta(seconds=rng.uniform(0, 86400))
        roll = rng.random()
        state = ("succeeded" if roll < 0.9 else "dead" if roll < 0.93 else
                 "queued" if roll < 0.98 else "running" if roll < 0.99 else "cancelled")
        kind = kinds[0] if i % 3 else rng.choice(kinds)
        cert = certs[i % n_certs] if kind == kinds[0] else None
        worker = rng.choice(workers)
        finished = created + timedelta(seconds=rng.uniform(0.1, 30))
        job: dict[str, Any] = {
            "_id": str(ObjectId()), "kind": kind,
            "payload": {"certificate_id": cert["_id"], "reason": "renewal"} if cert else {},
            "state": state, "dedupe_key": None,
            "project_id": cert["project_id"] if cert else None, "attempts": 1,
            "max_attempts": 5, "run_after": created, "wake_at": created,
            "created_at": created, "updated_at": finished, "started_at": created,
            "finished_at": finished if state in ("succeeded", "dead") else None,
            "lease": {"owner": worker, "expires_at": finished, "claimed_at": created},
            "result": {"ok": True} if state == "succeeded" else None,
            "last_error": "urn:ietf:params:acme:error:dns: NXDOMAIN" if state == "dead"
            else None,
            "history": [{"at": created, "event": "enqueued"},
                        {"at": created, "event": "claimed", "worker": worker}]}
        if state == "queued":
            job.update(lease=None, started_at=None, attempts=0)
        jobs.append(job)
    _bulk(db[dbm.JOBS], jobs)
    log(f"  {n_jobs} jobs")

    db[dbm.WORKERS].insert_many([{
        "_id": w, "host": w.split("@")[1], "pid": 1000 + i, "version": "0.1.0",
        "pool": "prefork", "concurrency": 2, "state": "running", "running_jobs": [],
        "started_at": now - timedelta(hours=3), "last_seen": now,
        "expires_at": now + timedelta(days=1)} for i, w in enumerate(workers)])
    db[dbm.LEASES].insert_one({"_id": "scheduler", "holder": "beat@sched0", "term": 7,
                               "expires_at": now + timedelta(days=1), "renewed_at": now,
                               "acquired_at": now - timedelta(hours=1)})
    db[dbm.SCHEDULE].insert_many([{
        "_id": kind, "definition": {"kind": kind, "every_seconds": 60}, "source": "static",
        "next_run_at": now + timedelta(seconds=30), "last_run_at": now,
        "total_run_count": 500, "last_term": 7, "last_holder": "beat@sched0",
        "last_job_id": jobs[0]["_id"]} for kind in kinds[1:]])
    # A day of timed slots, as the scheduler leaves them (scheduler/timed.py: ~26,000).
    fires = [{"entry": kinds[1 + i % 3], "slot": now - timedelta(seconds=3.3 * i),
              "dedupe_key": f"{kinds[1 + i % 3]}@{i}", "kind": kinds[1 + i % 3], "term": 7,
              "holder": "beat@sched0", "job_id": str(ObjectId()),
              "fired_at": now - timedelta(seconds=3.3 * i)} for i in range(26_000)]
    _bulk(db[dbm.FIRES], fires)
    log(f"  {len(fires)} schedule fires")
    # Numbered after the entries the seeding wrote, with the chain head moved past them
    # as sealing leaves it: the log is gap-free from 1 to the head (the audit pages read
    # seq windows below the head).
    from app.audit.log import CHAIN_ID

    first = int((db[dbm.COUNTERS].find_one({"_id": CHAIN_ID}) or {}).get("seq", 0)) + 1
    audit = [{"seq": first + i, "time": now - timedelta(seconds=n_audit - i),
              "actor": {"kind": "token", "id": "tok_bench"}, "action": "certificate.update",
              "target": f"certificate:{certs[i % n_certs]['_id']}",
              "project_id": certs[i % n_certs]["project_id"], "details": {"n": i},
              "request_id": None, "prev_hash": "x", "hash": "y"} for i in range(n_audit)]
    _bulk(db[dbm.AUDIT], audit)
    db[dbm.COUNTERS].update_one({"_id": CHAIN_ID},
                                {"$set": {"seq": first + n_audit - 1, "hash": "y"}},
                                upsert=True)
    log(f"  {n_audit} audit entries")
    _, admin = tokens.create_token(db, project_id=None, scopes=["admin"], actor=actor,
                                   name="bench-admin")
    _, project_token = tokens.create_token(db, project_id=project_ids[0], scopes=["read"],
                                           actor=actor, name="bench-project")
    dead_job = next(j["_id"] for j in jobs if j["state"] == "dead")
    # The fleet-metrics snapshot, as the scheduler's metrics.snapshot job builds it every
    # minute: /api/v1/status/workers takes its finished-job counts from it.
    built = metrics_snapshot.refresh(db)
    log(f"  metrics snapshot built in {built['build_seconds']} s")
    dbm.close_clients()
    return {"admin": admin, "project": project_token, "cert": certs[0]["_id"],
            "job": dead_job, "kind": kinds[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--certificates", type=int, default=10_000)
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--audit", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--peer-rounds", type=int, default=5,
                        help="rounds of each API peer request")
    parser.add_argument("--workers", type=int, default=1, help="gunicorn workers")
    args = parser.parse_args()

    import requests

    tmp = Path(tempfile.mkdtemp(prefix="cap-bench-dash-"))
    mongo = api = None
    api_log = None
    results: dict[str, Any] = {}
    try:
        mongo, uri = database(tmp)
        name = f"cap_bench_dash_{os.getpid()}"
        kek, kek_key = kek_dir(tmp)
        log(f"seeding {args.certificates} certificates, {args.jobs} jobs")
        started = time.monotonic()
        spec = seed(uri, name, args.certificates, args.jobs, args.audit, kek_key)
        seed_s = time.monotonic() - started
        port = free_port()
        env = {**os.environ, "CAP_MONGO_URI": uri, "CAP_MONGO_DB": name,
               "CAP_KEK_DIR": str(kek), "CAP_LOG_LEVEL": "WARNING", "CAP_LOG_FORMAT": "json",
               "CAP_API_RATE_LIMIT": "off", "CAP_API_WORKERS": str(args.workers),
               "PYTHONPATH": str(ROOT)}
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        api_log = open(tmp / "api.log", "wb")  # noqa: SIM115 - closed in finally
        api = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "python:app.gunicorn_conf", "--bind",
             f"127.0.0.1:{port}", "--access-logfile", "/dev/null", "app:create_app()"],
            env=env, stdout=api_log, stderr=subprocess.STDOUT, start_new_session=True)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            try:
                if requests.get(base + "/healthz", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline or api.poll() is not None:
                raise SystemExit(f"the api did not start; see {tmp / 'api.log'}")
            time.sleep(0.3)

        def session_for(token: str) -> requests.Session:
            s = requests.Session()
            r = s.post(base + "/dashboard/signin", data={"token": token},
                       allow_redirects=False, timeout=30)
            assert r.status_code == 302, r.text[:300]
            return s

        admin, project = session_for(spec["admin"]), session_for(spec["project"])
        bearer = {"Authorization": f"Bearer {spec['admin']}"}
        soon = (datetime.now(UTC) + timedelta(days=7)).date().isoformat()
        t0 = time.perf_counter()
        first = admin.get(base + "/dashboard/", timeout=120)
        cold_ms = (time.perf_counter() - t0) * 1000
        assert first.status_code == 200, first.text[:300]
        # The keeper loads the figures once (every certificate, the active jobs, 6 h of
        # finished jobs); pages are measured once they are shown.
        text = first.text
        while 'id="figures-pending"' in text:
            if time.perf_counter() - t0 > 600:
                raise SystemExit("the dashboard figures were not ready after 600 s")
            time.sleep(0.5)
            text = admin.get(base + "/dashboard/", timeout=120).text
        ready_s = time.perf_counter() - t0
        log(f"figures ready after {ready_s:.1f} s (first request {cold_ms:.0f} ms)")
        pages: dict[str, tuple[requests.Session, str, dict[str, str]]] = {
            "overview": (admin, "/dashboard/", {}),
            "chart_json": (admin, "/dashboard/throughput.json", {}),
            "certificates": (admin, "/dashboard/certificates", {}),
            "certificates_search_name": (admin, "/dashboard/certificates?name="
                                                "host00123.bench.example.com", {}),
            "certificates_search_prefix": (admin, "/dashboard/certificates?name=host0012*",
                                           {}),
            "certificates_state_failed": (admin, "/dashboard/certificates?state=failed", {}),
            "certificates_expiring": (admin, f"/dashboard/certificates?state=issued"
                                             f"&expiring_before={soon}", {}),
            "certificate_page": (admin, f"/dashboard/certificates/{spec['cert']}", {}),
            "jobs": (admin, "/dashboard/jobs", {}),
            "jobs_dead": (admin, "/dashboard/jobs?state=dead", {}),
            "jobs_kind": (admin, f"/dashboard/jobs?kind={spec['kind']}", {}),
            "job_page": (admin, f"/dashboard/jobs/{spec['job']}", {}),
            "workers": (admin, "/dashboard/workers", {}),
            "scheduler": (admin, "/dashboard/scheduler", {}),
            "audit": (admin, "/dashboard/audit", {}),
            "audit_action": (admin, "/dashboard/audit?action=certificate.", {}),
            "project_overview": (project, "/dashboard/", {}),
            "project_certificates": (project, "/dashboard/certificates", {}),
            # The peer: the API's JSON for the same lists and status.
            "api_certificates": (requests.Session(), "/api/v1/certificates?limit=50", bearer),
            "api_jobs": (requests.Session(), "/api/v1/jobs?limit=50", bearer),
            "api_jobs_dead": (requests.Session(), "/api/v1/jobs?state=dead&limit=50", bearer),
            "api_status_workers": (requests.Session(), "/api/v1/status/workers", bearer),
            "api_audit": (requests.Session(), "/api/v1/audit?limit=50", bearer),
        }
        for page, (client, path, headers) in pages.items():
            times = []
            # The API's unbounded sorted lists take seconds each on the embedded server:
            # a few rounds tell the difference.
            rounds = args.peer_rounds if page.startswith("api_") else args.rounds
            # One request first, reported apart (``first_ms``): this process compiles
            # the page's template and learns its list's window span once.
            t0 = time.perf_counter()
            client.get(base + path, headers=headers, timeout=60)
            first_ms = (time.perf_counter() - t0) * 1000
            for _ in range(rounds):
                t0 = time.perf_counter()
                response = client.get(base + path, headers=headers, timeout=60)
                times.append((time.perf_counter() - t0) * 1000)
                if response.status_code != 200:
                    raise SystemExit(f"{page}: {response.status_code} {response.text[:300]}")
            if page.startswith("certificates_search"):
                assert re.search(r"host0012\d\.bench", response.text), "search found nothing"
            results[page] = {"p50_ms": round(percentile(times, 50), 1),
                             "p99_ms": round(percentile(times, 99), 1),
                             "first_ms": round(first_ms, 1)}
            log(f"{page:28s} p50 {results[page]['p50_ms']:7.1f} ms   "
                f"p99 {results[page]['p99_ms']:7.1f} ms")
    finally:
        stop(api, 30, group=True)
        if api_log is not None:
            api_log.close()
        stop(mongo, 10)
        shutil.rmtree(tmp, ignore_errors=True)

    dashboard = {k: v for k, v in results.items() if not k.startswith("api_")}
    summary = {**results, "max_p99_ms": max(v["p99_ms"] for v in dashboard.values()),
               "target_ms": TARGET_MS, "overview_cold_ms": round(cold_ms, 1),
               "figures_ready_s": round(ready_s, 1),
               "seed_s": round(seed_s, 1), "seed_certificates": args.certificates,
               "seed_jobs": args.jobs, "rounds": args.rounds}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
