"""The whole CertAutoPilot stack as local processes, for the HA drills.

The embedded database, Debian Pebble (+ pebble-challtestsrv as its DNS), 3 api processes
(gunicorn) behind Debian HAProxy, 3 Celery workers and 2 schedulers. Processes are
started through the test helpers (``tests.helpers.processes``, ``tests.helpers.pebble``),
so there is one supervisor; ``Stack.close`` stops every one of them.

HAProxy listens on the port where Pebble's VA fetches HTTP-01 answers, so both the CA's
validations and the probe's API traffic go through it. Its config (generated here):

- ``be_live`` checks ``GET /healthz`` on each api (liveness: the process answers);
- ``be_ready`` checks ``GET /readyz`` (database and KEK reachable): a server whose
  readiness fails is taken out;
- requests go to ``be_ready`` while it has a server up, else to ``be_live``: when the
  database is down for every api, the api itself answers (503 with ``Retry-After``)
  instead of HAProxy's bare 503;
- connection failures and empty answers (a killed api) are retried on another server.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import random
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from devstack import embedded  # noqa: E402
from devstack.pebble import Pebble, start_pebble, unlimited_budget  # noqa: E402
from tests.helpers.processes import Proc, ProcessManager, kill_all_sessions  # noqa: E402

CERTAUTOPILOT = str(Path(sys.executable).with_name("certautopilot"))
SCAN_ENTRY = "drill.renewal_scan"
API_COUNT, WORKER_COUNT, SCHEDULER_COUNT = 3, 3, 2


class DrillError(RuntimeError):
    """A drill could not go on (a timeout, a process that did not start)."""


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def wait_until(predicate: Callable[[], Any], timeout: float, what: str,
               interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while True:
        try:
            value = predicate()
        except Exception as exc:  # noqa: BLE001 - the database may be down meanwhile
            value, last = None, exc
        else:
            last = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise DrillError(f"timed out after {timeout:.0f} s waiting for {what}"
                             + (f" (last error: {last!r})" if last else ""))
        time.sleep(interval)


HAPROXY_CFG = """\
global
    maxconn 4000
    stats socket {socket} mode 600 level admin

defaults
    mode http
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    timeout check 3s
    # A killed api: its refused connections and dropped requests go to another server.
    retries 3
    option redispatch 1
    retry-on conn-failure empty-response junk-response

frontend api
    bind 127.0.0.1:{port}
    use_backend be_ready if {{ nbsrv(be_ready) gt 0 }}
    default_backend be_live

backend be_ready
    option httpchk GET /readyz
    http-check expect status 200
{ready_servers}

backend be_live
    option httpchk GET /healthz
    http-check expect status 200
{live_servers}
"""


class Stack:
    def __init__(self, workdir: Path, *, quick: bool) -> None:
        self.workdir = workdir
        self.quick = quick
        self.pm = ProcessManager(workdir / "logs")
        self.pebble: Pebble | None = None
        self.db_proc: Proc | None = None
        self.api_ports = [embedded.free_port() for _ in range(API_COUNT)]
        self.apis: list[Proc] = []
        self.workers: list[Proc] = []
        self.schedulers: list[Proc] = []
        self.haproxy: Proc | None = None
        self.haproxy_socket = workdir / "haproxy.sock"
        self.db_port = embedded.free_port()
        self.db_dir = workdir / "db"
        self.base_uri = ""
        self.env: dict[str, str] = {}
        self.db: Any = None
        # Production defaults in full runs; shorter leases with --quick.
        self.job_lease_s = 10 if quick else 60
        self.scheduler_lease_s = 6 if quick else 15

    # --- start / stop ---------------------------------------------------------------

    def start(self) -> None:
        if not shutil.which("haproxy"):
            raise DrillError("haproxy is missing: run scripts/test (it installs Debian's "
                             "haproxy) or apt-get install haproxy")
        log("starting the embedded database and Pebble")
        self.start_database()
        self.pebble = start_pebble(self.workdir / "pebble")
        self.env = self._env()
        os.environ.update({k: v for k, v in self.env.items() if k.startswith("CAP_")})
        from app import db as dbm
        from app.config import load_settings

        self.settings = load_settings()
        self.db = dbm.get_db(self.settings)
        self.migrate()
        log("starting haproxy, 3 api, 3 workers, 2 schedulers")
        self.haproxy = self.pm.start("haproxy", ["haproxy", "-db", "-f",
                                                 str(self._write_haproxy_cfg())], self.env)
        self.apis = [self.start_api(i) for i in range(API_COUNT)]
        self.workers = [self.start_worker() for _ in range(WORKER_COUNT)]
        self.schedulers = [self.start_scheduler() for _ in range(SCHEDULER_COUNT)]
        for i in range(API_COUNT):
            self.wait_ready_behind_haproxy(i, timeout=120)
        wait_until(lambda: self.db[dbm.WORKERS].count_documents(
            {"state": "running", "pid": {"$in": [w.pid for w in self.workers]}})
            == WORKER_COUNT, 120, "3 workers heartbeating")
        wait_until(self.leader, 120, "a scheduler leading")

    def start_database(self) -> None:
        popen, self.base_uri = embedded.start(self.db_dir, self.db_port,
                                              log_path=self.workdir / "db.log",
                                              start_new_session=True)
        self.db_proc = Proc("database", popen, self.workdir / "db.log")
        self.pm.procs.append(self.db_proc)

    def close(self) -> None:
        """Stop every process this stack started (also after a failure or Ctrl-C)."""
        from app import db as dbm
        from app.jobs import broker

        log("stopping every process")
        # Roles first, so none is killed mid-transaction by the database going away.
        roles = [p for p in self.pm.procs if p is not self.db_proc]
        for proc in roles:
            if proc.alive():
                proc.terminate()
        for proc in roles:
            proc.wait_then_kill(20)
        if self.db_proc is not None:
            self.db_proc.stop(15)
        if self.pebble is not None:
            self.pebble.stop()
        broker.close_publishers()
        dbm.close_clients()

    def _env(self) -> dict[str, str]:
        assert self.pebble is not None
        kek_dir = self.workdir / "kek"
        kek_dir.mkdir(exist_ok=True)
        key = kek_dir / "v1.key"
        key.write_text(base64.b64encode(secrets.token_bytes(32)).decode() + "\n")
        key.chmod(0o600)
        name = "drills"
        # The renewal scan every 5 s instead of 60 s: drills wait less for due renewals.
        scan = {"name": SCAN_ENTRY, "every_seconds": 5, "kind": "certificates.renewal_scan"}
        env = {k: v for k, v in os.environ.items() if not k.startswith("CAP_")}
        env.update({
            "CAP_MONGO_URI": self.base_uri.replace("/?", f"/{name}?"),
            "CAP_MONGO_DB": name, "CAP_BROKER_DB": name + "_broker",
            "CAP_KEK_DIR": str(kek_dir), "CAP_LOG_FORMAT": "json", "CAP_LOG_LEVEL": "INFO",
            "CAP_MONGO_TIMEOUT_MS": "5000",
            "CAP_ACME_DIRECTORY_URL": self.pebble.directory_url,
            "CAP_ACME_CA_BUNDLE": str(self.pebble.ca_cert),
            "CAP_API_RATE_LIMIT": "off", "CAP_API_THREADS": "4",
            "CAP_JOB_LEASE_SECONDS": str(self.job_lease_s),
            "CAP_JOB_GRACE_SECONDS": "10",
            "CAP_REAPER_REPUBLISH_SECONDS": "10",
            "CAP_SCHEDULER_LEASE_SECONDS": str(self.scheduler_lease_s),
            "CAP_SCHEDULER_RENEW_SECONDS": str(self.scheduler_lease_s / 3),
            "CAP_SCHEDULER_EXTRA_ENTRIES": json.dumps([scan]),
            # Pebble has none of Let's Encrypt's limits (the default budget): 2 x 200
            # certificates under drills.test would otherwise be deferred for days. The same
            # budget as the dev stack's local CA (devstack/server.py); the pace stays.
            "CAP_CA_BUDGETS": unlimited_budget(self.pebble.directory_url),
            "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1",
        })
        return env

    def _write_haproxy_cfg(self) -> Path:
        assert self.pebble is not None

        def servers(inter: str) -> str:
            return "\n".join(f"    server api{i} 127.0.0.1:{port} check inter {inter} "
                             "fall 2 rise 2" for i, port in enumerate(self.api_ports))

        path = self.workdir / "haproxy.cfg"
        path.write_text(HAPROXY_CFG.format(socket=self.haproxy_socket,
                                           port=self.pebble.http_port,
                                           ready_servers=servers("1s"),
                                           live_servers=servers("1s")))
        return path

    # --- roles ----------------------------------------------------------------------

    def start_api(self, index: int) -> Proc:
        # SO_REUSEPORT: a replacement binds the same port before the old one stops, as a
        # new pod is ready behind the Service before the old one gets SIGTERM.
        return self.pm.api(self.env, f"127.0.0.1:{self.api_ports[index]}", workers=2,
                           extra=["--reuse-port"])

    def start_worker(self) -> Proc:
        return self.pm.worker(self.env, concurrency=2)

    def start_scheduler(self) -> Proc:
        return self.pm.scheduler(self.env)

    def migrate(self) -> None:
        self.cli("migrate", check=True)

    def cli(self, *args: str, check: bool = False, timeout: float = 600) -> tuple[int, str]:
        result = subprocess.run([CERTAUTOPILOT, *args], env=self.env, capture_output=True,
                                text=True, timeout=timeout, cwd=ROOT)
        out = (result.stdout + result.stderr).strip()
        if check and result.returncode != 0:
            raise DrillError(f"certautopilot {' '.join(args)} exited {result.returncode}: "
                             f"{out[-2000:]}")
        return result.returncode, out

    def api_url(self) -> str:
        assert self.pebble is not None
        return f"http://127.0.0.1:{self.pebble.http_port}"

    # --- HAProxy --------------------------------------------------------------------

    def haproxy_status(self) -> dict[tuple[str, str], str]:
        """(backend, server) -> status (UP, DOWN, ...) from HAProxy's stats socket."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(str(self.haproxy_socket))
            sock.sendall(b"show stat\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        text = b"".join(chunks).decode().lstrip("# ")
        return {(row["pxname"], row["svname"]): row["status"]
                for row in csv.DictReader(io.StringIO(text))}

    def wait_ready_behind_haproxy(self, index: int, timeout: float = 120) -> None:
        wait_until(lambda: self.haproxy_status().get(("be_ready", f"api{index}")) == "UP",
                   timeout, f"api{index} ready behind haproxy", interval=0.2)

    # --- scheduler lease ------------------------------------------------------------

    def lease(self) -> dict[str, Any]:
        from app import db as dbm

        return dbm.primary(self.db)[dbm.LEASES].find_one({"_id": dbm.SCHEDULER_LEASE_ID}) or {}

    def leader(self) -> Proc | None:
        holder = self.lease().get("holder") or ""
        parts = holder.split(":")
        pid = int(parts[-2]) if len(parts) >= 2 and parts[-2].isdigit() else None
        return next((p for p in self.schedulers if p.pid == pid and p.alive()), None)

    def kill_sessions(self) -> None:
        kill_all_sessions(self.base_uri)

    def random_worker(self) -> int:
        return random.randrange(len(self.workers))
