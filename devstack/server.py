"""``certautopilot dev``: the whole stack on one machine, supervised.

Starts the embedded database when CAP_MONGO_URI is unset (data under CAP_DATA_DIR, kept
between runs), creates a development KEK if none is configured, runs migrations, then
starts and supervises the api, 2 workers and 2 schedulers as child processes. A child that
dies is restarted with backoff; Ctrl-C or SIGTERM stops everything and waits for it.
"""

from __future__ import annotations

import base64
import ctypes
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from app import db as dbm
from app.config import Settings, load_settings
from app.migrations import migrate
from devstack import bootstrap, embedded
from devstack.pebble import Pebble, start_pebble, unlimited_budget

log = logging.getLogger("certautopilot.dev")

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Child pre-exec: get SIGTERM if the supervisor dies, even by kill -9."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


@dataclass
class Child:
    name: str
    argv: list[str]
    proc: subprocess.Popen[bytes] | None = None
    restarts: list[float] = field(default_factory=list)
    next_start: float = 0.0


def roles(settings: Settings) -> list[Child]:
    py = sys.executable
    children = [Child("api", [py, "-m", "gunicorn", "-c", "python:app.gunicorn_conf",
                              "--workers", "2", "app:create_app()"])]
    for i in (1, 2):
        children.append(Child(f"worker-{i}", [py, "-m", "celery", "-A", "tasks", "worker",
                                              "--concurrency", "2", "-n", f"worker{i}@%h",
                                              "--without-gossip", "--without-mingle",
                                              "--loglevel", settings.log_level]))
    for i in (1, 2):
        children.append(Child(f"scheduler-{i}", [py, "-m", "celery", "-A", "tasks", "beat",
                                                 "-S", "scheduler.MongoLeaseScheduler",
                                                 "--loglevel", settings.log_level]))
    return children


def ensure_dev_kek(data_dir: Path) -> Path:
    path = data_dir / "kek" / "v1.key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(base64.b64encode(secrets.token_bytes(32)).decode() + "\n")
    os.chmod(path, 0o600)
    return path


class Supervisor:
    def __init__(self, children: list[Child], env: dict[str, str], log_dir: Path) -> None:
        self.children = children
        self.env = env
        self.log_dir = log_dir
        self.stopping = False

    def _start(self, child: Child) -> None:
        out = open(self.log_dir / f"{child.name}.log", "ab")  # noqa: SIM115
        child.proc = subprocess.Popen(child.argv, env=self.env, stdout=out, stderr=out,
                                      start_new_session=True, preexec_fn=_die_with_parent)
        out.close()
        log.info("started %s (pid %s)", child.name, child.proc.pid)

    def start_all(self) -> None:
        for child in self.children:
            self._start(child)

    def poll(self) -> None:
        now = time.monotonic()
        for child in self.children:
            if child.proc is not None and child.proc.poll() is None:
                continue
            if child.proc is not None:
                log.warning("%s exited with %s; restarting (see %s)", child.name,
                            child.proc.returncode, self.log_dir / f"{child.name}.log")
                child.restarts = [t for t in child.restarts if now - t < 60] + [now]
                child.next_start = now + min(30.0, 0.5 * 2 ** len(child.restarts))
                child.proc = None
            if now >= child.next_start:
                self._start(child)

    def stop_all(self, grace: float = 20.0) -> None:
        for child in self.children:
            if child.proc and child.proc.poll() is None:
                child.proc.terminate()  # the role's own warm shutdown stops its children
        deadline = time.monotonic() + grace
        for child in self.children:
            if child.proc is None:
                continue
            try:
                child.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %ss; killing it", child.name, grace)
            try:
                os.killpg(child.proc.pid, signal.SIGKILL)  # stragglers in its group
            except ProcessLookupError:
                pass
            child.proc.wait()


def wait_ready(url: str, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 - localhost
                if response.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.5)
    return False


# The local CA's directory port: fixed, so the demo account stored in the (kept) database
# still names the right directory after a restart (Pebble itself forgets its accounts;
# the account is then re-registered on first use).
DEV_PEBBLE_PORT = 14000
CA_CHOICES = ("auto", "pebble", "none")


def start_local_ca(settings: Settings, data_dir: Path, ca: str, api_port: int,
                   env: dict[str, str]) -> Pebble | None:
    """Start Pebble for ``ca`` = pebble, or auto when it is installed and no directory is
    configured; point the stack at it through ``env``."""
    if ca == "none" or (ca == "auto" and ("CAP_ACME_DIRECTORY_URL" in os.environ
                                          or not shutil.which("pebble"))):
        return None
    if not shutil.which("pebble"):
        raise embedded.EmbeddedServerError("--ca pebble: Debian's pebble is not installed "
                                           "(scripts/run installs it: apt-get install pebble)")
    port = DEV_PEBBLE_PORT if not embedded.port_in_use(DEV_PEBBLE_PORT) else None
    pebble = start_pebble(data_dir / "pebble", http_port=api_port, port=port)
    env["CAP_ACME_DIRECTORY_URL"] = pebble.directory_url
    env["CAP_ACME_CA_BUNDLE"] = str(pebble.ca_cert)
    # A local test CA has none of Let's Encrypt's limits (the default budget): trying
    # fifty example.test names must not be deferred for a week. The pace stays.
    env.setdefault("CAP_CA_BUDGETS", unlimited_budget(pebble.directory_url))
    return pebble


def run_dev(settings: Settings, ca: str = "auto") -> int:
    data_dir = settings.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    log_dir = data_dir / "logs"
    log_dir.mkdir(exist_ok=True)
    env = dict(os.environ)
    db_proc = None

    host, _, port = settings.api_bind.rpartition(":")
    if embedded.port_in_use(int(port), host if host not in ("0.0.0.0", "") else "127.0.0.1"):
        print(f"certautopilot dev: port {port} is already in use (set CAP_API_BIND)",
              file=sys.stderr)
        return 2

    if not settings.mongo_uri:
        try:
            db_proc, base_uri = embedded.start(
                data_dir / "db", settings.dev_mongo_port, log_path=log_dir / "mongo.log",
                start_new_session=True, preexec_fn=_die_with_parent)
        except embedded.EmbeddedServerError as exc:
            print(f"certautopilot dev: {exc}", file=sys.stderr)
            return 2
        env["CAP_MONGO_URI"] = base_uri.replace("/?", f"/{settings.mongo_db}?")
        log.info("embedded database on 127.0.0.1:%s, data in %s", settings.dev_mongo_port,
                 data_dir / "db")
    if not (settings.kek_file or settings.kek_dir or settings.kek_command):
        kek = ensure_dev_kek(data_dir)
        env["CAP_KEK_DIR"] = str(kek.parent)
        print("\n" + "!" * 78 + "\n!! DEVELOPMENT KEK in use: " + str(kek) +
              "\n!! Anyone with this file can decrypt every private key. Never use it in"
              "\n!! production: set CAP_KEK_FILE, CAP_KEK_DIR or CAP_KEK_COMMAND.\n" +
              "!" * 78 + "\n", file=sys.stderr)

    try:
        pebble = start_local_ca(settings, data_dir, ca, int(port), env)
    except (embedded.EmbeddedServerError, RuntimeError) as exc:
        print(f"certautopilot dev: {exc}", file=sys.stderr)
        if db_proc is not None:
            db_proc.terminate()
        return 2
    env["CAP_DATA_DIR"] = str(data_dir)
    os.environ.update(env)  # domain calls below read their settings from the environment
    settings = load_settings(env)
    db = dbm.get_db(settings)
    applied = migrate(db)
    log.info("migrations applied: %s", applied or "none needed")
    token_file = bootstrap.ensure_admin_token(db, data_dir)
    if pebble is not None:
        bootstrap.ensure_demo_project(db, settings)
    env_file = bootstrap.write_env_file(data_dir, env)

    supervisor = Supervisor(roles(settings), env, log_dir)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        supervisor.stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    supervisor.start_all()
    try:
        base = f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}"
        if wait_ready(base + "/readyz"):
            local_ca = (f"  Local CA:  {pebble.directory_url} (Pebble; project "
                        f"'{bootstrap.DEMO_PROJECT}' has an account on it)\n"
                        "  Try:       .venv/bin/certautopilot certs issue --project "
                        f"{bootstrap.DEMO_PROJECT} www.example.test\n") if pebble else ""
            print(f"CertAutoPilot is up.\n  API:       {base}/\n  Dashboard: {base}/dashboard\n"
                  f"  OpenAPI:   {base}/docs\n"
                  f"  Admin token: in {token_file} (mode 0600; sign in to the dashboard "
                  "with it)\n"
                  f"{local_ca}"
                  f"  CLI:       .venv/bin/certautopilot (finds this stack through "
                  f"{env_file})\n"
                  f"  Logs:      {log_dir}/\n"
                  "Ctrl-C stops everything.", flush=True)
        else:
            print(f"the api did not become ready; see {log_dir}/api.log", file=sys.stderr)
        while not supervisor.stopping:
            supervisor.poll()
            time.sleep(0.5)
    finally:
        print("stopping...", file=sys.stderr, flush=True)
        supervisor.stop_all()
        if pebble is not None:
            pebble.stop()
        if db_proc is not None:
            db_proc.terminate()
            try:
                db_proc.wait(15)
            except subprocess.TimeoutExpired:
                db_proc.kill()
                db_proc.wait()
        dbm.close_clients()
    return 0
