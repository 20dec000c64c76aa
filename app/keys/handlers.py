"""Job handler ``kek.rotation_step``: one step of the running KEK rotation (listed in
``app.handlers``).

The scheduler leader enqueues it every 10 s (``scheduler/timed.py``); with no rotation
running it returns at once. Its batches commit through ``ctx.transaction`` (fenced by the
job's lease), it checks the lease before each batch, and it holds the rotation's step
lease for as long as its job lease, so a step of a killed worker is resumed by a later
step once that lapses. A missing or wrong KEK is not a crash: the step records the reason
on the rotation (``certautopilot kek status`` shows it), backs off, and completes with
``{"state": "blocked", "reason": ...}``; the next timed step tries again.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

from app.audit import system_actor
from app.jobs import JobContext
from app.keys import rotation
from app.keys.errors import KeyUnavailable
from app.keys.keyring import get_keyring

log = logging.getLogger(__name__)


def rotation_step(ctx: JobContext) -> dict[str, Any]:
    """Re-wrap the next batches of DEKs of the running rotation, for up to 8 s."""
    running = rotation.running_rotation(ctx.db)
    if running is None:
        return {"state": "idle"}
    try:
        # Re-read the keyring if it lacks a version this rotation needs (a newly mounted
        # v<N>.key is picked up at once, not after the cache's 30 s).
        keyring = get_keyring(ctx.settings, need_version=int(running["target_version"]))
        for version in running.get("from_versions") or []:
            if version not in keyring:
                keyring = get_keyring(ctx.settings, need_version=int(version))
    except KeyUnavailable as exc:
        rotation.note_blocked(ctx.db, running["_id"], exc.message)
        return {"state": "blocked", "rotation_id": running["_id"], "reason": exc.message}
    owner = f"{socket.gethostname()}:{os.getpid()}:{ctx.job_id}"
    try:
        return rotation.run_step(
            ctx.db, keyring, owner=owner,
            budget_seconds=min(rotation.STEP_BUDGET_SECONDS, ctx.lease_seconds / 2),
            lease_seconds=ctx.lease_seconds, run_txn=ctx.transaction,
            check_lease=ctx.check_lease, actor=system_actor("worker"))
    except KeyUnavailable as exc:  # already noted on the rotation by run_step
        return {"state": "blocked", "rotation_id": running["_id"], "reason": exc.message}
