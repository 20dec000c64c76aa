#!/usr/bin/env python
"""Durable jobs vs bare Celery tasks, on one embedded MongoDB-wire server.

    .venv/bin/python scripts/bench/jobs.py [--jobs 300] [--workers 2] [--rounds 2]

Starts the embedded server (or uses --mongo-uri), ``--workers`` worker processes
(``celery -A tasks worker --concurrency 1``) and, with the same workers and the same
broker, runs N no-op jobs through the durable path (enqueue → wake-up → claim → handler
→ fenced completion) and N bare Celery no-op tasks. Each is timed from the first
enqueue/publish to the last task finishing (a line appended to a file by Celery's
``task_postrun``, so both are measured the same way).

It also counts the MongoDB commands CertAutoPilot's own code issues per durable job
(enqueue, claim, heartbeat, completion, plus the workers' own heartbeats, reaper passes
and server-clock reads, amortised) with a ``pymongo.monitoring.CommandListener`` in the
bench process and in every worker process. kombu's publish/poll traffic goes to the
broker database and is not counted: the listener counts commands on the application
database, plus the admin-database commands only our code sends (commitTransaction,
abortTransaction, hello for the server clock).

The last line is one JSON object: durable_jobs_per_s, bare_celery_per_s, ratio,
db_commands_per_job, and details.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pymongo import monitoring  # noqa: E402

OUR_ADMIN_COMMANDS = {"commitTransaction", "abortTransaction", "hello", "isMaster",
                      "ismaster"}
BENCH_KIND = "bench.noop"
BARE_TASK = "bench.bare_noop"


class CommandCounter(monitoring.CommandListener):
    """Counts the commands sent to the application database (plus our admin commands);
    in a worker it also writes its totals to CAP_BENCH_COUNT_DIR/<pid>.json."""

    def __init__(self, app_db: str, out_dir: str | None = None) -> None:
        self.app_db = app_db
        self.out_dir = out_dir
        self.counts: collections.Counter[str] = collections.Counter()
        self.lock = threading.Lock()
        self._flusher_pid = 0

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        ours = event.database_name == self.app_db or (
            event.database_name == "admin" and event.command_name in OUR_ADMIN_COMMANDS)
        if not ours:
            return
        with self.lock:
            self.counts[event.command_name] += 1
        if self.out_dir and self._flusher_pid != os.getpid():
            self._flusher_pid = os.getpid()
            threading.Thread(target=self._flush_forever, daemon=True).start()

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass

    def snapshot(self) -> dict[str, int]:
        with self.lock:
            return dict(self.counts)

    def _flush_forever(self) -> None:
        assert self.out_dir
        path = Path(self.out_dir) / f"{os.getpid()}.json"
        while True:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.snapshot()))
            tmp.replace(path)
            time.sleep(0.2)


def _append_done(line: str) -> None:
    fd = os.open(os.environ["CAP_BENCH_DONE_FILE"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def install_worker_hooks() -> None:
    """Run in each worker (this module is its CAP_EXTRA_HANDLER_MODULES)."""
    from celery import shared_task, signals

    from app.config import load_settings
    from app.jobs import JobContext, register_handler
    from app.jobs.broker import RUN_JOB_TASK

    settings = load_settings()
    monitoring.register(CommandCounter(settings.mongo_db,
                                       os.environ.get("CAP_BENCH_COUNT_DIR")))

    @register_handler(BENCH_KIND)
    def noop(ctx: JobContext) -> None:
        return None

    @shared_task(name=BARE_TASK, ignore_result=True)
    def bare_noop() -> None:
        return None

    @signals.task_postrun.connect(weak=False)
    def done(sender: Any = None, task: Any = None, retval: Any = None, **_: Any) -> None:
        name = getattr(task, "name", "")
        if name == BARE_TASK:
            _append_done("b\n")
        elif name == RUN_JOB_TASK and retval == "succeeded":
            _append_done("d\n")


if __name__ != "__main__":
    install_worker_hooks()


# ------------------------------------------------------------------------ the bench


def _lines(path: Path, prefix: str) -> int:
    try:
        return sum(1 for line in path.read_text().splitlines() if line == prefix)
    except FileNotFoundError:
        return 0


def _wait_lines(path: Path, prefix: str, target: int, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while _lines(path, prefix) < target:
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {target} '{prefix}' completions "
                             f"(have {_lines(path, prefix)})")
        time.sleep(0.02)
    return time.monotonic()


def _worker_counts(count_dir: Path) -> collections.Counter[str]:
    total: collections.Counter[str] = collections.Counter()
    for path in count_dir.glob("*.json"):
        try:
            total.update(json.loads(path.read_text()))
        except (ValueError, FileNotFoundError):
            pass
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--mongo-uri", help="a replica set to use instead of the embedded "
                        "server (a database named cap_bench_jobs is created and dropped)")
    args = parser.parse_args()

    from devstack import embedded

    work = Path(tempfile.mkdtemp(prefix="cap-bench-jobs-"))
    server = None
    if args.mongo_uri:
        base_uri = args.mongo_uri
    else:
        server, base_uri = embedded.start(work / "db", embedded.free_port(),
                                          log_path=work / "server.log")
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(base_uri)
    uri = urlunsplit((parts.scheme, parts.netloc, "/cap_bench_jobs", parts.query, ""))
    done_file, count_dir = work / "done.txt", work / "counts"
    count_dir.mkdir()
    env = dict(os.environ, CAP_MONGO_URI=uri, CAP_MONGO_DB="cap_bench_jobs",
               CAP_BROKER_DB="cap_bench_jobs_broker", CAP_LOG_LEVEL="WARNING",
               CAP_LOG_FORMAT="json", CAP_EXTRA_HANDLER_MODULES="scripts.bench.jobs",
               CAP_BENCH_DONE_FILE=str(done_file), CAP_BENCH_COUNT_DIR=str(count_dir),
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    os.environ.update({k: v for k, v in env.items() if k.startswith("CAP_")})

    from app.config import load_settings

    settings = load_settings()
    counter = CommandCounter(settings.mongo_db)
    monitoring.register(counter)  # before the first client of this process exists

    from app import db as dbm
    from app import jobs
    from app.jobs import broker
    from app.migrations import migrate

    db = dbm.get_db(settings)
    db.client.drop_database(settings.mongo_db)
    db.client.drop_database(settings.broker_db)
    migrate(db)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for index in range(args.workers):
            log = open(work / f"worker{index}.log", "ab")  # noqa: SIM115
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "tasks", "worker", "--concurrency",
                 "1", "-n", f"bench{index}@%h", "--without-gossip", "--without-mingle",
                 "--loglevel", "WARNING"], env=env, stdout=log, stderr=subprocess.STDOUT,
                cwd=ROOT, start_new_session=True))
            log.close()
        deadline = time.monotonic() + 120
        while db[dbm.WORKERS].count_documents({"state": "running"}) < args.workers:
            if time.monotonic() > deadline:
                raise SystemExit(f"workers did not start; see {work}")
            time.sleep(0.2)
        publisher = broker._publisher(settings)

        def run_bare(n: int) -> float:
            start_lines = _lines(done_file, "b")
            started = time.monotonic()
            for _ in range(n):
                publisher.send_task(BARE_TASK, queue=broker.QUEUE)
            return _wait_lines(done_file, "b", start_lines + n, 600) - started

        def run_durable(n: int) -> tuple[float, collections.Counter[str]]:
            start_lines = _lines(done_file, "d")
            time.sleep(0.5)
            before = _worker_counts(count_dir)
            before.update(counter.snapshot())
            started = time.monotonic()
            for _ in range(n):
                jobs.enqueue(db, BENCH_KIND, {})
            elapsed = _wait_lines(done_file, "d", start_lines + n, 600) - started
            time.sleep(0.6)  # let the workers' counters flush
            after = _worker_counts(count_dir)
            after.update(counter.snapshot())
            after.subtract(before)
            return elapsed, after

        # Warm up both paths (imports, connections, first clock samples).
        run_bare(10)
        run_durable(10)
        bare_times, durable_times = [], []
        commands: collections.Counter[str] = collections.Counter()
        for round_no in range(args.rounds):
            # Alternate which goes first, so a change of load on the machine does not
            # always favour the same side.
            if round_no % 2 == 0:
                bare_times.append(run_bare(args.jobs))
            elapsed, used = run_durable(args.jobs)
            durable_times.append(elapsed)
            commands.update(used)
            if round_no % 2 == 1:
                bare_times.append(run_bare(args.jobs))
        n_total = args.jobs * args.rounds
        bare_rate = n_total / sum(bare_times)
        durable_rate = n_total / sum(durable_times)
        per_job = sum(commands.values()) / n_total
        by_name = {k: round(v / n_total, 3) for k, v in sorted(commands.items()) if v}
        print(f"bare Celery : {bare_rate:8.1f} tasks/s ({n_total} tasks, {args.workers} "
              "workers)")
        print(f"durable jobs: {durable_rate:8.1f} jobs/s  ({n_total} jobs, same workers and "
              "broker)")
        print(f"ratio durable/bare: {durable_rate / bare_rate:.2f} (target >= 0.5)")
        print(f"MongoDB commands per durable job (our code): {per_job:.2f} (target <= 6): "
              + ", ".join(f"{k} {v}" for k, v in by_name.items()))
        states = {r["_id"]: r["n"] for r in db[dbm.JOBS].aggregate(
            [{"$group": {"_id": "$state", "n": {"$sum": 1}}}])}
        result = {
            "durable_jobs_per_s": round(durable_rate, 1),
            "bare_celery_per_s": round(bare_rate, 1),
            "ratio": round(durable_rate / bare_rate, 3),
            "db_commands_per_job": round(per_job, 2),
            "db_commands_per_job_by_name": by_name,
            "jobs": n_total, "workers": args.workers, "rounds": args.rounds,
            "job_states": states,
            "server": "embedded" if server else "external",
        }
        print(json.dumps(result))
        return 0
    finally:
        for proc in procs:
            try:
                os.killpg(proc.pid, 15)
            except ProcessLookupError:
                pass
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()
        broker.close_publishers()
        dbm.close_clients()
        if server is not None:
            server.terminate()
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


if __name__ == "__main__":
    sys.exit(main())
