"""The on-disk layout shared by backup and restore: mongodump's directory layout plus a
``manifest.json``.

``DIR/<db>/<collection>.bson`` holds the collection's documents as concatenated BSON;
``DIR/<db>/<collection>.metadata.json`` its indexes and options in MongoDB extended JSON
(what mongodump writes and mongorestore reads). With ``--gzip`` each file is gzipped on
its own and named ``.gz`` (mongodump's ``--gzip``).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from app.errors import CertAutoPilotError

MANIFEST = "manifest.json"
FORMAT = "certautopilot-backup"
FORMAT_VERSION = 1
APP, BROKER = "app", "broker"
_LEN = struct.Struct("<i")
# The largest document MongoDB stores is 16 MiB; anything larger is a corrupt length.
MAX_DOCUMENT_BYTES = 16 * 1024 * 1024 + 16 * 1024


class BackupError(CertAutoPilotError):
    """A backup or restore refused or failed; the message says why and what to do."""

    code = "backup_error"


def bson_name(collection: str, gzipped: bool) -> str:
    return f"{collection}.bson" + (".gz" if gzipped else "")


def metadata_name(collection: str, gzipped: bool) -> str:
    return f"{collection}.metadata.json" + (".gz" if gzipped else "")


def read_bytes(path: Path) -> bytes:
    with open(path, "rb") as handle:
        data = handle.read()
    return gzip.decompress(data) if path.name.endswith(".gz") else data


def iter_raw_documents(path: Path) -> Iterator[bytes]:
    """Each document of a ``.bson`` (or ``.bson.gz``) file as its raw bytes, checked for
    a sane length and terminator (a truncated file raises BackupError)."""
    with open(path, "rb") as raw:
        stream: Any = gzip.GzipFile(fileobj=raw, mode="rb") \
            if path.name.endswith(".gz") else raw
        reader = stream
        offset = 0
        while True:
            head = reader.read(4)
            if not head:
                return
            if len(head) < 4:
                raise BackupError(f"{path}: truncated at byte {offset}")
            (size,) = _LEN.unpack(head)
            if size < 5 or size > MAX_DOCUMENT_BYTES:
                raise BackupError(f"{path}: bad document length {size} at byte {offset}")
            rest = reader.read(size - 4)
            if len(rest) != size - 4 or rest[-1:] != b"\x00":
                raise BackupError(f"{path}: truncated or corrupt document at byte {offset}")
            offset += size
            yield head + rest


def count_documents(batch: bytes) -> int:
    """How many documents a raw BSON batch (concatenated documents) holds."""
    count = offset = 0
    end = len(batch)
    while offset < end:
        offset += _LEN.unpack_from(batch, offset)[0]
        count += 1
    return count


class HashingWriter:
    """Writes a file (gzipped if asked) and hashes the bytes as stored on disk, so the
    manifest's SHA-256 checks exactly what restore will read."""

    def __init__(self, path: Path, gzipped: bool) -> None:
        self.path = path
        self.sha256 = hashlib.sha256()
        self.size = 0
        self._file = open(path, "wb")  # noqa: SIM115 - closed in close()
        self._gzip = gzip.GzipFile(fileobj=self, mode="wb", compresslevel=6, mtime=0) \
            if gzipped else None

    # GzipFile writes its compressed output here.
    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        self._file.write(data)
        return len(data)

    def flush(self) -> None:
        self._file.flush()

    def put(self, data: bytes) -> None:
        if self._gzip is not None:
            self._gzip.write(data)
        else:
            self.write(data)

    def close(self) -> dict[str, Any]:
        if self._gzip is not None:
            self._gzip.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        return {"sha256": self.sha256.hexdigest(), "bytes": self.size}


def sha256_file(path: Path, chunk: int = 1 << 20) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while True:
            block = handle.read(chunk)
            if not block:
                break
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size
