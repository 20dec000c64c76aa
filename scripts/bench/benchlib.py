"""What several benchmark scripts share (they run as ``python scripts/bench/X.py``, so
this directory is on ``sys.path``)."""

from __future__ import annotations

import os
import signal
import subprocess


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
