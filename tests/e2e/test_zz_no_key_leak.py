"""Runs last (tests/helpers/key_leak.py moves it there): after the whole run, no database
on the test server and no captured log holds a PEM private key or a key's raw bytes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import key_leak


def _keyrings(base: Path) -> list[object]:
    """Every KEK directory the run's tests created (to open keys left in their databases)."""
    from app.config import load_settings
    from app.keys import load_keyring

    rings = []
    for directory in sorted({p.parent for p in base.rglob("v*.key")}):
        try:
            rings.append(load_keyring(load_settings({"CAP_KEK_DIR": str(directory)})))
        except Exception:  # noqa: BLE001 - deliberately broken KEK dirs of tests
            continue
    return rings


def _note_keys_left_on_server(watch: key_leak.KeyLeakWatch, uri: str, rings: list,
                              only_prefix: str | None) -> None:
    from pymongo import MongoClient

    from app.keys import envelope
    from app.keys.store import sealed_of

    client: MongoClient = MongoClient(uri, serverSelectionTimeoutMS=5000)
    try:
        for name in client.list_database_names():
            if name in key_leak.SYSTEM_DATABASES or (only_prefix and
                                                     not name.startswith(only_prefix)):
                continue
            working = None
            for record in client[name]["keys"].find({}):
                try:
                    sealed = sealed_of(record)
                except Exception:  # noqa: BLE001
                    continue
                candidates = [working] if working is not None else rings
                for ring in candidates:
                    if sealed.kek_version not in ring:
                        continue
                    try:
                        pem = envelope.open_sealed(sealed, key_id=str(record["_id"]),
                                                   project_id=str(record["project_id"]),
                                                   kek=ring.aead(sealed.kek_version))
                    except envelope.EnvelopeError:
                        continue
                    working = ring
                    watch.note_pem(pem)
                    break
    finally:
        client.close()


def test_no_private_key_in_any_database_or_log(mongo_base_uri: str,
                                               tmp_path_factory: pytest.TempPathFactory
                                               ) -> None:
    watch = key_leak.watch()
    # The watch is live: a key generated now is known to it.
    from app.keys import generate_private_key

    before = len(watch.needles)
    pem = generate_private_key("ec256")
    found = watch.needles.found_anywhere(b"x" * 7 + pem + b"y")
    del pem
    assert len(watch.needles) > before and found

    only = "cap_test_" if os.environ.get("CAP_TEST_MONGO_URI") else None
    base = tmp_path_factory.getbasetemp()
    _note_keys_left_on_server(watch, mongo_base_uri, _keyrings(base), only)
    watch.scan_all_databases(mongo_base_uri, "end of run", only)
    logs = sorted(p for p in base.rglob("*.log") if p.is_file())
    watch.scan_files(logs, "end of run")
    assert watch.databases_scanned > 0
    findings = list(dict.fromkeys(str(f) for f in watch.findings))
    assert not findings, "private key material found:\n" + "\n".join(findings)
