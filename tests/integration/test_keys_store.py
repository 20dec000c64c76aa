"""Sealed keys in MongoDB: round trips, tampering, moved ciphertexts, wrong or missing KEK."""

from __future__ import annotations

import base64
import secrets
from pathlib import Path

import pytest
from bson import Binary

from app import db as dbm
from app.config import load_settings
from app.errors import ValidationFailed
from app.keys import (
    KEY_TYPES,
    KeyIntegrityError,
    KeyNotFound,
    KeyUnavailable,
    describe_key,
    generate_private_key,
    load_keyring,
    open_private_key,
    seal_private_key,
)
from app.keys.canary import KEK_VERSIONS
from app.keys.keygen import load_private_key, public_key_sha256


def keyring_dir(path: Path, **versions: bytes | None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for name, key in versions.items():
        (path / f"{name}.key").write_text(
            base64.b64encode(key or secrets.token_bytes(32)).decode())
    return path


def keyring_of(directory: Path):
    return load_keyring(load_settings({"CAP_KEK_DIR": str(directory)}))


@pytest.fixture(scope="module")
def pems() -> dict[str, bytes]:
    return {kind: generate_private_key(kind) for kind in KEY_TYPES}


@pytest.mark.parametrize("kind", KEY_TYPES)
def test_round_trip_every_key_type(migrated_db, pems, kind) -> None:
    pem = pems[kind]
    key_id = seal_private_key(migrated_db, pem, project_id="proj-a", purpose="certificate")
    assert open_private_key(migrated_db, key_id, project_id="proj-a") == pem
    record = migrated_db[dbm.KEYS].find_one({"_id": key_id})
    assert record["kek_version"] == 1 and record["key_type"] == kind
    assert record["public_key_sha256"] == public_key_sha256(load_private_key(pem))
    raw = repr(record).encode()
    assert b"PRIVATE KEY" not in raw and pem not in bytes(record["ciphertext"])
    info = describe_key(migrated_db, key_id, project_id="proj-a")
    assert info["key_type"] == kind and "ciphertext" not in info and "wrapped_dek" not in info


def test_seal_is_audited_and_stores_the_canary(migrated_db, pems) -> None:
    key_id = seal_private_key(migrated_db, pems["ec256"], project_id="p", purpose="acme_account")
    entries = list(migrated_db[dbm.AUDIT].find({}, sort=[("seq", 1)]))
    assert [e["action"] for e in entries] == ["kek.canary_create", "key.seal"]
    assert entries[1]["target"] == f"key:{key_id}" and entries[1]["project_id"] == "p"
    assert entries[1]["details"]["kek_version"] == 1
    assert migrated_db[KEK_VERSIONS].find_one({"_id": 1})["canary"]["ciphertext"]
    seal_private_key(migrated_db, pems["ec256"], project_id="p", purpose="acme_account")
    assert migrated_db[dbm.AUDIT].count_documents({"action": "kek.canary_create"}) == 1


def test_seal_in_callers_transaction_commits_or_aborts_with_it(migrated_db, pems) -> None:
    from app.audit import record, system_actor

    calls = []

    def commit(session):
        calls.append(1)
        key_id = seal_private_key(migrated_db, pems["ec256"], project_id="p", purpose="cert",
                                  session=session)
        record(migrated_db, session, actor=system_actor("test"), action="thing.create",
               target="thing:1", details={"key_id": key_id})
        return key_id

    # The first seal of a KEK version stores its canary; that must not conflict with the
    # caller's transaction (which also writes an audit entry).
    key_id = dbm.transaction(migrated_db, commit)
    assert calls == [1]
    assert open_private_key(migrated_db, key_id, project_id="p") == pems["ec256"]
    assert migrated_db[dbm.AUDIT].count_documents({"action": "key.seal"}) == 0  # caller audits
    assert [e["action"] for e in migrated_db[dbm.AUDIT].find({}, sort=[("seq", 1)])] == \
        ["kek.canary_create", "thing.create"]

    class Boom(Exception):
        pass

    sealed_ids = []

    def abort(session):
        sealed_ids.append(seal_private_key(migrated_db, pems["ec256"], project_id="p",
                                           purpose="cert", session=session))
        raise Boom

    with pytest.raises(Boom):
        dbm.transaction(migrated_db, abort)
    assert migrated_db[dbm.KEYS].find_one({"_id": sealed_ids[0]}) is None


def test_bad_input_is_refused_and_nothing_written(migrated_db) -> None:
    with pytest.raises(ValidationFailed):
        seal_private_key(migrated_db, b"hello", project_id="p", purpose="cert")
    with pytest.raises(ValidationFailed):
        seal_private_key(migrated_db, generate_private_key("ec256"), project_id="",
                         purpose="cert")
    assert migrated_db[dbm.KEYS].count_documents({}) == 0


def test_other_project_or_unknown_id_is_not_found(migrated_db, pems) -> None:
    key_id = seal_private_key(migrated_db, pems["ec256"], project_id="p1", purpose="cert")
    with pytest.raises(KeyNotFound):
        open_private_key(migrated_db, key_id, project_id="p2")
    with pytest.raises(KeyNotFound):
        open_private_key(migrated_db, "nope", project_id="p1")


def _flip(value: bytes) -> Binary:
    data = bytes(value)
    return Binary(bytes([data[0] ^ 0x80]) + data[1:])


@pytest.mark.parametrize("field", ["ciphertext", "nonce", "wrapped_dek", "dek_nonce"])
def test_tampered_record_is_an_integrity_error(migrated_db, pems, field) -> None:
    key_id = seal_private_key(migrated_db, pems["rsa2048"], project_id="p", purpose="cert")
    keys = migrated_db[dbm.KEYS]
    original = keys.find_one({"_id": key_id})[field]
    keys.update_one({"_id": key_id}, {"$set": {field: _flip(original)}})
    with pytest.raises(KeyIntegrityError) as info:
        open_private_key(migrated_db, key_id, project_id="p")
    assert key_id in info.value.message and info.value.status == 500
    assert info.value.__cause__ is None


def test_moved_ciphertext_or_changed_binding_is_an_integrity_error(migrated_db, pems) -> None:
    keys = migrated_db[dbm.KEYS]
    a = seal_private_key(migrated_db, pems["ec256"], project_id="p", purpose="cert")
    b = seal_private_key(migrated_db, pems["ec384"], project_id="p", purpose="cert")
    source = keys.find_one({"_id": a})
    # The whole envelope of a copied into b's record: the AAD binds it to record a.
    keys.update_one({"_id": b}, {"$set": {f: source[f] for f in
                                          ("nonce", "ciphertext", "dek_nonce", "wrapped_dek")}})
    with pytest.raises(KeyIntegrityError, match="wrapped DEK does not authenticate"):
        open_private_key(migrated_db, b, project_id="p")
    # Only the ciphertext copied: b's own DEK does not open it.
    c = seal_private_key(migrated_db, pems["ec384"], project_id="p", purpose="cert")
    keys.update_one({"_id": c}, {"$set": {"nonce": source["nonce"],
                                          "ciphertext": source["ciphertext"]}})
    with pytest.raises(KeyIntegrityError, match="ciphertext does not authenticate"):
        open_private_key(migrated_db, c, project_id="p")
    # The record moved to another project.
    keys.update_one({"_id": a}, {"$set": {"project_id": "q"}})
    with pytest.raises(KeyIntegrityError):
        open_private_key(migrated_db, a, project_id="q")
    # A malformed record.
    keys.update_one({"_id": a}, {"$unset": {"wrapped_dek": ""}, "$set": {"project_id": "p"}})
    with pytest.raises(KeyIntegrityError, match="malformed"):
        open_private_key(migrated_db, a, project_id="p")


def test_wrong_kek_is_key_unavailable_not_integrity(migrated_db, pems, tmp_path) -> None:
    key_id = seal_private_key(migrated_db, pems["ec256"], project_id="p", purpose="cert")
    wrong = keyring_of(keyring_dir(tmp_path / "wrong", v1=None))
    with pytest.raises(KeyUnavailable) as info:
        open_private_key(migrated_db, key_id, project_id="p", keyring=wrong)
    assert "wrong key" in info.value.message and "v1" in info.value.message
    assert info.value.status == 503 and info.value.retry_after


def test_seal_with_wrong_kek_writes_nothing(migrated_db, pems, tmp_path) -> None:
    seal_private_key(migrated_db, pems["ec256"], project_id="p", purpose="cert")
    before = (migrated_db[dbm.KEYS].count_documents({}), migrated_db[dbm.AUDIT].count_documents({}))
    wrong = keyring_of(keyring_dir(tmp_path / "wrong", v1=None))
    with pytest.raises(KeyUnavailable, match="wrong key"):
        seal_private_key(migrated_db, pems["ec256"], project_id="p", purpose="cert",
                         keyring=wrong)
    after = (migrated_db[dbm.KEYS].count_documents({}), migrated_db[dbm.AUDIT].count_documents({}))
    assert after == before


def test_wrong_kek_cannot_enshrine_itself_as_canary(migrated_db, pems, kek_dir,
                                                    tmp_path) -> None:
    key_id = seal_private_key(migrated_db, pems["ec256"], project_id="p", purpose="cert")
    migrated_db[KEK_VERSIONS].delete_many({})  # e.g. a canary lost in a partial restore
    wrong = keyring_of(keyring_dir(tmp_path / "wrong", v1=None))
    with pytest.raises(KeyUnavailable, match="wrong key"):
        seal_private_key(migrated_db, pems["ec256"], project_id="p", purpose="cert",
                         keyring=wrong)
    assert migrated_db[KEK_VERSIONS].count_documents({}) == 0
    right = keyring_of(kek_dir)
    assert open_private_key(migrated_db, key_id, project_id="p", keyring=right) == pems["ec256"]


def test_missing_kek_version_is_key_unavailable(migrated_db, pems, tmp_path) -> None:
    key_id = seal_private_key(migrated_db, pems["ec256"], project_id="p", purpose="cert")
    migrated_db[dbm.KEYS].update_one({"_id": key_id}, {"$set": {"kek_version": 9}})
    with pytest.raises(KeyUnavailable, match="KEK v9 is not in this process's keyring"):
        open_private_key(migrated_db, key_id, project_id="p")
    only_v2 = keyring_of(keyring_dir(tmp_path / "v2only", v2=None))
    migrated_db[dbm.KEYS].update_one({"_id": key_id}, {"$set": {"kek_version": 1}})
    with pytest.raises(KeyUnavailable, match="KEK v1 is not in"):
        open_private_key(migrated_db, key_id, project_id="p", keyring=only_v2)
