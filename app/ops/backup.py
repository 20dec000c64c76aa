"""``certautopilot backup``: every collection of the application and broker databases at
one point in time, in mongodump's layout, with a manifest (layout.py).

Consistency: all documents are read in ONE multi-document transaction with read concern
``snapshot`` on the primary, so every collection (of both databases) is read at the same
point in time while renewals, audit writes and API calls go on. Checked on both servers
we run on:

- the embedded server (secantusdb) honours a snapshot transaction (writes committed after
  its first read are invisible to it) but ignores ``atClusterTime`` on a snapshot
  *session* outside a transaction, and replaying an oplog range would need ``applyOps``
  with v2 update diffs; so the transaction is the one mechanism that is right on both;
- on a real mongod the transaction is bounded by ``transactionLifetimeLimitSeconds``
  (60 s by default): a backup that needs longer fails with a message saying so (raise the
  parameter for the backup window, or use storage-level snapshots), never a silently
  torn copy. Reads with read concern snapshot are refused on capped collections by
  mongod 5.0+, so capped collections (kombu's ``messages.broadcast`` fan-out: transient
  remote-control messages) are read right after the snapshot and marked so in the
  manifest.

Indexes and collection options are read before the snapshot (``listIndexes`` is not
allowed inside a transaction). After the read, the copy is checked the way a restore
relies on it: the audit chain head (seq, hash) read in the snapshot is the last entry
and the entries are gap-free; a server that did not keep the snapshot fails here.

Files go to a temporary directory beside ``--out`` that is renamed into place only once
everything, the manifest last, is written and fsynced: a failed or killed backup never
leaves a directory that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from bson import json_util
from pymongo import ReadPreference
from pymongo.database import Database
from pymongo.errors import OperationFailure, PyMongoError
from pymongo.read_concern import ReadConcern

from app import db as dbm
from app.audit.log import CHAIN_ID
from app.db import Doc
from app.ops.layout import (
    APP,
    BROKER,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    BackupError,
    HashingWriter,
    bson_name,
    count_documents,
    metadata_name,
)

# Application collections whose documents are not backed up, and why (TTL-only scratch,
# or a cache derived from other collections). Every other collection of both databases is
# found by listing them, so a collection added later is backed up without a change here.
SKIPPED_COLLECTIONS: dict[str, str] = {
    dbm.IDEMPOTENCY: "stored API answers kept 24 h for Idempotency-Key replays (TTL "
                     "scratch); a client retrying against a restored cluster runs its "
                     "request again instead of replaying an answer from before the restore",
    dbm.RATE_LIMITS: "per-token rate-limit windows (TTL scratch, rebuilt within a minute)",
    dbm.WORKERS: "heartbeats of the worker processes of the backed-up cluster (TTL one day)",
    dbm.METRICS_SNAPSHOTS: "the fleet-metrics snapshot, derived from certificates and jobs "
                           "and rebuilt every minute by the metrics.snapshot job (its chunks "
                           "expire in 15 min); restored, /metrics would serve the fleet of "
                           "the backup time as current until the first refresh",
}
BATCH_SIZE = 2000
Progress = Callable[[int], None]
# Server errors of a snapshot that could not be held to the end.
_SNAPSHOT_LOST = {
    251: "NoSuchTransaction", 290: "TransactionExceededLifetimeLimitSeconds",
    239: "SnapshotTooOld", 246: "SnapshotUnavailable", 112: "WriteConflict",
    43: "CursorNotFound",  # the aborted transaction took its cursor with it
}


@dataclass
class Source:
    role: str
    db_name: str
    name: str
    options: Doc
    indexes: list[Doc]
    uuid: str | None
    estimate: int
    # TTL scratch: its indexes and options are kept (a restore must recreate them, the
    # migrations that made them being recorded as applied), its documents are not.
    skip_documents: str | None = None

    @property
    def capped(self) -> bool:
        return bool(self.options.get("capped"))


@dataclass
class Plan:
    sources: list[Source]
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def estimate(self) -> int:
        return sum(s.estimate for s in self.sources)


def plan(db: Database[Doc], broker_db: str) -> Plan:
    """What will be backed up: every collection of both databases but the skipped ones,
    with its indexes and options (read now, before the snapshot)."""
    client = db.client
    result = Plan([])
    for role, name in ((APP, db.name), (BROKER, broker_db)):
        database = client.get_database(name, read_preference=ReadPreference.PRIMARY)
        infos = dbm.retry(lambda d=database: list(d.list_collections()),  # type: ignore[misc]
                          what="list collections")
        for info in sorted(infos, key=lambda i: str(i["name"])):
            cname = str(info["name"])
            if cname.startswith("system."):
                continue
            if info.get("type", "collection") != "collection":
                result.skipped[f"{name}.{cname}"] = f"a {info.get('type')}, not a collection"
                continue
            skip = SKIPPED_COLLECTIONS.get(cname) if role == APP else None
            if skip:
                result.skipped[f"{name}.{cname}"] = f"documents not backed up: {skip}"
            coll = database[cname]
            indexes = [dict(ix) for ix in dbm.retry(lambda c=coll: list(c.list_indexes()),  # type: ignore[misc]
                                                   what="list indexes")]
            ui = (info.get("info") or {}).get("uuid")
            result.sources.append(Source(
                role, name, cname, dict(info.get("options") or {}), indexes,
                ui.hex() if ui is not None and hasattr(ui, "hex") else None,
                0 if skip else int(dbm.retry(coll.estimated_document_count,
                                             what="count documents")), skip))
    return result


def _metadata(source: Source) -> bytes:
    """mongodump's ``<collection>.metadata.json``: indexes, options, name, type, uuid."""
    doc: Doc = {"indexes": source.indexes, "uuid": source.uuid or "",
                "collectionName": source.name, "type": "collection",
                "options": source.options}
    return json_util.dumps(doc, json_options=json_util.CANONICAL_JSON_OPTIONS).encode()


def check_target(out: Path) -> None:
    if out.exists():
        if not out.is_dir():
            raise BackupError(f"--out {out} exists and is not a directory")
        if any(out.iterdir()):
            raise BackupError(f"--out {out} is not empty: refusing to write a backup into it "
                              "(choose a new directory)")
    if not out.parent.is_dir():
        raise BackupError(f"the parent directory of --out {out} does not exist")


class _Dumper:
    def __init__(self, root: Path, gzipped: bool, progress: Progress | None) -> None:
        self.root = root
        self.gzipped = gzipped
        self.progress = progress
        self.files: dict[str, Doc] = {}
        self.collections: list[Doc] = []

    def _rel(self, source: Source, filename: str) -> str:
        return f"{source.db_name}/{filename}"

    def metadata(self, source: Source) -> None:
        rel = self._rel(source, metadata_name(source.name, self.gzipped))
        (self.root / source.db_name).mkdir(exist_ok=True)
        writer = HashingWriter(self.root / rel, self.gzipped)
        writer.put(_metadata(source))
        self.files[rel] = writer.close()

    def documents(self, database: Database[Doc], source: Source, session: Any,
                  in_snapshot: bool) -> int:
        rel = self._rel(source, bson_name(source.name, self.gzipped))
        writer = HashingWriter(self.root / rel, self.gzipped)
        count = 0
        try:
            cursor: Iterable[Any] = [] if source.skip_documents else \
                database[source.name].find_raw_batches({}, session=session,
                                                       batch_size=BATCH_SIZE)
            for item in cursor:
                batch = cast(bytes, item)  # a raw batch: concatenated BSON documents
                n = count_documents(batch)
                writer.put(batch)
                count += n
                if self.progress:
                    self.progress(n)
        finally:
            self.files[rel] = writer.close()
        self.collections.append({
            "db": source.role, "name": source.name, "count": count,
            "bson": rel, "metadata": self._rel(source, metadata_name(source.name,
                                                                     self.gzipped)),
            "in_snapshot": in_snapshot})
        return count


def _snapshot_read(db: Database[Doc], sources: list[Source], dumper: _Dumper) -> Doc:
    """Dump every non-capped collection in one snapshot transaction; return the audit
    head, applied migrations and consistency figures read in that same snapshot."""
    client = db.client
    with client.start_session(causal_consistency=False) as session:
        with session.start_transaction(read_concern=ReadConcern("snapshot"),
                                       read_preference=ReadPreference.PRIMARY,
                                       write_concern=dbm.MAJORITY):
            app_db = client.get_database(db.name, read_preference=ReadPreference.PRIMARY)
            head = app_db[dbm.COUNTERS].find_one({"_id": CHAIN_ID}, session=session) or {}
            applied = sorted(int(d["_id"]) for d in app_db[dbm.MIGRATIONS].find(
                {}, {"_id": 1}, session=session))
            audit_count = 0
            for source in sources:
                if source.capped:
                    continue
                database = client.get_database(source.db_name,
                                               read_preference=ReadPreference.PRIMARY)
                count = dumper.documents(database, source, session, in_snapshot=True)
                if source.role == APP and source.name == dbm.AUDIT:
                    audit_count = count
            last = app_db[dbm.AUDIT].find_one({}, {"seq": 1, "hash": 1}, sort=[("seq", -1)],
                                              session=session)
    return {"head": head, "applied": applied, "audit_count": audit_count, "last": last}


def _check_consistent(seen: Doc) -> None:
    head, last = seen["head"], seen["last"]
    head_seq = int(head.get("seq", 0)) if head else 0
    last_seq = int(last["seq"]) if last else 0
    if head_seq != last_seq or seen["audit_count"] != last_seq or \
            (last is not None and head.get("hash") != last.get("hash")):
        raise BackupError(
            f"the copy is not consistent (audit chain head seq {head_seq}, last entry seq "
            f"{last_seq}, {seen['audit_count']} entries): the server did not hold one "
            "snapshot for the whole read; nothing was kept")


def run_backup(db: Database[Doc], broker_db: str, out: Path, *, gzipped: bool = False,
               progress: Progress | None = None, the_plan: Plan | None = None,
               tool_version: str = "unknown") -> Doc:
    """Write a backup into ``out`` (absent or empty); return its manifest. ``the_plan``
    (from ``plan()``, e.g. to size a progress bar) is made here when not given."""
    out = out.absolute()
    check_target(out)
    started = time.monotonic()
    work = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        the_plan = the_plan or plan(db, broker_db)
        work.mkdir()
        dumper = _Dumper(work, gzipped, progress)
        for source in the_plan.sources:
            dumper.metadata(source)
        taken_at = dbm.server_now(db)
        try:
            seen = _snapshot_read(db, the_plan.sources, dumper)
        except OperationFailure as exc:
            if exc.code in _SNAPSHOT_LOST:
                raise BackupError(
                    f"the snapshot could not be held to the end of the backup "
                    f"({_SNAPSHOT_LOST[exc.code]}): the read took longer than the server "
                    "keeps a transaction open (transactionLifetimeLimitSeconds, 60 s by "
                    "default). Raise it for the backup window or use storage snapshots; "
                    "nothing was kept") from exc
            raise
        _check_consistent(seen)
        # Capped collections cannot be read with snapshot read concern on mongod 5.0+.
        for source in the_plan.sources:
            if source.capped:
                database = db.client.get_database(source.db_name,
                                                  read_preference=ReadPreference.PRIMARY)
                dumper.documents(database, source, None, in_snapshot=False)
        head = seen["head"]
        manifest: Doc = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "tool": "certautopilot", "tool_version": tool_version,
            "migration_version": max(seen["applied"], default=0),
            "migrations": seen["applied"],
            "created_at": taken_at.isoformat(timespec="milliseconds"),
            "consistency": "one snapshot transaction (read concern snapshot) over every "
                           "non-capped collection of both databases",
            "databases": {APP: db.name, BROKER: broker_db},
            "gzip": gzipped,
            "audit_head": {"seq": int(head.get("seq", 0)),
                           "hash": head.get("hash")} if head else None,
            "collections": dumper.collections,
            "skipped": the_plan.skipped,
            "files": dumper.files,
            "documents": sum(c["count"] for c in dumper.collections),
            "seconds": round(time.monotonic() - started, 3),
        }
        path = work / MANIFEST
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(manifest, handle, indent=2, sort_keys=True)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        _fsync_dir(work)
        for sub in work.iterdir():
            if sub.is_dir():
                _fsync_dir(sub)
        if out.exists():
            out.rmdir()  # empty (checked above); rename() wants it gone or empty
        os.rename(work, out)
        _fsync_dir(out.parent)
        return manifest
    except PyMongoError as exc:
        shutil.rmtree(work, ignore_errors=True)
        raise BackupError(f"backup failed: database error: {exc.__class__.__name__}: "
                          f"{str(exc)[:300]}; nothing was kept") from exc
    except OSError as exc:
        shutil.rmtree(work, ignore_errors=True)
        raise BackupError(f"backup failed: {exc}; nothing was kept") from exc
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
