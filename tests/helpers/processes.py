"""Start CertAutoPilot roles as real subprocesses, signal them, and always reap them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def signal(self, signum: int) -> None:
        """Signal the whole process group (celery/gunicorn children included)."""
        try:
            os.killpg(self.popen.pid, signum)
        except ProcessLookupError:
            pass

    def kill9(self) -> None:
        self.signal(signal.SIGKILL)
        self.popen.wait(10)

    def terminate(self) -> None:
        """SIGTERM to the main process, as Kubernetes sends it to a container's PID 1
        (after SIGCONT to the group, in case a test stopped it). Celery and gunicorn pass
        it on to their children themselves; see tasks/worker.py."""
        self.signal(signal.SIGCONT)
        try:
            os.kill(self.popen.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM (after SIGCONT), wait up to ``grace`` seconds, then SIGKILL the group."""
        if self.alive():
            self.terminate()
        self.wait_then_kill(grace)

    def wait_then_kill(self, grace: float) -> None:
        """Wait up to ``grace`` seconds for the exit, then SIGKILL the group."""
        try:
            self.popen.wait(grace)
        except subprocess.TimeoutExpired:
            pass
        self.signal(signal.SIGKILL)
        try:
            self.popen.wait(5)
        except subprocess.TimeoutExpired:
            pass

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


class ProcessManager:
    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        self.procs: list[Proc] = []

    def start(self, name: str, argv: list[str], env: dict[str, str],
              cwd: Path | None = None) -> Proc:
        log_path = self.log_dir / f"{name}-{len(self.procs)}.log"
        with open(log_path, "ab") as out:
            popen = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd=cwd)
        proc = Proc(name, popen, log_path)
        self.procs.append(proc)
        return proc

    def worker(self, env: dict[str, str], name: str = "worker", concurrency: int = 1,
               extra: list[str] | None = None) -> Proc:
        argv = [sys.executable, "-m", "celery", "-A", "tasks", "worker", "--concurrency",
                str(concurrency), "-n", f"{name}-{len(self.procs)}@%h", "--without-gossip",
                "--without-mingle", "--loglevel", "INFO", *(extra or [])]
        return self.start(name, argv, env)

    def scheduler(self, env: dict[str, str], name: str = "scheduler") -> Proc:
        argv = [sys.executable, "-m", "celery", "-A", "tasks", "beat", "-S",
                "scheduler.MongoLeaseScheduler", "--loglevel", "INFO"]
        return self.start(name, argv, env)

    def api(self, env: dict[str, str], bind: str, workers: int = 2,
            extra: list[str] | None = None) -> Proc:
        argv = [sys.executable, "-m", "gunicorn", "-c", "python:app.gunicorn_conf", "--bind",
                bind, "--workers", str(workers), *(extra or []), "app:create_app()"]
        return self.start("api", argv, env)

    def kill_all(self) -> None:
        """SIGKILL every process group still running (a test's teardown: graceful stops
        are what the SIGTERM tests test; here they cost 5-7 s per worker)."""
        for proc in self.procs:
            if proc.alive():
                proc.signal(signal.SIGKILL)
        for proc in self.procs:
            try:
                proc.popen.wait(10)
            except subprocess.TimeoutExpired:
                pass

    def stop_all(self, grace: float = 10.0) -> None:
        for proc in self.procs:
            if proc.alive():
                proc.terminate()
        for proc in self.procs:
            proc.wait_then_kill(grace)


def kill_all_sessions(uri: str) -> None:
    """End every session on the server: a process SIGKILLed in the middle of a transaction
    would otherwise leave it open until the server's transaction lifetime (60 s) ends it,
    and the embedded server holds other writes behind it."""
    from pymongo import MongoClient

    client: MongoClient[dict[str, object]] = MongoClient(uri, serverSelectionTimeoutMS=5000)
    try:
        client.admin.command("killAllSessions", [])
    except Exception as exc:  # noqa: BLE001 - best effort; the next test still runs
        print(f"killAllSessions failed: {exc!r}")
    finally:
        client.close()
