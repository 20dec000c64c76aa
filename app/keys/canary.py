"""KEK canaries: a known value sealed under each KEK version, stored in ``kek_versions``.

Opening the canary proves that this process holds the right key for a version without
touching a real private key; ``/readyz``, ``certautopilot health``, sealing and rotation
all check it. The first process to use a version stores its canary, but only after it
has checked the key against an existing record sealed under that version (if any), so a
wrong key cannot enshrine itself.
"""

from __future__ import annotations

import logging
import os
import threading
from datetime import UTC, datetime

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pymongo.client_session import ClientSession
from pymongo.database import Database
from pymongo.errors import DuplicateKeyError

from app import audit
from app import db as dbm
from app.db.names import KEK_VERSIONS, Doc
from app.keys import envelope
from app.keys.errors import KeyUnavailable
from app.keys.keyring import Keyring

log = logging.getLogger(__name__)

CANARY_PLAINTEXT = b"certautopilot KEK canary"


# (database, KEK version) pairs whose canary this process has opened, with the cipher
# object that did it (a reloaded keyring has new objects and is checked again).
_verified: dict[tuple[str, int], AESGCM] = {}
_verified_lock = threading.Lock()


def _aad(version: int) -> bytes:
    return envelope._aad("certautopilot.canary", envelope.FORMAT, int(version))


def make_canary(kek: AESGCM, version: int) -> Doc:
    nonce = os.urandom(envelope.NONCE_BYTES)
    return {"alg": envelope.ALGORITHM, "format": envelope.FORMAT, "nonce": nonce,
            "ciphertext": kek.encrypt(nonce, CANARY_PLAINTEXT, _aad(version))}


def canary_opens(canary: Doc, kek: AESGCM, version: int) -> bool:
    try:
        plain = kek.decrypt(bytes(canary["nonce"]), bytes(canary["ciphertext"]), _aad(version))
    except (InvalidTag, KeyError, TypeError, ValueError):
        return False
    return plain == CANARY_PLAINTEXT


def wrong_kek(version: int, keyring: Keyring) -> KeyUnavailable:
    return KeyUnavailable(
        f"KEK v{version} in this process ({keyring.source}) is the wrong key: it does not "
        f"open the canary stored for v{version}; supply the right v{version}",
        kek_version=version)


def read_canary(db: Database[Doc], version: int) -> Doc | None:
    doc = dbm.retry(lambda: dbm.primary(db)[KEK_VERSIONS].find_one({"_id": int(version)}),
                    what="read KEK canary")
    return doc


def check(db: Database[Doc], keyring: Keyring, version: int) -> bool | None:
    """True if KEK ``version`` opens its stored canary, False if not, None if no canary is
    stored yet. Raises KeyUnavailable if the keyring lacks the version."""
    kek = keyring.aead(version)
    doc = read_canary(db, version)
    if not doc or not doc.get("canary"):
        return None
    ok = canary_opens(doc["canary"], kek, version)
    if ok:
        with _verified_lock:
            _verified[(db.name, version)] = kek
    return ok


def contradicting_record(db: Database[Doc], kek: AESGCM, version: int) -> bool:
    """Whether a key record sealed under ``version`` exists that ``kek`` cannot unwrap."""
    record = dbm.retry(lambda: dbm.primary(db)[dbm.KEYS].find_one(
        {"kek_version": int(version)},
        {"_id": 1, "project_id": 1, "dek_nonce": 1, "wrapped_dek": 1}), what="read a key record")
    if record is None:
        return False
    try:
        envelope.unwrap_dek(kek=kek, kek_version=version, dek_nonce=record["dek_nonce"],
                            wrapped_dek=record["wrapped_dek"], key_id=str(record["_id"]),
                            project_id=str(record["project_id"]))
    except (envelope.DekUnwrapFailed, KeyError, TypeError):
        return True
    return False


def ensure(db: Database[Doc], keyring: Keyring, version: int, *,
           actor: audit.Actor | None = None) -> str:
    """Make sure KEK ``version`` is the right one: open its canary, or store it if none
    exists yet. Returns "verified", "cached" or "created"; raises KeyUnavailable if the key
    is wrong or absent. Nothing is written when the key is wrong."""
    kek = keyring.aead(version)
    with _verified_lock:
        if _verified.get((db.name, version)) is kek:
            return "cached"
    state = check(db, keyring, version)
    if state is True:
        return "verified"
    if state is False:
        raise wrong_kek(version, keyring)
    if contradicting_record(db, kek, version):
        raise wrong_kek(version, keyring)
    canary = make_canary(kek, version)
    who = actor or audit.system_actor("keys")

    def store(session: ClientSession) -> None:
        now = datetime.now(UTC)
        db[KEK_VERSIONS].update_one(
            {"_id": int(version), "canary": {"$exists": False}},
            {"$set": {"canary": canary, "canary_created_at": now},
             "$setOnInsert": {"created_at": now, "state": "active"}},
            upsert=True, session=session)
        audit.record(db, session, actor=who, action="kek.canary_create",
                     target=f"kek:v{version}", details={"kek_version": int(version)})

    try:
        dbm.transaction(db, store, what="store KEK canary")
    except DuplicateKeyError:
        pass  # another process stored it first: check theirs below
    if check(db, keyring, version) is not True:
        raise wrong_kek(version, keyring)
    log.info("KEK canary stored", extra={"kek_version": version})
    return "created"


def forget_verified() -> None:
    with _verified_lock:
        _verified.clear()
