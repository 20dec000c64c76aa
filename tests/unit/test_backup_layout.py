"""The backup file layout helpers: raw BSON documents, counts, hashing writer."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import bson
import pytest

from app.ops.layout import BackupError, HashingWriter, count_documents, iter_raw_documents

DOCS = [{"_id": i, "name": f"n{i}", "blob": b"x" * i} for i in range(50)]


@pytest.mark.parametrize("gzipped", [False, True])
def test_written_files_read_back_with_bson_and_match_their_hash(tmp_path: Path,
                                                               gzipped: bool) -> None:
    path = tmp_path / ("c.bson.gz" if gzipped else "c.bson")
    writer = HashingWriter(path, gzipped)
    batch = b"".join(bson.encode(d) for d in DOCS)
    assert count_documents(batch) == len(DOCS)
    writer.put(batch)
    info = writer.close()
    stored = path.read_bytes()
    assert info == {"sha256": hashlib.sha256(stored).hexdigest(), "bytes": len(stored)}
    plain = gzip.decompress(stored) if gzipped else stored
    assert bson.decode_all(plain) == DOCS
    assert [bson.decode(raw) for raw in iter_raw_documents(path)] == DOCS


def test_a_truncated_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.bson"
    path.write_bytes(b"".join(bson.encode(d) for d in DOCS)[:-5])
    with pytest.raises(BackupError, match="truncated"):
        list(iter_raw_documents(path))


def test_a_mangled_length_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.bson"
    path.write_bytes(b"\xff\xff\xff\x7f" + bson.encode(DOCS[0])[4:])
    with pytest.raises(BackupError, match="bad document length"):
        list(iter_raw_documents(path))


def test_an_empty_file_has_no_documents(tmp_path: Path) -> None:
    path = tmp_path / "c.bson"
    path.write_bytes(b"")
    assert list(iter_raw_documents(path)) == []
