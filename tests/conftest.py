"""Test harness: the embedded MongoDB-wire server, Pebble, and real subprocesses.

- ``mongo_base_uri`` (session): the embedded server (secantusdb) on a free port, or the
  replica set in ``CAP_TEST_MONGO_URI``.
- ``mongo_uri`` / ``settings`` / ``db`` / ``migrated_db``: a fresh database per test,
  exported as CAP_MONGO_URI for code and subprocesses.
- ``pebble`` (session) and ``start_pebble``: Debian's pebble + pebble-challtestsrv on free
  ports, with a TLS certificate generated here.
- ``procs``: starts api/worker/scheduler as subprocesses and always reaps them.

Tests under tests/unit, tests/integration and tests/e2e get the matching marker, so
``pytest -m unit`` (etc.) runs each group alone.
"""

from __future__ import annotations

import base64
import os
import secrets
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from app.config import Settings, load_settings
from devstack import embedded
from tests.helpers.pebble import Pebble, start_pebble
from tests.helpers.processes import ProcessManager, kill_all_sessions

ROOT = Path(__file__).resolve().parent.parent

# After the whole run: no private key in any database or log (tests/helpers/key_leak.py).
pytest_plugins = ["tests.helpers.key_leak"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).relative_to(ROOT / "tests").parts
        if parts and parts[0] in ("unit", "integration", "e2e", "browser"):
            item.add_marker(getattr(pytest.mark, parts[0]))


@pytest.fixture(autouse=True)
def _close_mongo_clients() -> Iterator[None]:
    """Close the clients a test's code opened (unclosed clients are warnings = errors)."""
    yield
    from app import db as dbm
    from app.jobs import broker

    broker.close_publishers()
    dbm.close_clients()


@pytest.fixture(scope="session")
def mongo_base_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    external = os.environ.get("CAP_TEST_MONGO_URI")
    if external:
        yield external
        return
    storage = tmp_path_factory.mktemp("secantus")
    proc, uri = embedded.start(storage / "data", embedded.free_port(),
                               log_path=storage / "server.log")
    _SERVER_LOG.append(storage / "server.log")
    try:
        yield uri
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def uri_with_db(base_uri: str, name: str) -> str:
    parts = urlsplit(base_uri)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, ""))


@pytest.fixture
def db_name() -> str:
    return f"cap_test_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def mongo_uri(mongo_base_uri: str, db_name: str) -> str:
    return uri_with_db(mongo_base_uri, db_name)


@pytest.fixture
def kek_dir(tmp_path: Path) -> Path:
    """A KEK directory with one version (v1), as an operator would configure it."""
    directory = tmp_path / "kek"
    directory.mkdir()
    path = directory / "v1.key"
    path.write_text(base64.b64encode(secrets.token_bytes(32)).decode() + "\n")
    path.chmod(0o600)
    return directory


@pytest.fixture
def cap_env(mongo_uri: str, db_name: str, kek_dir: Path,
            monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The CAP_* environment of this test, set in os.environ and returned for subprocesses."""
    values = {
        "CAP_MONGO_URI": mongo_uri,
        "CAP_MONGO_DB": db_name,
        "CAP_BROKER_DB": db_name + "_broker",
        "CAP_KEK_DIR": str(kek_dir),
        "CAP_LOG_FORMAT": "json",
        "CAP_LOG_LEVEL": "INFO",
        "CAP_MONGO_TIMEOUT_MS": "5000",
    }
    for key in [k for k in os.environ if k.startswith("CAP_") and k != "CAP_TEST_MONGO_URI"]:
        monkeypatch.delenv(key)
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    env = {k: v for k, v in os.environ.items()}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture
def settings(cap_env: dict[str, str]) -> Settings:
    return load_settings()


@pytest.fixture
def db(settings: Settings) -> Iterator[object]:
    from app import db as dbm

    database = dbm.get_db(settings)
    yield database
    try:
        database.client.drop_database(database.name)
        database.client.drop_database(settings.broker_db)
    except Exception:  # noqa: BLE001 - a dead server must not hide the test's own failure
        pass


@pytest.fixture
def migrated_db(db: object) -> object:
    from app.migrations import migrate

    migrate(db)  # type: ignore[arg-type]
    return db


@pytest.fixture
def jenv(cap_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """cap_env for durable-jobs tests: short leases and the test job kinds loaded."""
    from app.jobs import broker
    from tests.helpers.jobs import JOB_ENV, reset_drain

    for key, value in JOB_ENV.items():
        monkeypatch.setenv(key, value)
    cap_env.update(JOB_ENV)
    yield cap_env
    broker.close_publishers()
    reset_drain()


@pytest.fixture(scope="session")
def pebble(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pebble]:
    if not shutil.which("pebble"):
        pytest.fail("Debian's pebble is not installed: run scripts/test (it installs it)")
    instance = start_pebble(tmp_path_factory.mktemp("pebble"))
    try:
        yield instance
    finally:
        instance.stop()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                              ) -> Iterator[pytest.TestReport]:
    report = yield
    if report.when == "call":
        item.stash[_CALL_FAILED] = report.failed
    return report


_CALL_FAILED = pytest.StashKey[bool]()
_SERVER_LOG: list[Path] = []


def _tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


@pytest.fixture
def procs(tmp_path: Path, request: pytest.FixtureRequest, mongo_base_uri: str
          ) -> Iterator[ProcessManager]:
    """Subprocesses for one test; when the test fails, their log tails (and the embedded
    server's) are printed, so a CI failure shows what the processes were doing.

    Afterwards the processes still running are killed (SIGKILL: a worker's graceful stop
    takes 5-7 s, the consumer loop's 2 s poll and the pool's join, and the tests of
    graceful stops send SIGTERM themselves), and every session is killed on the server:
    a process SIGKILLed in the middle of a transaction would otherwise leave it open
    until the server's transaction lifetime (60 s) ends it, and the embedded server
    holds other writes behind it -- stalling the next test."""
    manager = ProcessManager(tmp_path / "proc-logs")
    try:
        yield manager
    finally:
        if request.node.stash.get(_CALL_FAILED, False):
            for proc in manager.procs:
                state = "alive" if proc.alive() else f"exit {proc.popen.returncode}"
                print(f"===== {proc.name} pid {proc.pid} ({state}): {proc.log_path.name}")
                print(_tail(proc.log_path))
            for path in _SERVER_LOG:
                print(f"===== embedded server: {path}")
                print(_tail(path, 30))
        manager.kill_all()
        kill_all_sessions(mongo_base_uri)


@pytest.fixture
def python() -> str:
    return sys.executable
