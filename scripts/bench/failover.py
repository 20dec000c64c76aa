#!/usr/bin/env python
"""Scheduler failover: our Mongo-lease scheduler against RedBeat, in one run.

Each system runs as two real ``celery beat`` processes with one entry firing every
second:

- ours: ``celery -A tasks beat -S scheduler.MongoLeaseScheduler`` on the embedded
  MongoDB-wire server (defaults: lease 15 s, renew every 5 s, standby retry 2 s);
- RedBeat: ``celery beat -S redbeat.RedBeatScheduler`` on a local Redis (Debian
  ``redis-server``, installed with apt-get when missing and root, started here on a free
  port and stopped at the end), with the same lease (``redbeat_lock_timeout`` 15 s) and a
  2 s loop interval (its standby's acquire retry and its lock extension cadence).

Measured ``--rounds`` times each (default 5):

- ``kill9_failover_s``: from ``kill -9`` of the leader to the next enqueue by the standby;
- ``sigterm_failover_s``: the same after ``SIGTERM`` (the leader releases its lease);
- ``duplicate_enqueues``: after ``SIGSTOP`` of the leader for lease + 5 s (the standby
  takes over) and ``SIGCONT``: enqueues by the deposed leader after its successor's first
  enqueue, plus (ours) any slot enqueued twice over the whole run.

For ours the time the standby took the lease is reported too (``*_lease_taken_s``): the
first enqueue then waits for the entry's next 1 s slot.

An enqueue is a job committed with its ``schedule_fires`` record (ours, server clock) or a
task message published to Redis (RedBeat, stamped with the publishing pid and time by a
``before_task_publish`` hook). Every process it started is stopped at the end. The last
line printed is one JSON object ``{"ours": {...}, "redbeat": {...}}`` with the medians.

    .venv/bin/python scripts/bench/failover.py [--rounds 5] [--only ours|redbeat]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.helpers.processes import Proc  # noqa: E402 - after the path is set

LEASE_SECONDS = 15.0
ENTRY = "bench.tick"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass
class Enqueue:
    at: float  # unix time of the enqueue
    pid: int  # the beat process that enqueued
    key: str  # slot (ours) or message id (RedBeat)


@dataclass
class System:
    name: str
    workdir: Path
    beats: list[Proc] = field(default_factory=list)

    # --- to implement ---
    def argv(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        raise NotImplementedError

    def enqueues(self) -> list[Enqueue]:
        raise NotImplementedError

    def slot_duplicates(self) -> int | None:
        return None

    def lease_taken_after(self, since: float) -> float | None:
        """Seconds from ``since`` to the standby taking the lease, where it is visible."""
        return None

    def close(self) -> None:
        pass

    # --- common ---
    def start_beat(self) -> Proc:
        log_path = self.workdir / f"{self.name}-beat-{len(self.beats)}.log"
        with open(log_path, "ab") as out:
            popen = subprocess.Popen(self.argv(), env=self.env(), stdout=out,
                                     stderr=subprocess.STDOUT, cwd=self.workdir,
                                     start_new_session=True)
        beat = Proc(f"{self.name}-beat", popen, log_path)
        self.beats.append(beat)
        return beat

    def live(self) -> list[Proc]:
        return [b for b in self.beats if b.alive()]

    def stop_all(self) -> None:
        for beat in self.beats:
            beat.stop()

    def leader(self, timeout: float = 90.0) -> Proc:
        """The live beat that enqueued in the last 2 s, once it has done so 3 times in a
        row with nobody else enqueuing."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            recent = [e for e in self.enqueues() if e.at > time.time() - 3.5]
            pids = {e.pid for e in recent}
            if len(recent) >= 3 and len(pids) == 1:
                pid = pids.pop()
                for beat in self.live():
                    if beat.pid == pid:
                        return beat
            time.sleep(0.2)
        raise RuntimeError(f"{self.name}: no steady leader within {timeout}s; see {self.workdir}")

    def first_enqueue_after(self, since: float, not_pid: int, timeout: float) -> Enqueue:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [e for e in self.enqueues() if e.at > since and e.pid != not_pid]
            if found:
                return min(found, key=lambda e: e.at)
            time.sleep(0.05)
        raise RuntimeError(f"{self.name}: no enqueue by the standby within {timeout}s")

    def ensure_two(self) -> None:
        """Replace dead beats so two run, and give a new one time to start (imports,
        banner, first acquire attempt) before the next round."""
        started = False
        while len(self.live()) < 2:
            self.start_beat()
            started = True
        if started:
            time.sleep(8)


# --- ours -----------------------------------------------------------------------------------

class Ours(System):
    def __init__(self, workdir: Path) -> None:
        super().__init__("ours", workdir)
        from devstack import embedded

        self.server, base_uri = embedded.start(workdir / "db", embedded.free_port(),
                                               log_path=workdir / "mongo.log")
        self.db_name = f"bench_{uuid.uuid4().hex[:8]}"
        self.uri = base_uri.replace("/?", f"/{self.db_name}?")
        self._env = {k: v for k, v in os.environ.items() if not k.startswith("CAP_")}
        self._env.update({
            "CAP_MONGO_URI": self.uri, "CAP_MONGO_DB": self.db_name,
            "CAP_BROKER_DB": self.db_name + "_broker", "CAP_LOG_FORMAT": "json",
            "CAP_SCHEDULER_EXTRA_ENTRIES": json.dumps(
                [{"name": ENTRY, "every_seconds": 1, "kind": ENTRY}]),
            "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1",
        })
        from app import db as dbm
        from app.config import load_settings
        from app.migrations import migrate

        self.settings = load_settings(self._env)
        self.db = dbm.get_db(self.settings)
        migrate(self.db)

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "celery", "-A", "tasks", "beat", "-S",
                "scheduler.MongoLeaseScheduler", "--loglevel", "INFO"]

    def env(self) -> dict[str, str]:
        return dict(self._env)

    def enqueues(self) -> list[Enqueue]:
        from app.db.names import FIRES

        docs = self.db[FIRES].find({"entry": ENTRY}, {"fired_at": 1, "holder": 1, "slot": 1})
        return [Enqueue(d["fired_at"].timestamp(), int(d["holder"].split(":")[-2]),
                        d["slot"].isoformat()) for d in docs]

    def lease_taken_after(self, since: float) -> float | None:
        doc = self.db["leases"].find_one({"_id": "scheduler"}) or {}
        acquired = doc.get("acquired_at")
        return round(acquired.timestamp() - since, 3) if acquired else None

    def slot_duplicates(self) -> int:
        from app import db as dbm
        from app.db.names import FIRES

        jobs = Counter(d["dedupe_key"] for d in self.db[dbm.JOBS].find(
            {"kind": ENTRY}, {"dedupe_key": 1}))
        fires = Counter(d["slot"] for d in self.db[FIRES].find({"entry": ENTRY}, {"slot": 1}))
        return sum(n - 1 for n in jobs.values() if n > 1) + \
            sum(n - 1 for n in fires.values() if n > 1)

    def close(self) -> None:
        from app import db as dbm

        try:
            self.db.client.drop_database(self.db_name)
            self.db.client.drop_database(self.db_name + "_broker")
        except Exception:  # noqa: BLE001
            pass
        dbm.close_clients()
        self.server.terminate()
        try:
            self.server.wait(15)
        except subprocess.TimeoutExpired:
            self.server.kill()
            self.server.wait()


# --- RedBeat --------------------------------------------------------------------------------

REDBEAT_APP = f'''
import os
import time

from celery import Celery
from celery.signals import before_task_publish

URL = os.environ["BENCH_REDIS_URL"]
app = Celery("redbeat_bench", broker=URL)
app.conf.update(
    redbeat_redis_url=URL,
    redbeat_lock_timeout={int(LEASE_SECONDS)},
    beat_max_loop_interval=2,
    task_default_queue="bench",
    beat_schedule={{"{ENTRY}": {{"task": "{ENTRY}", "schedule": 1.0}}}},
)


@before_task_publish.connect
def stamp(headers=None, **kwargs):
    headers["bench_pid"] = os.getpid()
    headers["bench_at"] = time.time()
'''


def ensure_redis_server() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    if os.geteuid() != 0:
        raise SystemExit("redis-server is missing: install the Debian package redis-server")
    log("installing Debian redis-server")
    subprocess.run(["apt-get", "install", "-y", "-q", "redis-server"], check=True,
                   stdout=subprocess.DEVNULL)
    found = shutil.which("redis-server")
    if not found:
        raise SystemExit("redis-server still missing after apt-get install")
    return found


class RedBeat(System):
    def __init__(self, workdir: Path) -> None:
        super().__init__("redbeat", workdir)
        import redis

        from devstack import embedded

        port = embedded.free_port()
        self.redis_proc = subprocess.Popen(
            [ensure_redis_server(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(workdir), "--daemonize", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self.url = f"redis://127.0.0.1:{port}/0"
        self.client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 20
        while True:
            try:
                self.client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        (workdir / "redbeat_bench_app.py").write_text(REDBEAT_APP)
        self._enqueues: list[Enqueue] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        import redis

        client = redis.Redis.from_url(self.url)
        try:
            while not self._stop.is_set():
                try:
                    item = client.blpop(["bench"], timeout=1)
                except redis.ConnectionError:
                    return
                if item is None:
                    continue
                message = json.loads(item[1])
                headers = message.get("headers") or {}
                with self._lock:
                    self._enqueues.append(Enqueue(float(headers["bench_at"]),
                                                  int(headers["bench_pid"]),
                                                  str(headers.get("id"))))
        finally:
            client.close()

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "celery", "-A", "redbeat_bench_app", "beat", "-S",
                "redbeat.RedBeatScheduler", "--loglevel", "INFO"]

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CAP_")}
        env.update({"BENCH_REDIS_URL": self.url, "PYTHONUNBUFFERED": "1",
                    "PYTHONPATH": str(self.workdir)})
        return env

    def enqueues(self) -> list[Enqueue]:
        with self._lock:
            return list(self._enqueues)

    def close(self) -> None:
        self._stop.set()
        self._reader.join(5)
        self.client.close()
        self.redis_proc.terminate()
        try:
            self.redis_proc.wait(10)
        except subprocess.TimeoutExpired:
            self.redis_proc.kill()
            self.redis_proc.wait()


# --- rounds ---------------------------------------------------------------------------------

def failover_round(system: System, signum: int) -> tuple[float, float | None]:
    system.ensure_two()
    leader = system.leader()
    # Kill at a random moment of the leader's renewal cycle.
    time.sleep(random.uniform(0, 5))
    killed_at = time.time()
    leader.signal(signum)
    if signum == signal.SIGTERM:
        try:
            leader.popen.wait(20)
        except subprocess.TimeoutExpired:
            pass
    taken = system.first_enqueue_after(killed_at, leader.pid, timeout=90)
    if signum != signal.SIGTERM:
        leader.popen.wait(10)
    return round(taken.at - killed_at, 3), system.lease_taken_after(killed_at)


def stop_round(system: System, stop_seconds: float,
               watch_seconds: float = 8.0) -> tuple[int, bool]:
    system.ensure_two()
    leader = system.leader()
    stopped_at = time.time()
    leader.signal(signal.SIGSTOP)
    taken = system.first_enqueue_after(stopped_at, leader.pid, timeout=90)
    time.sleep(max(0.0, stopped_at + stop_seconds - time.time()))
    leader.signal(signal.SIGCONT)
    time.sleep(watch_seconds)
    late = [e for e in system.enqueues() if e.pid == leader.pid and e.at > taken.at]
    return len(late), not leader.alive()


def run(system: System, rounds: int) -> dict[str, Any]:
    system.ensure_two()
    kill9: list[float] = []
    sigterm: list[float] = []
    leases: dict[str, list[float]] = {"kill9": [], "sigterm": []}
    dups: list[int] = []
    exited: list[bool] = []
    for i in range(rounds):
        enqueued, lease_taken = failover_round(system, signal.SIGKILL)
        kill9.append(enqueued)
        if lease_taken is not None:
            leases["kill9"].append(lease_taken)
        log(f"{system.name}: kill -9 round {i + 1}: standby enqueued after {kill9[-1]}s")
    for i in range(rounds):
        enqueued, lease_taken = failover_round(system, signal.SIGTERM)
        sigterm.append(enqueued)
        if lease_taken is not None:
            leases["sigterm"].append(lease_taken)
        log(f"{system.name}: SIGTERM round {i + 1}: standby enqueued after {sigterm[-1]}s")
    for i in range(rounds):
        late, gone = stop_round(system, LEASE_SECONDS + 5)
        dups.append(late)
        exited.append(gone)
        log(f"{system.name}: SIGSTOP round {i + 1}: {late} enqueue(s) by the deposed leader"
            + ("; it then exited" if gone else "; it stayed up as the standby"))
    slot_dups = system.slot_duplicates()
    result: dict[str, Any] = {
        "kill9_failover_s": round(statistics.median(kill9), 3),
        "sigterm_failover_s": round(statistics.median(sigterm), 3),
        "duplicate_enqueues": sum(dups) + (slot_dups or 0),
        "kill9_failover_s_all": kill9,
        "sigterm_failover_s_all": sigterm,
        "deposed_leader_enqueues_per_sigstop": dups,
        "deposed_leader_exited_per_sigstop": exited,
        "lease_seconds": LEASE_SECONDS,
        "total_enqueues": len(system.enqueues()),
    }
    if slot_dups is not None:
        result["slots_enqueued_twice"] = slot_dups
    for what, values in leases.items():
        if values:  # the lease taken (before the next 1 s slot is due)
            result[f"{what}_lease_taken_s"] = round(statistics.median(values), 3)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--only", choices=["ours", "redbeat"])
    args = parser.parse_args()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-failover-") as tmp:
        for name, cls in (("ours", Ours), ("redbeat", RedBeat)):
            if args.only and args.only != name:
                continue
            workdir = Path(tmp) / name
            workdir.mkdir()
            log(f"{name}: starting")
            system = cls(workdir)
            try:
                results[name] = run(system, args.rounds)
            except Exception:
                for path in sorted(workdir.glob("*.log")):
                    sys.stderr.write(f"--- {path.name} (tail)\n")
                    sys.stderr.write(path.read_text(errors="replace")[-3000:])
                raise
            finally:
                system.stop_all()
                system.close()
            log(f"{name}: {json.dumps(results[name])}")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
