"""`certautopilot dev` (what scripts/run ends in): the whole stack up, then down clean."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from devstack.embedded import free_port
from tests.helpers import wait_for


def _pids_with_env(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker.encode() in (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture
def dev_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAP_")}
    env.update({"CAP_DATA_DIR": str(tmp_path / "data"),
                "CAP_API_BIND": f"127.0.0.1:{free_port()}",
                "CAP_DEV_MONGO_PORT": str(free_port()), "CAP_LOG_FORMAT": "json",
                "PYTHONUNBUFFERED": "1"})
    return env


def test_dev_brings_the_stack_up_and_ctrl_c_leaves_nothing_behind(dev_env, tmp_path) -> None:
    log = open(tmp_path / "dev.log", "wb")  # noqa: SIM115
    dev = subprocess.Popen([sys.executable, "-m", "devstack"], env=dev_env,
                           stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    marker = "CAP_DATA_DIR=" + dev_env["CAP_DATA_DIR"]
    try:
        url = f"http://{dev_env['CAP_API_BIND']}/readyz"
        started = time.monotonic()
        wait_for(lambda: _ready(url) or dev.poll() is not None, timeout=60,
                 message="/readyz of the dev stack")
        assert dev.poll() is None, (tmp_path / "dev.log").read_text()
        print(f"dev stack ready in {time.monotonic() - started:.1f}s")
        output = (tmp_path / "dev.log").read_text()
        assert "DEVELOPMENT KEK" in output
        kek = Path(dev_env["CAP_DATA_DIR"]) / "kek" / "v1.key"
        assert kek.stat().st_mode & 0o777 == 0o600
        wait_for(lambda: "CertAutoPilot is up" in (tmp_path / "dev.log").read_text(),
                 timeout=30, message="the ready banner")
        # api (gunicorn master + workers), 2 workers, 2 schedulers, the database, dev itself
        assert len(_pids_with_env(marker)) >= 6
        first_ten_minutes(dev_env, tmp_path)
    finally:
        os.kill(dev.pid, signal.SIGINT)  # what Ctrl-C sends to the foreground process
        dev.wait(60)
    assert dev.returncode == 0, (tmp_path / "dev.log").read_text()[-3000:]
    wait_for(lambda: not _pids_with_env(marker), timeout=15,
             message="every child of the dev stack to exit")

    # Data kept between runs: the database directory is still there for the next start.
    assert (Path(dev_env["CAP_DATA_DIR"]) / "db").is_dir()


def test_dev_refuses_a_port_in_use_with_a_clear_error(dev_env) -> None:
    host, port = dev_env["CAP_API_BIND"].split(":")
    with socket.socket() as busy:
        busy.bind((host, int(port)))
        busy.listen()
        result = subprocess.run([sys.executable, "-m", "devstack"], env=dev_env,
                                capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert f"port {port} is already in use" in result.stderr
    assert "CAP_API_BIND" in result.stderr


def first_ten_minutes(dev_env: dict[str, str], tmp_path: Path) -> None:
    """What the README's first section promises a newcomer: the banner says where the
    admin token is, and the CLI (no CAP_* exported but the data directory, which defaults
    to .certautopilot in the checkout) finds the stack and issues from the local CA."""
    data_dir = Path(dev_env["CAP_DATA_DIR"])
    banner = (tmp_path / "dev.log").read_text()
    token_file = data_dir / "admin-token"
    assert f"Admin token: in {token_file}" in banner and "/dashboard" in banner
    assert token_file.stat().st_mode & 0o777 == 0o600
    assert token_file.read_text().startswith("cap_")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAP_")}
    env["CAP_DATA_DIR"] = str(data_dir)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "app.cli", *args], env=env,
                              capture_output=True, text=True, timeout=240)

    issued = cli("certs", "issue", "--project", "demo", "www.example.test", "--json")
    assert issued.returncode == 0, issued.stderr[-2000:]
    cert = json.loads(issued.stdout)
    assert cert["status"] == "issued" and "Pebble" in cert["issuer"]
    out = tmp_path / "exported"
    exported = cli("certs", "export", cert["id"], "--out", str(out), "--key", "--yes")
    assert exported.returncode == 0, exported.stderr
    assert (out / "key.pem").stat().st_mode & 0o777 == 0o600
    assert (out / "fullchain.pem").read_text().startswith("-----BEGIN CERTIFICATE-----")
    orders = cli("orders", "list", "--certificate", cert["id"], "--json")
    assert [o["state"] for o in json.loads(orders.stdout)] == ["completed"]
    missing = cli("certs", "show", "crt_0000000000000000")
    assert missing.returncode == 1 and "not found" in missing.stderr
