"""KEK rotation in resumable steps, and retirement of old KEK versions.

``start_rotation`` records a rotation (one running at a time: a partial unique index on
``kek_rotations.state == "running"``); from then on new keys are sealed under the target.
The scheduler leader enqueues ``kek.rotation_step`` every 10 s; each step takes the
rotation's step lease (so two steps never work at once), then re-wraps batches of DEKs
(never the keys themselves) under the target KEK until its time budget is spent.

Each batch commits in one transaction (fenced by the job's lease when run as a job): a
conditional update per record on its old ``kek_version`` and ``wrapped_dek`` (so a re-run
is a no-op and every key is re-wrapped exactly once), the rotation's progress counters,
and one audit entry. A worker killed mid-batch loses only its uncommitted batch; the next
step resumes from what is left. A record whose wrapped DEK does not authenticate (while
the old KEK's canary does) is flagged with ``rewrap_error`` and skipped, never rewritten.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from functools import partial
from typing import Any, TypeVar

from pymongo import ReturnDocument, UpdateOne
from pymongo.client_session import ClientSession
from pymongo.database import Database
from pymongo.errors import DuplicateKeyError

from app import audit
from app import db as dbm
from app.db import KEK_ROTATIONS, KEK_VERSIONS, Doc
from app.db.lease import Lease, LeaseSchema
from app.errors import ValidationFailed
from app.keys import canary, envelope
from app.keys.errors import KeyIntegrityError, KeyUnavailable, RotationConflict
from app.keys.keyring import Keyring
from app.keys.store import active_version, sealed_of

log = logging.getLogger(__name__)

T = TypeVar("T")
RunTxn = Callable[[Callable[[ClientSession], Any]], Any]

STEP_KIND = "kek.rotation_step"
STEP_LEASE_SECONDS = 30.0
STEP_BUDGET_SECONDS = 8.0
BATCH_SIZE = 200
BACKOFF_BASE_SECONDS = 10.0
BACKOFF_MAX_SECONDS = 120.0

# The rotation's step lease: the ``step_lease`` sub-document of the rotation.
STEP_LEASE = LeaseSchema(within="step_lease", holder="owner", token="token",
                         acquired_at=None, renewed_at=None)

_RECORD_FIELDS = {"_id": 1, "project_id": 1, "kek_version": 1, "dek_nonce": 1,
                  "wrapped_dek": 1, "nonce": 1, "ciphertext": 1}


def _version(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValidationFailed(f"KEK version must be a positive integer, not {value!r}",
                               errors={"version": ["positive integer"]})
    return value


def running_rotation(db: Database[Doc]) -> Doc | None:
    return dbm.retry(lambda: dbm.primary(db)[KEK_ROTATIONS].find_one({"state": "running"}),
                     what="read running KEK rotation")


def latest_rotation(db: Database[Doc]) -> Doc | None:
    return dbm.retry(lambda: dbm.primary(db)[KEK_ROTATIONS].find_one({}, sort=[("seq", -1)]),
                     what="read latest KEK rotation")


def retired_versions(db: Database[Doc]) -> list[int]:
    docs = dbm.retry(lambda: list(dbm.primary(db)[KEK_VERSIONS].find({"state": "retired"},
                                                                     {"_id": 1})),
                     what="read retired KEK versions")
    return sorted(int(d["_id"]) for d in docs)


def _in_progress(doc: Doc) -> RotationConflict:
    done = int(doc.get("rewrapped", 0))
    return RotationConflict(
        f"a KEK rotation to v{doc['target_version']} is already in progress (rotation "
        f"{doc['_id']}, started {doc['started_at']:%Y-%m-%d %H:%M:%S} UTC, {done}/"
        f"{doc.get('total', 0)} keys re-wrapped); wait until `certautopilot kek status` "
        "shows it done")


def keys_by_version(db: Database[Doc]) -> dict[int, int]:
    rows = dbm.retry(lambda: list(dbm.primary(db)[dbm.KEYS].aggregate(
        [{"$group": {"_id": "$kek_version", "n": {"$sum": 1}}}])), what="count keys per KEK")
    return {int(r["_id"]): int(r["n"]) for r in rows if isinstance(r["_id"], int)}


def start_rotation(db: Database[Doc], to_version: int, *, keyring: Keyring,
                   actor: audit.Actor) -> Doc:
    """Record a rotation to KEK ``to_version``; the scheduler's steps then re-wrap every
    DEK under another version. Refused (RotationConflict, nothing changed) while another
    rotation runs, for a version not in the keyring or retired, or when there is nothing
    to do; KeyUnavailable when a needed KEK is wrong."""
    to_version = _version(to_version)
    running = running_rotation(db)
    if running:
        raise _in_progress(running)
    if to_version not in keyring:
        raise RotationConflict(
            f"KEK v{to_version} is not in this process's keyring ({keyring.source}, versions "
            f"{', '.join(f'v{v}' for v in keyring.versions)}): install v{to_version} on every "
            "pod first")
    if to_version in retired_versions(db):
        raise RotationConflict(f"KEK v{to_version} is retired and cannot be used again")
    counts = keys_by_version(db)
    from_versions = sorted(v for v in counts if v != to_version)
    missing = [v for v in from_versions if v not in keyring]
    if missing:
        raise RotationConflict(
            "keys are sealed under KEK " + ", ".join(f"v{v}" for v in missing)
            + f" which this process's keyring ({keyring.source}) lacks: they could not be "
            "re-wrapped; install those versions too")
    canary.ensure(db, keyring, to_version, actor=actor)
    for version in from_versions:
        canary.ensure(db, keyring, version, actor=actor)
    current = active_version(db, keyring)
    total = sum(counts[v] for v in from_versions)
    if current == to_version and total == 0:
        raise RotationConflict(f"KEK v{to_version} is already active and every key uses it: "
                               "nothing to rotate")
    rotation_id = uuid.uuid4().hex

    def record(session: ClientSession) -> Doc:
        latest = db[KEK_ROTATIONS].find_one({}, {"seq": 1}, sort=[("seq", -1)],
                                            session=session)
        now = dbm.server_now(db)
        doc: Doc = {
            "_id": rotation_id, "seq": int(latest["seq"]) + 1 if latest else 1,
            "state": "running", "target_version": to_version, "previous_version": current,
            "from_versions": from_versions, "total": total, "rewrapped": 0, "failed": 0,
            "batches": 0, "started_at": now, "started_by": actor.as_doc(), "finished_at": None,
            "last_step_at": None, "last_error": None, "error_count": 0, "not_before": None,
            "step_lease": None,
        }
        db[KEK_ROTATIONS].insert_one(doc, session=session)
        audit.record(db, session, actor=actor, action="kek.rotate",
                     target=f"kek_rotation:{rotation_id}",
                     details={"target_version": to_version, "previous_version": current,
                              "from_versions": from_versions, "keys": total})
        return doc

    try:
        doc: Doc = dbm.transaction(db, record, what="record KEK rotation")
    except DuplicateKeyError:
        running = running_rotation(db)
        if running:
            raise _in_progress(running) from None
        raise RotationConflict("another KEK rotation was recorded at the same moment; "
                               "check `certautopilot kek status`") from None
    log.info("KEK rotation recorded", extra={"rotation_id": rotation_id,
                                             "target_version": to_version, "keys": total})
    return doc


def step_lease(db: Database[Doc], rotation_id: str, owner: str,
               lease_seconds: float) -> Lease:
    """The step lease of rotation ``rotation_id`` (``acquire`` it only while running)."""
    return Lease(db[KEK_ROTATIONS], {"_id": rotation_id}, owner, lease_seconds,
                 schema=STEP_LEASE, what="KEK rotation step lease")


def note_blocked(db: Database[Doc], rotation_id: str, message: str) -> float:
    """Record why the rotation cannot proceed and back off: steps before ``not_before``
    return at once (10 s, doubling per consecutive failure, at most BACKOFF_MAX_SECONDS).
    Returns the back-off in seconds."""
    now = dbm.server_now(db)
    doc = dbm.retry(lambda: db[KEK_ROTATIONS].find_one_and_update(
        {"_id": rotation_id}, {"$inc": {"error_count": 1},
                               "$set": {"last_error": message[:500], "last_step_at": now}},
        return_document=ReturnDocument.AFTER), what="note KEK rotation error")
    failures = int((doc or {}).get("error_count", 1))
    delay = min(BACKOFF_MAX_SECONDS, BACKOFF_BASE_SECONDS * 2 ** min(failures - 1, 10))
    dbm.retry(lambda: db[KEK_ROTATIONS].update_one(
        {"_id": rotation_id}, {"$set": {"not_before": now + timedelta(seconds=delay)}}),
        what="note KEK rotation back-off")
    log.warning("KEK rotation blocked", extra={"rotation_id": rotation_id, "reason": message,
                                               "retry_in_s": delay})
    return delay


def _complete(db: Database[Doc], rotation: Doc, run_txn: RunTxn,
              actor: audit.Actor) -> bool:
    rotation_id, target = rotation["_id"], rotation["target_version"]

    def finish(session: ClientSession) -> bool:
        left = db[dbm.KEYS].find_one({"kek_version": {"$ne": target},
                                      "rewrap_error.rotation_id": {"$ne": rotation_id}},
                                     {"_id": 1}, session=session)
        if left is not None:
            return False  # a key was sealed under an old version meanwhile: keep going
        now = dbm.server_now(db)
        result = db[KEK_ROTATIONS].update_one(
            {"_id": rotation_id, "state": "running"},
            {"$set": {"state": "done", "finished_at": now, "last_step_at": now,
                      "step_lease": None, "last_error": None}}, session=session)
        if result.modified_count != 1:
            return False
        current = db[KEK_ROTATIONS].find_one({"_id": rotation_id}, session=session) or {}
        audit.record(db, session, actor=actor, action="kek.rotation_complete",
                     target=f"kek_rotation:{rotation_id}",
                     details={"target_version": target,
                              "rewrapped": int(current.get("rewrapped", 0)),
                              "failed": int(current.get("failed", 0))})
        return True

    done = bool(run_txn(finish))
    if done:
        log.info("KEK rotation complete", extra={"rotation_id": rotation_id,
                                                 "target_version": target})
    return done


class StepLeaseLost(Exception):
    """Another step took the rotation's step lease (this one overran it): stop."""


def _write_batch(db: Database[Doc], session: ClientSession, *, rotation_id: str, target: int,
                 updates: list[UpdateOne], broken: list[tuple[Doc, str]], lease: Lease,
                 actor: audit.Actor) -> tuple[int, int]:
    rewrapped = 0
    if updates:
        rewrapped = db[dbm.KEYS].bulk_write(updates, ordered=False,
                                            session=session).modified_count
    now = dbm.server_now(db)
    failed = 0
    for record, reason in broken:
        failed += db[dbm.KEYS].update_one(
            {"_id": record["_id"], "kek_version": record["kek_version"],
             "wrapped_dek": record["wrapped_dek"]},
            {"$set": {"rewrap_error": {"rotation_id": rotation_id, "reason": reason,
                                       "at": now}}}, session=session).modified_count
    # Fenced by the step lease's token, which the same write renews.
    progress = db[KEK_ROTATIONS].update_one(
        {"_id": rotation_id, "state": "running", **lease.owned()},
        {"$inc": {"rewrapped": rewrapped, "failed": failed, "batches": 1},
         "$set": {"last_step_at": now, "last_error": None, "error_count": 0,
                  "not_before": None, **lease.renewal(now)}},
        session=session)
    if progress.matched_count != 1:
        raise StepLeaseLost(rotation_id)
    audit.record(db, session, actor=actor, action="kek.rewrap",
                 target=f"kek_rotation:{rotation_id}",
                 details={"target_version": target, "rewrapped": rewrapped, "failed": failed,
                          "failed_keys": [str(r["_id"]) for r, _ in broken][:50]})
    return rewrapped, failed


def run_step(db: Database[Doc], keyring: Keyring, *, owner: str,
             budget_seconds: float = STEP_BUDGET_SECONDS, batch_size: int = BATCH_SIZE,
             lease_seconds: float = STEP_LEASE_SECONDS, run_txn: RunTxn | None = None,
             check_lease: Callable[[], None] | None = None,
             actor: audit.Actor | None = None) -> Doc:
    """One step of the running rotation, if any: re-wrap batches of DEKs for up to
    ``budget_seconds``. Returns a summary (no secret). Raises KeyUnavailable when a KEK it
    needs is missing or wrong (nothing is written then; the caller retries later)."""
    actor = actor or audit.system_actor("worker")
    txn: RunTxn = run_txn or (lambda fn: dbm.transaction(db, fn, what="KEK re-wrap batch"))
    rotation = running_rotation(db)
    if rotation is None:
        return {"state": "idle"}
    rotation_id, target = rotation["_id"], int(rotation["target_version"])
    not_before = rotation.get("not_before")
    if not_before is not None and not_before > dbm.server_now(db):
        return {"state": "backing_off", "rotation_id": rotation_id,
                "until": not_before.isoformat(), "reason": rotation.get("last_error")}
    lease = step_lease(db, rotation_id, owner, lease_seconds)
    if lease.acquire(when={"state": "running"}) is None:
        return {"state": "busy", "rotation_id": rotation_id}
    summary: Doc = {"state": "running", "rotation_id": rotation_id, "target_version": target,
                    "rewrapped": 0, "failed": 0, "batches": 0}
    deadline = time.monotonic() + budget_seconds
    try:
        try:
            new_kek = keyring.aead(target)
            canary.ensure(db, keyring, target, actor=actor)
        except KeyUnavailable as exc:
            note_blocked(db, rotation_id, exc.message)
            raise
        while True:
            if check_lease is not None:
                check_lease()
            batch = dbm.retry(lambda: list(dbm.primary(db)[dbm.KEYS].find(
                {"kek_version": {"$ne": target},
                 "rewrap_error.rotation_id": {"$ne": rotation_id}},
                _RECORD_FIELDS).limit(batch_size)), what="read KEK re-wrap batch")
            if not batch:
                if _complete(db, rotation, txn, actor):
                    summary["state"] = "done"
                    break
                if time.monotonic() >= deadline:
                    break
                continue
            try:
                for version in sorted({int(r["kek_version"]) for r in batch
                                       if isinstance(r.get("kek_version"), int)}):
                    keyring.aead(version)
                    canary.ensure(db, keyring, version, actor=actor)
            except KeyUnavailable as exc:
                note_blocked(db, rotation_id, exc.message)
                raise
            updates: list[UpdateOne] = []
            broken: list[tuple[Doc, str]] = []
            for record in batch:
                key_id = str(record["_id"])
                try:
                    sealed = sealed_of(record)
                    new = envelope.rewrap(sealed, key_id=key_id,
                                          project_id=str(record["project_id"]),
                                          old_kek=keyring.aead(sealed.kek_version),
                                          new_kek=new_kek, new_version=target)
                except (envelope.DekUnwrapFailed, KeyIntegrityError):
                    broken.append((record, "wrapped DEK does not authenticate under its KEK "
                                           "(record altered)"))
                    continue
                updates.append(UpdateOne(
                    {"_id": key_id, "kek_version": sealed.kek_version,
                     "wrapped_dek": record["wrapped_dek"], "dek_nonce": record["dek_nonce"]},
                    {"$set": {"kek_version": target, "dek_nonce": new.dek_nonce,
                              "wrapped_dek": new.wrapped_dek, "rotation_id": rotation_id},
                     "$currentDate": {"rewrapped_at": True},
                     "$inc": {"rewrap_count": 1}}))
            try:
                counts = txn(partial(_write_batch, db, rotation_id=rotation_id, target=target,
                                     updates=updates, broken=broken, lease=lease,
                                     actor=actor))
            except StepLeaseLost:
                summary["state"] = "lease_lost"
                break
            summary["rewrapped"] += counts[0]
            summary["failed"] += counts[1]
            summary["batches"] += 1
            if time.monotonic() >= deadline:
                break
    finally:
        lease.release()
    return summary


def retire_version(db: Database[Doc], version: int, *, keyring: Keyring | None,
                   actor: audit.Actor) -> Doc:
    """Mark KEK ``version`` retired: it is never used again and its file may be removed.
    Refused (RotationConflict, nothing changed) while a rotation runs, for the active
    version, for a version still used by any key, and for one already retired."""
    version = _version(version)
    running = running_rotation(db)
    if running:
        raise RotationConflict(
            f"a KEK rotation to v{running['target_version']} is in progress; retire "
            f"v{version} after it is done (`certautopilot kek status`)")
    latest = latest_rotation(db)
    if latest is None and keyring is None:
        raise RotationConflict("no rotation was ever recorded and no keyring is available to "
                               "tell the active KEK version")
    active = int(latest["target_version"]) if latest else (
        keyring.lowest if keyring is not None else 0)
    if version == active:
        raise RotationConflict(f"KEK v{version} is the active version and cannot be retired; "
                               "rotate to a newer version first")
    if version in retired_versions(db):
        raise RotationConflict(f"KEK v{version} is already retired")

    def in_use(session: ClientSession | None = None) -> int:
        return db[dbm.KEYS].count_documents({"kek_version": version}, session=session)

    used = dbm.retry(in_use, what="count keys under a KEK version")
    if used:
        raise RotationConflict(
            f"KEK v{version} is still used by {used} key(s); rotate them to another version "
            f"first (`certautopilot kek rotate --to {active}`)")

    def retire(session: ClientSession) -> Doc:
        if in_use(session):
            raise RotationConflict(f"KEK v{version} came into use meanwhile; not retired")
        now = dbm.server_now(db)
        doc = db[KEK_VERSIONS].find_one_and_update(
            {"_id": version}, {"$set": {"state": "retired", "retired_at": now,
                                        "retired_by": actor.as_doc()},
                               "$setOnInsert": {"created_at": now}},
            upsert=True, return_document=ReturnDocument.AFTER, session=session)
        audit.record(db, session, actor=actor, action="kek.retire", target=f"kek:v{version}",
                     details={"kek_version": version, "active_version": active})
        return {"version": version, "state": "retired",
                "retired_at": (doc or {}).get("retired_at", now)}

    result: Doc = dbm.transaction(db, retire, what="retire KEK version")
    log.info("KEK version retired", extra={"kek_version": version})
    return result


def status(db: Database[Doc], keyring: Keyring | None = None) -> Doc:
    """Where keys stand: the active version, keys per version, retired versions, this
    process's keyring, and the latest rotation with its progress (0.0 to 1.0)."""
    counts = keys_by_version(db)
    latest = latest_rotation(db)
    active: int | None
    if latest is not None:
        active = int(latest["target_version"])
    else:
        active = keyring.lowest if keyring is not None else None
    result: Doc = {
        "active_version": active,
        "keyring": {"source": keyring.source, "versions": list(keyring.versions)}
        if keyring is not None else None,
        "keys_by_version": {str(v): n for v, n in sorted(counts.items())},
        "total_keys": sum(counts.values()),
        "retired_versions": retired_versions(db),
        "rotation": None,
    }
    if latest is not None:
        target = int(latest["target_version"])
        remaining = sum(n for v, n in counts.items() if v != target)
        total = int(latest.get("total", 0))
        failed = int(latest.get("failed", 0))
        if latest["state"] == "done":
            progress = 1.0
        else:
            denominator = max(total, remaining, 1)
            progress = min(1.0, max(0.0, (denominator - remaining) / denominator))
        result["rotation"] = {
            "id": latest["_id"], "state": latest["state"], "target_version": target,
            "previous_version": latest.get("previous_version"),
            "from_versions": latest.get("from_versions", []), "total": total,
            "rewrapped": int(latest.get("rewrapped", 0)), "failed": failed,
            "remaining": remaining, "progress": round(progress, 4),
            "started_at": latest.get("started_at"), "started_by": latest.get("started_by"),
            "finished_at": latest.get("finished_at"), "last_step_at": latest.get("last_step_at"),
            "last_error": latest.get("last_error"), "not_before": latest.get("not_before"),
        }
    return result
