#!/usr/bin/env python
"""API benchmark: gunicorn (the production config) on the embedded database, driven at
a fixed offered load by a separate load-generator process.

Three phases, each ``--rate`` requests/s for ``--duration`` seconds (default 100 req/s
for 30 s), one after the other:

- ``get``:   ``GET /api/v1/certificates/{id}`` (a random one of ``--certificates``)
- ``list``:  ``GET /api/v1/certificates?status=issued&name=...&limit=20`` (filtered)
- ``renew``: ``POST /api/v1/certificates/{id}/renew`` (enqueue + audit, one transaction)

The generator is open-loop: request *i* is due at ``start + i / rate`` whatever the
answers before it did, and its latency is measured from that due time, so a server that
falls behind shows it in p99 (no coordinated omission). Latency includes the client's
own overhead (Python ``http.client``, keep-alive connections, 32 sender threads).

Target: p99 ≤ 50 ms for the GET. The embedded database is a Python server sharing the
same 2 cores (NOTES.md: ~250 simple operations/s), so the renew figures mostly measure it.

    .venv/bin/python scripts/bench/api.py [--rate 100] [--duration 30]
        [--list-rate R] [--renew-rate R] [--certificates 200] [--workers N] [--threads 4]

A phase stops sending 60 s after its last request was due: requests not sent by then
count as errors ("abandoned"), so an overloaded phase still ends.

The last line printed is one JSON object: get_rps, get_p50_ms, get_p99_ms, list_p99_ms,
renew_p99_ms, errors (plus the other percentiles and the offered rate).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import queue
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchlib import database, kek_dir, stop  # noqa: E402 - this directory is sys.path[0]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, int(round(p / 100 * len(ordered) + 0.5)) - 1))
    return ordered[index]


# -- the load generator (runs in its own process) --------------------------------------

def generate(args: argparse.Namespace) -> None:
    """Open-loop load: print one JSON object with the latencies of one phase."""
    spec = json.loads(Path(args.spec).read_text())
    host, port = spec["host"], spec["port"]
    headers = {"Authorization": f"Bearer {spec['token']}", "Connection": "keep-alive"}
    ids: list[str] = spec["ids"]
    names: list[str] = spec["names"]
    rng = random.Random(7)
    total = int(args.rate * args.duration)

    def request_for(i: int) -> tuple[str, str]:
        if args.phase == "get":
            return "GET", f"/api/v1/certificates/{rng.choice(ids)}"
        if args.phase == "list":
            return "GET", f"/api/v1/certificates?status=issued&name={rng.choice(names)}&limit=20"
        return "POST", f"/api/v1/certificates/{ids[i % len(ids)]}/renew"

    plan = [request_for(i) for i in range(total)]
    slots: queue.Queue[int | None] = queue.Queue()
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    lock = threading.Lock()
    start = time.monotonic() + 0.5
    # A phase ends at most 60 s after its last request was due (bounded run time).
    give_up = start + args.duration + 60

    def sender() -> None:
        conn: http.client.HTTPConnection | None = None
        while True:
            i = slots.get()
            if i is None:
                break
            due = start + i / args.rate
            if time.monotonic() > give_up:  # overloaded: what is left is not sent
                with lock:
                    statuses["abandoned"] = statuses.get("abandoned", 0) + 1
                continue
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            method, path = plan[i]
            status = "error"
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(host, port, timeout=30)
                conn.request(method, path, headers=headers)
                response = conn.getresponse()
                response.read()
                status = str(response.status)
                if response.getheader("Connection", "").lower() == "close":
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException):
                if conn is not None:
                    conn.close()
                conn = None
            done = time.monotonic()
            with lock:
                latencies.append((done - due) * 1000)
                statuses[status] = statuses.get(status, 0) + 1
        if conn is not None:
            conn.close()

    threads = [threading.Thread(target=sender, daemon=True) for _ in range(args.senders)]
    for thread in threads:
        thread.start()
    for i in range(total):
        slots.put(i)
    for _ in threads:
        slots.put(None)
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - start
    ok = sum(n for s, n in statuses.items() if s.startswith("2"))
    print(json.dumps({
        "phase": args.phase, "rate": args.rate, "requests": total, "ok": ok,
        "statuses": statuses,
        "rps": round(ok / elapsed, 1),
        "p50_ms": round(percentile(latencies, 50), 2),
        "p90_ms": round(percentile(latencies, 90), 2),
        "p99_ms": round(percentile(latencies, 99), 2),
        "max_ms": round(max(latencies), 2) if latencies else None,
    }))


# -- the driver ---------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def seed(uri: str, name: str, count: int) -> dict[str, Any]:
    from datetime import UTC, datetime, timedelta

    from app import db as dbm
    from app.audit import system_actor
    from app.config import load_settings
    from app.domain import accounts, certificates, projects, tokens
    from app.migrations import migrate

    db = dbm.get_db(load_settings({"CAP_MONGO_URI": uri, "CAP_MONGO_DB": name}))
    migrate(db)
    actor = system_actor("bench")
    project = projects.create_project(db, name="bench", actor=actor)["_id"]
    accounts.create_account(db, project, {"directory_url": "https://127.0.0.1:1/dir",
                                          "terms_agreed": True}, actor, register=False)
    ids, names = [], []
    now = datetime.now(UTC)
    for i in range(count):
        host = f"host{i:04d}.bench.example.com"
        doc = certificates.create_certificate(db, project, {"names": [host]}, actor)
        ids.append(doc["_id"])
        names.append(host)
    # Half of them as issued (expiring at different times), as a worker leaves them.
    for i, cert_id in enumerate(ids[::2]):
        db[dbm.CERTIFICATES].update_one({"_id": cert_id}, {"$set": {
            "status": "issued", "not_before": now,
            "not_after": now + timedelta(days=30 + i % 60),
            "next_renewal_at": now + timedelta(days=20 + i % 40), "serial": f"{i:x}"}})
    _, token = tokens.create_token(db, project_id=project, scopes=["read", "write"],
                                   actor=actor, name="bench")
    dbm.close_clients()
    return {"token": token, "ids": ids, "names": names[::2]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--list-rate", type=float, default=None,
                        help="offered rate of the list phase (default: --rate)")
    parser.add_argument("--renew-rate", type=float, default=None,
                        help="offered rate of the renew phase (default: --rate)")
    parser.add_argument("--certificates", type=int, default=200)
    parser.add_argument("--workers", type=int, default=0, help="gunicorn workers "
                        "(default: the production rule, 2 per CPU + 1, at most 8)")
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--senders", type=int, default=32)
    parser.add_argument("--phases", default="get,list,renew")
    parser.add_argument("--generate", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.generate:
        generate(args)
        return

    tmp = Path(tempfile.mkdtemp(prefix="cap-bench-api-"))
    mongo = api = None
    api_log = None
    results: dict[str, dict[str, Any]] = {}
    try:
        mongo, uri = database(tmp)
        name = f"cap_bench_api_{os.getpid()}"
        kek, _ = kek_dir(tmp)  # the seed seals an ACME account key
        log(f"seeding {args.certificates} certificates")
        spec = seed(uri, name, args.certificates)
        port = free_port()
        env = {**os.environ, "CAP_MONGO_URI": uri, "CAP_MONGO_DB": name,
               "CAP_KEK_DIR": str(kek), "CAP_LOG_LEVEL": "WARNING", "CAP_LOG_FORMAT": "json",
               "CAP_API_RATE_LIMIT": "1000000/minute", "CAP_API_THREADS": str(args.threads),
               "PYTHONPATH": str(ROOT)}
        if args.workers:
            env["CAP_API_WORKERS"] = str(args.workers)
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        api_log = open(tmp / "api.log", "wb")  # noqa: SIM115 - closed in finally
        api = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "python:app.gunicorn_conf", "--bind",
             f"127.0.0.1:{port}", "--access-logfile", "/dev/null", "app:create_app()"],
            env=env, stdout=api_log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                conn.request("GET", "/readyz")
                ready = conn.getresponse().status == 200
                conn.close()
                if ready:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or api.poll() is not None:
                raise SystemExit(f"the api did not start; see {tmp / 'api.log'}")
            time.sleep(0.3)
        spec.update({"host": "127.0.0.1", "port": port})
        spec_path = tmp / "spec.json"
        spec_path.write_text(json.dumps(spec))
        for phase in args.phases.split(","):
            rate = {"list": args.list_rate, "renew": args.renew_rate}.get(phase) or args.rate
            log(f"{phase}: {rate:g} req/s for {args.duration:g} s")
            out = subprocess.run(
                [sys.executable, __file__, "--generate", "--phase", phase, "--spec",
                 str(spec_path), "--rate", str(rate), "--duration", str(args.duration),
                 "--senders", str(args.senders)],
                capture_output=True, text=True, timeout=args.duration + 180)
            if out.returncode != 0:
                raise SystemExit(f"load generator failed: {out.stderr[-2000:]}")
            results[phase] = json.loads(out.stdout.strip().splitlines()[-1])
            log(json.dumps(results[phase]))
    finally:
        stop(api, 30, group=True)
        if api_log is not None:
            api_log.close()
        stop(mongo, 10)
        shutil.rmtree(tmp, ignore_errors=True)

    def pick(phase: str, key: str) -> Any:
        return results.get(phase, {}).get(key)

    errors = sum(r["requests"] - r["ok"] for r in results.values())
    print(json.dumps({
        "offered_rps": args.rate, "duration_s": args.duration,
        "get_rps": pick("get", "rps"), "get_p50_ms": pick("get", "p50_ms"),
        "get_p90_ms": pick("get", "p90_ms"), "get_p99_ms": pick("get", "p99_ms"),
        "list_offered_rps": pick("list", "rate"), "list_rps": pick("list", "rps"),
        "list_p50_ms": pick("list", "p50_ms"),
        "list_p99_ms": pick("list", "p99_ms"),
        "renew_offered_rps": pick("renew", "rate"),
        "renew_rps": pick("renew", "rps"), "renew_p50_ms": pick("renew", "p50_ms"),
        "renew_p99_ms": pick("renew", "p99_ms"),
        "errors": errors,
    }))


if __name__ == "__main__":
    main()
