"""Retention: the application never deletes or rewrites an audit entry (the database side,
no TTL index and no capped collection, is checked in tests/integration/test_audit_chain.py)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# A write other than insert on the audit collection, however it is named in code.
WRITE = re.compile(
    r"(AUDIT|[\"']audit[\"'])\s*\]\s*\.\s*(delete_one|delete_many|drop|find_one_and_delete|"
    r"find_one_and_replace|find_one_and_update|replace_one|update_one|update_many|"
    r"bulk_write|rename)\b|\bdb\.audit\.(delete|drop|update|replace|remove)")


def test_no_code_deletes_or_rewrites_audit_entries() -> None:
    offenders = []
    for path in [*(ROOT / "app").rglob("*.py"), *(ROOT / "tasks").rglob("*.py"),
                 *(ROOT / "scheduler").rglob("*.py")]:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if WRITE.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, offenders


def test_the_pattern_catches_what_it_should() -> None:
    assert WRITE.search('db[dbm.AUDIT].delete_many({"seq": 1})')
    assert WRITE.search("db['audit'].update_one({}, {})")
    assert not WRITE.search("db[dbm.AUDIT].insert_one(entry, session=session)")

