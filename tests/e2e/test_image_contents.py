"""The Docker image's contents, built without a Docker engine (none runs here).

The build stage of ``Dockerfile`` is replayed in a fresh virtualenv: only what its COPY
lines copy, only ``requirements/base.txt``, the project installed without its source
tree on the path. Then every role starts from that install the way the image starts it
(the final stage's ENV and CMD, an empty working directory) against the embedded
database: migrate, the api (the image's default command) answers ``/readyz``, a worker
heartbeats, a scheduler takes the lease. Test-only and GPL dev dependencies (secantusdb,
pytest) must not be in it.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from app import db as dbm
from app.db.names import SCHEDULER_LEASE_ID
from devstack.embedded import free_port
from tests.helpers import wait_for

ROOT = Path(__file__).resolve().parents[2]


def final_stage(dockerfile: str) -> tuple[dict[str, str], list[str]]:
    """ENV and CMD of the last stage."""
    stage = dockerfile.split("\nFROM ")[-1]
    env: dict[str, str] = {}
    cmd: list[str] = []
    for line in stage.splitlines():
        if line.startswith("ENV "):
            env.update(pair.split("=", 1) for pair in shlex.split(line[4:]))
        elif line.startswith("CMD "):
            cmd = json.loads(line[4:])
    return env, cmd


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A virtualenv holding what the image's build stage installs."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    context = tmp_path_factory.mktemp("context")
    for line in dockerfile.splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            *sources, _ = shlex.split(line[5:])
            for source in sources:
                assert (ROOT / source).exists(), f"Dockerfile copies {source}: missing"
                target = context / source
                target.parent.mkdir(parents=True, exist_ok=True)
                if (ROOT / source).is_dir():
                    shutil.copytree(ROOT / source, target, ignore=shutil.ignore_patterns(
                        "__pycache__", "*.pyc"))
                else:
                    shutil.copy2(ROOT / source, target)
    venv = tmp_path_factory.mktemp("image") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
           "--disable-pip-version-check"]
    subprocess.run([*pip, "-r", str(context / "requirements" / "base.txt")], check=True,
                   timeout=900, cwd=context)
    subprocess.run([*pip, "--no-deps", "."], check=True, timeout=300, cwd=context)
    return venv


def image_env(venv: Path, cap_env: dict[str, str], extra: dict[str, str]) -> dict[str, str]:
    env_lines, _ = final_stage((ROOT / "Dockerfile").read_text())
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": "/nonexistent", **env_lines}
    env.update({k: v for k, v in cap_env.items() if k.startswith("CAP_") and
                k not in ("CAP_LOG_FORMAT",)})
    env.update(extra)
    return env


def test_the_image_holds_no_test_or_dev_dependency(image: Path) -> None:
    python = str(image / "bin" / "python")
    # GPL and test tools, then the dev stack and test hooks that once lived in app/.
    for module in ("secantus", "pytest", "schemathesis", "certbot", "devstack", "tests",
                   "app.devserver", "app.embedded", "app.acme.testhooks", "app.audit.walk"):
        found = subprocess.run([python, "-c", f"import {module}"], capture_output=True,
                               cwd="/", timeout=60)
        assert found.returncode != 0, f"{module} is installed in the image"
    entry = subprocess.run([str(image / "bin" / "certautopilot"), "--help"],
                           capture_output=True, text=True, cwd="/", timeout=60)
    assert entry.returncode == 0 and "migrate" in entry.stdout
    dev = subprocess.run([str(image / "bin" / "certautopilot"), "dev"], capture_output=True,
                         text=True, cwd="/", timeout=60,
                         env={"PATH": "/usr/bin:/bin", "CAP_MONGO_URI": "mongodb://127.0.0.1:9/x"})
    assert dev.returncode == 2 and "source checkout" in dev.stderr, dev.stderr


def test_every_role_starts_from_the_image_install(image: Path, cap_env, db, procs,
                                                  tmp_path: Path) -> None:
    workdir = tmp_path / "run"  # nothing of the source tree on the path
    workdir.mkdir()
    port = free_port()
    env = image_env(image, cap_env, {"CAP_API_BIND": f"127.0.0.1:{port}",
                                     "CAP_PROBE_DIR": str(tmp_path / "probe")})
    _, cmd = final_stage((ROOT / "Dockerfile").read_text())
    assert cmd[0] == "gunicorn"

    migrate = subprocess.run([str(image / "bin" / "certautopilot"), "migrate"], env=env,
                             cwd=workdir, capture_output=True, text=True, timeout=120)
    assert migrate.returncode == 0, migrate.stderr[-2000:]

    def start(name: str, argv: list[str]):
        return procs.start(name, [str(image / "bin" / argv[0]), *argv[1:]], env,
                           cwd=workdir)

    api = start("api", [*cmd[:1], "--workers", "1", *cmd[1:]])
    worker = start("worker", ["celery", "-A", "tasks", "worker", "--concurrency", "1",
                              "--without-gossip", "--without-mingle"])
    scheduler = start("scheduler", ["celery", "-A", "tasks", "beat", "-S",
                                    "scheduler.MongoLeaseScheduler", "--schedule",
                                    str(workdir / "beat-schedule")])
    ready = wait_for(lambda: _get(f"http://127.0.0.1:{port}/readyz"), timeout=60,
                     message="the image's api ready")
    assert ready.status_code == 200, ready.text
    # The dashboard's templates and vendored assets are package data of the install.
    for path in ("/dashboard/signin", "/dashboard/static/dashboard.js",
                 "/dashboard/static/dashboard.css", "/dashboard/static/vendor/htmx.min.js",
                 "/dashboard/static/vendor/uPlot.iife.min.js",
                 "/dashboard/static/vendor/uPlot.min.css"):
        answer = _get(f"http://127.0.0.1:{port}{path}")
        assert answer is not None and answer.status_code == 200, (path, answer)
    wait_for(lambda: db[dbm.WORKERS].find_one({"state": "running"}), timeout=90,
             message="the image's worker heartbeating")
    wait_for(lambda: (db[dbm.LEASES].find_one({"_id": SCHEDULER_LEASE_ID}) or {})
             .get("holder"), timeout=60, message="the image's scheduler holding the lease")
    # The chart's exec probes run the image's own `certautopilot probe` (no database).
    for role in ("worker", "scheduler"):
        wait_for(lambda role=role: subprocess.run(
            [str(image / "bin" / "certautopilot"), "probe", role], env=env, cwd=workdir,
            capture_output=True, timeout=60).returncode == 0, timeout=90, interval=1,
            message=f"the image's {role} probe passing")
    for proc in (api, worker, scheduler):
        assert proc.alive(), proc.log()[-3000:]
        assert str(ROOT) not in proc.log(), "a role ran code from the source tree"


def _get(url: str) -> requests.Response | None:
    try:
        return requests.get(url, timeout=5)
    except requests.RequestException:
        return None
