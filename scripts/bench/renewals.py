#!/usr/bin/env python
"""Issuance and renewal throughput: CertAutoPilot against certbot, on the same Pebble.

One run, one Debian Pebble (``PEBBLE_VA_NOSLEEP=1``, ``PEBBLE_WFE_NONCEREJECT=0``,
pebble-challtestsrv as its DNS):

- CertAutoPilot: the embedded MongoDB-wire server, gunicorn (the HTTP-01 responder on the
  port Pebble's VA fetches), ``--workers`` Celery worker processes (default 4, one job at a
  time each). ``--count`` certificates (default 200, one name each, EC P-256) are created,
  then issued: the renewal scan (what the scheduler leader runs every 60 s; called here
  directly so the measure does not wait for the next slot) enqueues one job per
  certificate and the workers issue. Then every certificate is made due and renewed the
  same way. The clock runs from the scan to the last certificate stored.
- certbot (from PyPI, pinned in requirements/dev.txt): after CertAutoPilot's processes are
  stopped (the HTTP-01 port is free again), ``certbot certonly --standalone`` once per
  name, then one ``certbot renew --force-renewal --no-random-sleep-on-renew``.

Printed: certificates per minute for both (issued + renewed, over the time both phases
took), their ratio, and CertAutoPilot's issuance latency p50/p95: the run time of each
``certificates.issue`` job, from its claim by a worker to its completion (server clock),
i.e. what one issuance costs, without the time it waited in the queue. The last line is
one JSON object: ours_certs_per_min, certbot_certs_per_min, ratio, p50_issue_s,
p95_issue_s (plus details).

    .venv/bin/python scripts/bench/renewals.py [--count 200] [--workers 4]
                                               [--certbot-count N] [--only ours|certbot]

``--certbot-count`` measures certbot on fewer names (its rate per minute is the same; it
takes about 3 s per certificate); by default it uses ``--count``.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from app import db as dbm  # noqa: E402
from app.audit import system_actor  # noqa: E402
from app.config import load_settings  # noqa: E402
from devstack import embedded  # noqa: E402
from devstack.pebble import Pebble, start_pebble, unlimited_budget  # noqa: E402

VENV_BIN = Path(sys.executable).parent


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Procs:
    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        with open(self.log_dir / f"{name}-{len(self.procs)}.log", "ab") as out:
            proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True, cwd=ROOT)
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 20
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(5)
        self.procs.clear()


def wait_until(predicate: Any, timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def bench_ours(pebble: Pebble, workdir: Path, count: int, workers: int) -> dict[str, Any]:
    import requests

    from app.domain import accounts, certificates, projects, renewal
    from app.migrations import migrate

    port = embedded.free_port()
    db_proc, base_uri = embedded.start(workdir / "mongo", port,
                                       log_path=workdir / "mongo.log")
    procs = Procs(workdir)
    kek_dir = workdir / "kek"
    kek_dir.mkdir()
    (kek_dir / "v1.key").write_text(base64.b64encode(os.urandom(32)).decode())
    (kek_dir / "v1.key").chmod(0o600)
    name = "bench_renewals"
    uri = base_uri.replace("/?", f"/{name}?")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("CAP_")},
           "CAP_MONGO_URI": uri, "CAP_MONGO_DB": name, "CAP_BROKER_DB": name + "_broker",
           "CAP_KEK_DIR": str(kek_dir), "CAP_LOG_FORMAT": "json", "CAP_LOG_LEVEL": "WARNING",
           "CAP_ACME_DIRECTORY_URL": pebble.directory_url,
           "CAP_ACME_CA_BUNDLE": str(pebble.ca_cert), "CAP_API_RATE_LIMIT": "off",
           # Pebble has no rate limits: Let's Encrypt's default budget (50 certificates
           # per registered domain a week) would hold the benchmark back for days.
           "CAP_CA_BUDGETS": unlimited_budget(pebble.directory_url),
           "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    os.environ.update({k: v for k, v in env.items() if k.startswith("CAP_")})
    settings = load_settings()
    db = dbm.get_db(settings)
    try:
        migrate(db)
        actor = system_actor("bench")
        project_id = projects.create_project(db, name="bench", actor=actor)["_id"]
        accounts.create_account(db, project_id, {"contact": ["bench@example.test"],
                                                 "terms_agreed": True}, actor,
                                settings=settings)
        bind = f"127.0.0.1:{pebble.http_port}"
        procs.start("api", [sys.executable, "-m", "gunicorn", "-c", "python:app.gunicorn_conf",
                            "--bind", bind, "--workers", "2", "app:create_app()"], env)
        for i in range(workers):
            procs.start("worker", [sys.executable, "-m", "celery", "-A", "tasks", "worker",
                                   "--concurrency", "1", "-n", f"bench{i}@%h",
                                   "--without-gossip", "--without-mingle", "--loglevel",
                                   "WARNING"], env)

        def api_up() -> bool:
            try:
                return requests.get(f"http://{bind}/healthz", timeout=1).status_code == 200
            except requests.RequestException:
                return False

        wait_until(api_up, 60, "the api")
        wait_until(lambda: db[dbm.WORKERS].count_documents({}) >= workers, 60,
                   f"{workers} workers")
        log(f"creating {count} certificates")
        ids = [certificates.create_certificate(db, project_id,
                                               {"names": [f"c{i}.ours.bench.test"]}, actor,
                                               settings=settings)["_id"]
               for i in range(count)]

        def run_phase(label: str, issue_count: int) -> float:
            started = time.perf_counter()
            scanned = renewal.renewal_scan(db)
            log(f"{label}: scan enqueued {scanned['enqueued']} in "
                f"{time.perf_counter() - started:.2f} s ({scanned['batches']} batches)")
            if scanned["enqueued"] != count:
                raise SystemExit(f"{label}: the scan enqueued {scanned['enqueued']} of {count}")

            def done() -> bool:
                return db[dbm.CERTIFICATES].count_documents(
                    {"_id": {"$in": ids}, "issue_count": issue_count}) == count

            wait_until(done, 60 + count * 5.0, f"{label} of {count} certificates", 0.2)
            elapsed = time.perf_counter() - started
            log(f"{label}: {count} certificates in {elapsed:.1f} s")
            return elapsed

        issue_s = run_phase("issue", 1)
        db[dbm.CERTIFICATES].update_many({"_id": {"$in": ids}}, {"$set": {
            "next_renewal_at": dbm.server_now(db)}})
        renew_s = run_phase("renew", 2)
        failed = db[dbm.JOBS].count_documents({"kind": "certificates.issue",
                                               "state": {"$ne": "succeeded"}})
        runs = [(j["finished_at"] - j["started_at"]).total_seconds()
                for j in db[dbm.JOBS].find({"kind": "certificates.issue",
                                            "state": "succeeded"})]
        attempts = sum(j.get("attempts", 1) for j in db[dbm.JOBS].find(
            {"kind": "certificates.issue"}))
        orders = db[dbm.ORDERS].count_documents({})
        return {"issue_s": round(issue_s, 2), "renew_s": round(renew_s, 2),
                "certs_per_min": round(2 * count / (issue_s + renew_s) * 60, 1),
                "p50_issue_s": round(percentile(runs, 0.5), 3),
                "p95_issue_s": round(percentile(runs, 0.95), 3),
                "jobs_not_succeeded": failed, "job_attempts": attempts, "orders": orders}
    finally:
        procs.stop()
        dbm.close_clients()
        db_proc.terminate()
        try:
            db_proc.wait(10)
        except subprocess.TimeoutExpired:
            db_proc.kill()
            db_proc.wait()


def bench_certbot(pebble: Pebble, workdir: Path, count: int) -> dict[str, Any]:
    certbot = shutil.which("certbot", path=str(VENV_BIN)) or shutil.which("certbot")
    if not certbot:
        raise SystemExit("certbot is not installed: .venv/bin/pip install -r "
                         "requirements/dev.txt")
    base = workdir / "certbot"
    common = ["--config-dir", str(base / "config"), "--work-dir", str(base / "work"),
              "--logs-dir", str(base / "logs"), "--server", pebble.directory_url,
              "--non-interactive", "--agree-tos", "-m", "bench@example.test",
              "--no-random-sleep-on-renew", "--http-01-port", str(pebble.http_port),
              "--key-type", "ecdsa", "--elliptic-curve", "secp256r1"]
    env = {**os.environ, "REQUESTS_CA_BUNDLE": str(pebble.ca_cert)}

    def run(args: list[str]) -> None:
        result = subprocess.run([certbot, *args, *common], env=env, capture_output=True,
                                text=True, timeout=600)
        if result.returncode != 0:
            raise SystemExit(f"certbot {' '.join(args[:3])} failed:\n{result.stderr[-2000:]}")

    log(f"certbot: certonly --standalone for {count} names")
    started = time.perf_counter()
    for i in range(count):
        run(["certonly", "--standalone", "-d", f"c{i}.certbot.bench.test"])
    issue_s = time.perf_counter() - started
    log(f"certbot issue: {count} certificates in {issue_s:.1f} s")
    started = time.perf_counter()
    run(["renew", "--force-renewal"])
    renew_s = time.perf_counter() - started
    log(f"certbot renew: {count} certificates in {renew_s:.1f} s")
    renewed = len(list((base / "config" / "archive").glob("*/cert2.pem")))
    if renewed != count:
        raise SystemExit(f"certbot renewed {renewed} of {count}")
    return {"issue_s": round(issue_s, 2), "renew_s": round(renew_s, 2),
            "certs_per_min": round(2 * count / (issue_s + renew_s) * 60, 1), "count": count}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--certbot-count", type=int, default=None)
    parser.add_argument("--only", choices=("ours", "certbot"))
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-renewals-"))
    # Pebble rejects 5 % of good nonces by default; certbot retries a rejected nonce only
    # once and then aborts the whole run, so both clients get a Pebble that accepts them.
    pebble = start_pebble(workdir / "pebble", {"PEBBLE_WFE_NONCEREJECT": "0"})
    ours: dict[str, Any] = {}
    theirs: dict[str, Any] = {}
    try:
        if args.only != "certbot":
            ours = bench_ours(pebble, workdir, args.count, args.workers)
            log(f"CertAutoPilot: {ours}")
        if args.only != "ours":
            theirs = bench_certbot(pebble, workdir, args.certbot_count or args.count)
            log(f"certbot: {theirs}")
    finally:
        pebble.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    ours_rate = ours.get("certs_per_min")
    certbot_rate = theirs.get("certs_per_min")
    ratio = round(ours_rate / certbot_rate, 1) if ours_rate and certbot_rate else None
    if ours_rate:
        print(f"CertAutoPilot ({args.workers} workers): {ours_rate} certificates/min, "
              f"issuance p50 {ours['p50_issue_s']} s, p95 {ours['p95_issue_s']} s")
    if certbot_rate:
        print(f"certbot: {certbot_rate} certificates/min")
    if ratio:
        print(f"ratio: {ratio}x")
    print(json.dumps({"ours_certs_per_min": ours_rate, "certbot_certs_per_min": certbot_rate,
                      "ratio": ratio, "p50_issue_s": ours.get("p50_issue_s"),
                      "p95_issue_s": ours.get("p95_issue_s"), "count": args.count,
                      "workers": args.workers, "ours": ours, "certbot": theirs}))


if __name__ == "__main__":
    main()
