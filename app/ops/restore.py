"""``certautopilot restore``: check a backup completely, then load it into empty
databases, then bring its schema up to this code's.

Order (nothing is written before step 4):

1. read the backup: with a ``manifest.json``, every file's SHA-256 and size must match
   and no unlisted dump file may be present; without one (plain mongodump output), every
   BSON file is parsed end to end, and what cannot be verified is said;
2. the schema: a backup with a migration this code does not know is from newer code and
   is refused (restore it with that version, then downgrade is not supported);
3. the target: the application database must hold no data (a database holding only what
   ``migrate`` or a started scheduler writes counts as empty) unless ``--drop``;
4. drop the target databases (``--drop``, or bookkeeping only), record the restore as
   running in ``restores``, create each collection with its options, load documents as
   raw BSON (never decoded), build the indexes, then run the migrations the backup lacks,
   audit ``ops.restore`` and mark the restore complete with the manifest's figures
   (``certautopilot dr-test`` compares the chain head against them).

A restore that fails in step 4 leaves its ``restores`` record ``running``: run it again
with ``--drop``.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bson
from bson import json_util
from bson.raw_bson import RawBSONDocument
from pymongo.database import Database
from pymongo.errors import PyMongoError

from app import audit
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
    iter_raw_documents,
    read_bytes,
    sha256_file,
)

Progress = Callable[[int], None]
INSERT_BATCH_DOCS = 1000
INSERT_BATCH_BYTES = 8 * 1024 * 1024
# One builder beside the loads: on the embedded server two builds at once contended for
# its lock (benchmark 2026-12-02, 36,000 documents: restore 40.0 s with 2, 28.9 s with 1).
INDEX_BUILDERS = 1
# What `migrate`, a started scheduler, worker or api writes into an empty database: a
# target holding only these still counts as empty (they are rebuilt, not data).
BOOKKEEPING = frozenset({dbm.MIGRATIONS, dbm.COUNTERS, dbm.LEASES, dbm.SCHEDULE,
                         dbm.FIRES, dbm.WORKERS, dbm.IDEMPOTENCY, dbm.RATE_LIMITS,
                         dbm.SINKS, dbm.METRICS_SNAPSHOTS, dbm.RESTORES})
NO_MANIFEST_NOTE = ("no manifest.json (plain mongodump output): file hashes, per-collection "
                    "counts and the audit chain head at backup time cannot be checked, and "
                    "the copy is only as consistent as mongodump made it; "
                    "`certautopilot audit verify` (dr-test's first step) is then the check "
                    "of the audit log")


@dataclass
class Entry:
    role: str
    name: str
    bson: Path | None
    metadata: Path | None
    count: int | None


@dataclass
class Backup:
    root: Path
    manifest: Doc | None
    entries: list[Entry]
    migrations: list[int]
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(e.count or 0 for e in self.entries)


def _load_manifest(root: Path) -> Doc:
    try:
        manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BackupError(f"{root / MANIFEST} cannot be read ({exc.__class__.__name__}): "
                          "nothing was restored") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or \
            not isinstance(manifest.get("files"), dict) or \
            not isinstance(manifest.get("collections"), list):
        raise BackupError(f"{root / MANIFEST} is not a certautopilot backup manifest: "
                          "nothing was restored")
    if not isinstance(manifest.get("format_version"), int) or \
            manifest["format_version"] > FORMAT_VERSION:
        raise BackupError(f"{root / MANIFEST} has backup format "
                          f"{manifest.get('format_version')!r}, newer than this code's "
                          f"({FORMAT_VERSION}): restore it with certautopilot "
                          f"{manifest.get('tool_version', 'of that version')} or newer; "
                          "nothing was restored")
    return manifest


def _dump_files(root: Path) -> set[str]:
    return {f"{sub.name}/{f.name}" for sub in root.iterdir() if sub.is_dir()
            for f in sub.iterdir() if ".bson" in f.name or ".metadata.json" in f.name}


def _verify_manifest(root: Path, manifest: Doc, progress: Progress | None) -> Backup:
    files: dict[str, Any] = manifest["files"]
    for rel, info in sorted(files.items()):
        path = root / rel
        if ".." in Path(rel).parts or not path.is_file():
            raise BackupError(f"backup file {rel} listed in the manifest is missing: "
                              "nothing was restored")
        digest, size = sha256_file(path)
        if digest != info.get("sha256") or size != info.get("bytes"):
            raise BackupError(f"backup file {rel} does not match its SHA-256 in the manifest "
                              f"({size} bytes, expected {info.get('bytes')}): it was "
                              "truncated or edited; nothing was restored")
        if progress:
            progress(1)
    extra = sorted(_dump_files(root) - set(files))
    if extra:
        raise BackupError(f"backup files not listed in the manifest: {', '.join(extra[:5])}: "
                          "nothing was restored")
    entries = []
    for item in manifest["collections"]:
        role = item.get("db")
        if role not in (APP, BROKER):
            raise BackupError(f"manifest names an unknown database role {role!r}")
        entries.append(Entry(role, str(item["name"]), root / item["bson"],
                             root / item["metadata"] if item.get("metadata") else None,
                             int(item["count"])))
    migrations = [int(v) for v in manifest.get("migrations") or []]
    return Backup(root, manifest, entries, migrations)


def _scan_mongodump(root: Path) -> Backup:
    """Plain mongodump output: one directory per database. The application database is
    the one holding ``migrations`` (or ``certificates``), the broker the one holding
    kombu's ``messages``; other databases (admin, ...) are left out."""
    roles: dict[str, list[Path]] = {APP: [], BROKER: []}
    notes = [NO_MANIFEST_NOTE]
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        names = {f.name.split(".bson")[0] for f in sub.iterdir() if ".bson" in f.name}
        if names & {dbm.MIGRATIONS, dbm.CERTIFICATES}:
            roles[APP].append(sub)
        elif dbm.MESSAGES_COLLECTION in names:
            roles[BROKER].append(sub)
        elif names:
            notes.append(f"database directory {sub.name}/ is not CertAutoPilot's: left out")
    if (root / "oplog.bson").exists():
        notes.append("oplog.bson (mongodump --oplog) is not replayed: restore that dump with "
                     "mongorestore --oplogReplay if the source was written to during the dump")
    if len(roles[APP]) != 1 or len(roles[BROKER]) > 1:
        raise BackupError(
            f"{root} has no manifest.json and not exactly one application database "
            f"directory (found {[p.name for p in roles[APP]] or 'none'}; it is the one with "
            "migrations.bson): not a certautopilot backup nor mongodump output of one; "
            "nothing was restored")
    entries = []
    migrations: list[int] = []
    for role, dirs in roles.items():
        for sub in dirs:
            for path in sorted(sub.iterdir()):
                if not (path.name.endswith(".bson") or path.name.endswith(".bson.gz")):
                    continue
                name = path.name.split(".bson")[0]
                if name.startswith("system."):
                    continue
                gz = ".gz" if path.name.endswith(".gz") else ""
                meta = sub / f"{name}.metadata.json{gz}"
                # Parse the whole file now: a truncated dump is refused before any write.
                count = 0
                for raw in iter_raw_documents(path):
                    count += 1
                    if role == APP and name == dbm.MIGRATIONS:
                        migrations.append(int(bson.decode(raw)["_id"]))
                entries.append(Entry(role, name, path, meta if meta.exists() else None,
                                     count))
    return Backup(root, None, entries, sorted(migrations), notes)


def read_backup(root: Path, progress: Progress | None = None, *,
                mongodump: bool = False) -> Backup:
    """Check a backup without writing anything; BackupError says what is wrong.

    A directory without ``manifest.json`` is refused unless ``mongodump`` (the operator
    says it is plain mongodump output): a certautopilot backup that lost its manifest
    must not be restored unverified by accident."""
    if not root.is_dir():
        raise BackupError(f"--from {root} is not a directory")
    if (root / MANIFEST).exists():
        return _verify_manifest(root, _load_manifest(root), progress)
    if not mongodump:
        raise BackupError(f"{root} has no manifest.json: refusing to restore it unverified "
                          "(a certautopilot backup always has one). For plain mongodump "
                          "output pass --mongodump; nothing was restored")
    return _scan_mongodump(root)


def check_schema(backup: Backup) -> None:
    from app.migrations import discover

    known = {m.version for m in discover()}
    newest = max(known, default=0)
    unknown = sorted(set(backup.migrations) - known)
    if unknown:
        made_by = (backup.manifest or {}).get("tool_version", "unknown")
        raise BackupError(
            f"the backup is from a newer schema: it has migration(s) "
            f"{', '.join(map(str, unknown))} that this code (latest {newest}) does not know "
            f"(made by certautopilot {made_by}); restore it with that version or a newer "
            "one; nothing was restored")


def target_data(db: Database[Doc]) -> dict[str, int]:
    """Collections of the application database holding data (bookkeeping left out)."""
    found: dict[str, int] = {}
    for name in db.list_collection_names():
        if name in BOOKKEEPING or name.startswith("system."):
            continue
        count = db[name].estimated_document_count()
        if count:
            found[name] = count
    head = db[dbm.COUNTERS].find_one({"_id": CHAIN_ID}) or {}
    if int(head.get("seq", 0)) > 0:
        found.setdefault(dbm.AUDIT, 0)
    return found


def _batches(path: Path) -> Iterator[list[RawBSONDocument]]:
    batch: list[RawBSONDocument] = []
    size = 0
    for raw in iter_raw_documents(path):
        batch.append(RawBSONDocument(raw))
        size += len(raw)
        if len(batch) >= INSERT_BATCH_DOCS or size >= INSERT_BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _metadata(entry: Entry) -> Doc:
    if entry.metadata is None:
        return {}
    try:
        value = json_util.loads(read_bytes(entry.metadata).decode("utf-8"))
    except (OSError, ValueError) as exc:
        raise BackupError(f"{entry.metadata} is not valid metadata JSON: {exc}") from exc
    return value if isinstance(value, dict) else {}


class _IndexBuilds:
    """Index builds run on a thread beside the loads, so that a server that builds an
    index while it takes writes to other collections (mongod) loads the next collection
    meanwhile. The embedded server does not: its build holds a lock every write takes,
    and it builds each index with its own pass over the documents, so there a restore
    costs its loads plus every build (benchmark, 2026-12-01: 100,000 audit entries and
    10,000 certificates and keys loaded in about 27 s, their indexes built in 124 s;
    indexes created before the load made the load slower than both, 9.8 s against
    8.2 s for 10,000 audit entries)."""

    def __init__(self, workers: int = INDEX_BUILDERS) -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers,
                                        thread_name_prefix="restore-index")
        self._futures: list[Future[Any]] = []
        self.seconds = 0.0  # the builds' own durations, summed
        self._lock = threading.Lock()

    def submit(self, fn: Callable[[], Any]) -> None:
        def timed() -> Any:
            started = time.monotonic()
            try:
                return fn()
            finally:
                with self._lock:
                    self.seconds += time.monotonic() - started

        self._futures.append(self._pool.submit(timed))

    def wait(self) -> None:
        """Wait for every build; raise the first failure."""
        try:
            for future in self._futures:
                future.result()
        finally:
            self._pool.shutdown(wait=True)

    def abandon(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def _load_collection(database: Database[Doc], entry: Entry, progress: Progress | None,
                     build: Callable[[Callable[[], Any]], None]) -> int:
    """Create the collection, load its documents, and hand its index build to ``build``
    (a thread pool), so that the next collection loads while the indexes are built."""
    meta = _metadata(entry)
    options = {k: v for k, v in (meta.get("options") or {}).items()}
    database.command("create", entry.name, **options)
    coll = database.get_collection(entry.name).with_options(write_concern=dbm.MAJORITY)
    count = 0
    if entry.bson is not None:
        for batch in _batches(entry.bson):
            coll.insert_many(batch, ordered=True, bypass_document_validation=True)
            count += len(batch)
            if progress:
                progress(len(batch))
    indexes = [{k: v for k, v in ix.items() if k not in ("v", "ns")}
               for ix in meta.get("indexes") or [] if ix.get("name") != "_id_"]
    if indexes:
        build(lambda: database.command("createIndexes", entry.name, indexes=indexes))
    return count


def run_restore(db: Database[Doc], broker_db: str, backup: Backup, *, drop: bool = False,
                progress: Progress | None = None, actor: audit.Actor | None = None) -> Doc:
    """Load a checked backup (``read_backup``) into the configured databases."""
    check_schema(backup)
    data = target_data(db)
    if data and not drop:
        listed = ", ".join(f"{k} ({v})" for k, v in sorted(data.items())[:5])
        raise BackupError(f"the target database {db.name} is not empty ({listed}): restore "
                          "into an empty database, or pass --drop to replace it; nothing "
                          "was restored")
    started = time.monotonic()
    client = db.client
    restore_id = "rst_" + uuid.uuid4().hex[:16]
    counts: dict[str, int] = {}
    index_builds = _IndexBuilds()
    try:
        client.drop_database(db.name)
        client.drop_database(broker_db)
        db[dbm.RESTORES].insert_one({
            "_id": restore_id, "state": "running", "started_at": dbm.server_now(db),
            "source": str(backup.root), "manifest": _summary(backup)})
        for entry in backup.entries:
            database = db if entry.role == APP else client.get_database(
                broker_db, write_concern=dbm.MAJORITY)
            if entry.role == APP and entry.name == dbm.RESTORES:
                # Earlier restores of the backed-up database: keep them beside ours.
                for batch in _batches(entry.bson) if entry.bson else []:
                    db[dbm.RESTORES].insert_many(batch, ordered=False)
                    counts[f"{entry.role}.{entry.name}"] = counts.get(
                        f"{entry.role}.{entry.name}", 0) + len(batch)
                    if progress:
                        progress(len(batch))
                continue
            counts[f"{entry.role}.{entry.name}"] = _load_collection(
                database, entry, progress, index_builds.submit)
        loaded = time.monotonic()
        index_builds.wait()
        built = time.monotonic()
        mismatched = {f"{e.role}.{e.name}": (counts.get(f"{e.role}.{e.name}"), e.count)
                      for e in backup.entries
                      if e.count is not None and counts.get(f"{e.role}.{e.name}") != e.count}
        if mismatched:
            raise BackupError(f"restored counts differ from the backup: {mismatched}")
        from app.migrations import migrate

        applied = migrate(db)
        phases = {"load_s": round(loaded - started, 3),
                  "index_wait_s": round(built - loaded, 3),
                  "index_build_s": round(index_builds.seconds, 3),
                  "migrate_s": round(time.monotonic() - built, 3)}
        actor = actor or audit.system_actor("cli")
        summary = _summary(backup)

        def record(session: Any) -> None:
            audit.record(db, session, actor=actor, action="ops.restore",
                         target=f"restore:{restore_id}", details={
                             "backup_created_at": summary.get("created_at"),
                             "backup_tool_version": summary.get("tool_version"),
                             "backup_audit_head_seq": (summary.get("audit_head") or {})
                             .get("seq"),
                             "documents": sum(counts.values()),
                             "migrations_applied": applied, "verified": summary["verified"]})
            db[dbm.RESTORES].update_one({"_id": restore_id}, {"$set": {
                "state": "complete", "finished_at": dbm.server_now(db), "counts": counts,
                "migrations_applied": applied, "notes": backup.notes}}, session=session)

        dbm.transaction(db, record, what="record restore")
    except PyMongoError as exc:
        raise BackupError(f"restore failed: database error: {exc.__class__.__name__}: "
                          f"{str(exc)[:300]}; the target is incomplete: run the restore "
                          "again with --drop") from exc
    finally:
        index_builds.abandon()
    return {"restore_id": restore_id, "database": db.name, "broker_database": broker_db,
            "documents": sum(counts.values()), "counts": counts,
            "migrations_applied": applied, "verified": backup.manifest is not None,
            "manifest": _summary(backup), "notes": backup.notes,
            "seconds": round(time.monotonic() - started, 3),
            # load_s: documents loaded (index builds of earlier collections beside it);
            # index_wait_s: the builds still running after the last load.
            "phases": phases}


def _summary(backup: Backup) -> Doc:
    manifest = backup.manifest or {}
    return {"verified": backup.manifest is not None,
            "created_at": manifest.get("created_at"),
            "tool_version": manifest.get("tool_version"),
            "migration_version": max(backup.migrations, default=0),
            "audit_head": manifest.get("audit_head"),
            "documents": backup.total}
