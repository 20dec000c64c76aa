"""Start the embedded MongoDB-wire server (secantusdb) as a child process.

Used by ``certautopilot dev`` and the test fixtures. secantusdb is a dev/test dependency
(GPL-2.0) and is never in the runtime image; it is imported only to find its launcher.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pymongo
from pymongo.errors import PyMongoError


class EmbeddedServerError(RuntimeError):
    pass


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def launcher() -> list[str]:
    exe = Path(sys.executable).with_name("secantusd-py")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("secantusd-py")
    if found:
        return [found]
    raise EmbeddedServerError(
        "the embedded database (secantusdb) is not installed: run scripts/run, or "
        "`pip install -r requirements/dev.txt`, or set CAP_MONGO_URI to a replica set")


def start(storage: Path, port: int, *, log_path: Path | None = None,
          timeout: float = 30.0, **popen_kwargs: object) -> tuple[subprocess.Popen[bytes], str]:
    """Start the server on 127.0.0.1:port with data under ``storage``; wait until it
    answers; return the process and its base URI (no database, replica set secantus)."""
    if port_in_use(port):
        raise EmbeddedServerError(f"port {port} on 127.0.0.1 is already in use "
                                  "(set CAP_DEV_MONGO_PORT to another port)")
    storage.mkdir(parents=True, exist_ok=True)
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
    try:
        proc = subprocess.Popen(
            [*launcher(), "--host", "127.0.0.1", "--port", str(port), "--storage-path",
             str(storage), "--enable-test-commands", "--log-level", "WARNING"],
            stdout=out, stderr=out, **popen_kwargs,  # type: ignore[call-overload]
        )
    finally:
        if not isinstance(out, int):
            out.close()
    uri = f"mongodb://127.0.0.1:{port}/?replicaSet=secantus"
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise EmbeddedServerError(f"embedded database exited with {proc.returncode}"
                                      + (f"; see {log_path}" if log_path else ""))
        try:
            client: pymongo.MongoClient[dict[str, object]]
            with pymongo.MongoClient(uri, serverSelectionTimeoutMS=500) as client:
                client.admin.command("ping")
            return proc, uri
        except PyMongoError:
            if time.monotonic() > deadline:
                proc.kill()
                raise EmbeddedServerError("embedded database did not answer in time") from None
            time.sleep(0.1)
