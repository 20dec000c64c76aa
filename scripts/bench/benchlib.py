"""What several benchmark scripts share (they run as ``python scripts/bench/X.py``, so
this directory is on ``sys.path``)."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
from pathlib import Path


def stop(proc: subprocess.Popen[bytes] | None, grace: float, *, group: bool = False) -> None:
    """SIGTERM ``proc`` (its whole process group with ``group``: gunicorn and its
    workers), SIGKILL after ``grace`` seconds; nothing when it was never started."""
    if proc is None:
        return
    try:
        if group:
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.terminate()
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        if group:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
        proc.wait()


def database(workdir: Path) -> tuple[subprocess.Popen[bytes] | None, str]:
    """The database a benchmark runs on: ``CAP_MONGO_URI`` when set (no process to stop),
    else the embedded server started in ``workdir``."""
    external = os.environ.get("CAP_MONGO_URI")
    if external:
        return None, external
    from devstack import embedded

    return embedded.start(workdir / "db", embedded.free_port(),
                          log_path=workdir / "mongo.log")


def kek_dir(workdir: Path) -> tuple[Path, bytes]:
    """A KEK directory with one fresh version (v1), set as ``CAP_KEK_DIR`` for this
    process (a seed seals keys under it); returns it and the key."""
    directory = workdir / "kek"
    directory.mkdir()
    key = os.urandom(32)
    (directory / "v1.key").write_text(base64.b64encode(key).decode())
    (directory / "v1.key").chmod(0o600)
    os.environ["CAP_KEK_DIR"] = str(directory)
    return directory, key
