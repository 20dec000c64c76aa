"""Sealed private keys in the ``keys`` collection: seal, open, describe.

A record holds only ciphertext and metadata: ``nonce``, ``ciphertext`` (the PEM under the
record's DEK), ``dek_nonce`` and ``wrapped_dek`` (the DEK under KEK ``kek_version``),
``project_id``, ``purpose``, ``key_type``, ``public_key_sha256`` and rotation bookkeeping
(``rewrap_count``, ``rewrapped_at``, ``rotation_id``). The plaintext key exists only in
the memory of the process that uses it.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from bson import Binary
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pymongo.client_session import ClientSession
from pymongo.database import Database

from app import audit
from app import db as dbm
from app.db.names import KEK_ROTATIONS, Doc
from app.errors import ValidationFailed
from app.keys import canary, envelope
from app.keys.errors import KeyIntegrityError, KeyNotFound
from app.keys.keygen import key_type_of, load_private_key, public_key_sha256
from app.keys.keyring import Keyring, get_keyring

# Fields of a key record that are safe to show (no ciphertext, no wrapped DEK).
PUBLIC_FIELDS = ("project_id", "purpose", "key_type", "public_key_sha256", "kek_version",
                 "created_at", "rewrapped_at", "rewrap_count", "rotation_id")


def active_version(db: Database[Doc], keyring: Keyring,
                   session: ClientSession | None = None) -> int:
    """The KEK version new keys are sealed under: the target of the last recorded rotation,
    or, before any rotation, the lowest version of the keyring (adding a key file never
    changes it; ``certautopilot kek rotate`` does)."""
    source = db if session is not None else dbm.primary(db)

    def read() -> Doc | None:
        return source[KEK_ROTATIONS].find_one({}, {"target_version": 1}, sort=[("seq", -1)],
                                               session=session)

    latest = read() if session is not None else dbm.retry(read, what="read active KEK")
    return int(latest["target_version"]) if latest else keyring.lowest


def _text(name: str, value: object, limit: int = 200) -> str:
    if not isinstance(value, str) or not value or len(value) > limit:
        raise ValidationFailed(f"{name} must be a non-empty string of at most {limit} "
                               "characters", errors={name: ["non-empty string required"]})
    return value


def build_record(private_key_pem: bytes, *, key_id: str, project_id: str, purpose: str,
                 key_type: str, fingerprint: str, kek: AESGCM, kek_version: int) -> Doc:
    """The ``keys`` document of a sealed key (encrypts; does not write). For bulk loads
    (benchmarks, tests); everything else goes through ``seal_private_key``."""
    sealed = envelope.seal(private_key_pem, key_id=key_id, project_id=project_id, kek=kek,
                           kek_version=kek_version)
    return {
        "_id": key_id,
        "project_id": project_id,
        "purpose": purpose,
        "key_type": key_type,
        "public_key_sha256": fingerprint,
        "format": envelope.FORMAT,
        "alg": envelope.ALGORITHM,
        "nonce": Binary(sealed.nonce),
        "ciphertext": Binary(sealed.ciphertext),
        "kek_version": sealed.kek_version,
        "dek_nonce": Binary(sealed.dek_nonce),
        "wrapped_dek": Binary(sealed.wrapped_dek),
        "created_at": datetime.now(UTC),
        "rewrap_count": 0,
        "rewrapped_at": None,
        "rotation_id": None,
    }


def seal_private_key(db: Database[Doc], private_key_pem: bytes, *, project_id: str,
                     purpose: str, session: ClientSession | None = None,
                     actor: audit.Actor | None = None, keyring: Keyring | None = None) -> str:
    """Store ``private_key_pem`` envelope-encrypted under the active KEK; return its id.

    With ``session`` the record is inserted in the caller's transaction and the caller's
    own audit entry covers it; without, it is inserted in its own transaction with one
    audit entry ``key.seal``. Raises ValidationFailed for a non-PEM input and
    KeyUnavailable when the active KEK is missing or wrong (nothing is written then).
    """
    project_id = _text("project_id", project_id)
    purpose = _text("purpose", purpose, 100)
    parsed = load_private_key(private_key_pem)
    key_type, fingerprint = key_type_of(parsed), public_key_sha256(parsed)
    del parsed
    return _seal(db, private_key_pem, project_id=project_id, purpose=purpose,
                 key_type=key_type, fingerprint=fingerprint, session=session, actor=actor,
                 keyring=keyring)


def seal_secret(db: Database[Doc], secret: bytes, *, project_id: str, purpose: str,
                session: ClientSession | None = None, actor: audit.Actor | None = None
                ) -> str:
    """Store another secret (a webhook URL and signing key, ...) as a sealed record, like
    a private key: same envelope, same KEK rotation. ``open_private_key`` opens it."""
    if not isinstance(secret, bytes) or not secret:
        raise ValidationFailed("a secret must be non-empty bytes")
    return _seal(db, secret, project_id=_text("project_id", project_id),
                 purpose=_text("purpose", purpose, 100), key_type="secret", fingerprint="",
                 session=session, actor=actor, keyring=None)


def _seal(db: Database[Doc], plaintext: bytes, *, project_id: str, purpose: str,
          key_type: str, fingerprint: str, session: ClientSession | None,
          actor: audit.Actor | None, keyring: Keyring | None) -> str:
    explicit = keyring is not None
    ring: Keyring = keyring if keyring is not None else get_keyring()

    def ready_kek(version: int) -> AESGCM:
        nonlocal ring
        if not explicit and version not in ring:
            ring = get_keyring(need_version=version)
        kek = ring.aead(version)
        canary.ensure(db, ring, version, actor=actor)
        return kek

    # The canary is checked (and, the first time, stored in its own transaction) before
    # the caller's transaction reads anything, so storing it cannot conflict with it.
    version = active_version(db, ring)
    kek = ready_kek(version)
    if session is not None:
        in_session = active_version(db, ring, session)
        if in_session != version:  # a rotation was recorded in between
            version, kek = in_session, ready_kek(in_session)

    key_id = uuid.uuid4().hex
    record = build_record(plaintext, key_id=key_id, project_id=project_id,
                          purpose=purpose, key_type=key_type, fingerprint=fingerprint,
                          kek=kek, kek_version=version)
    if session is not None:
        db[dbm.KEYS].insert_one(record, session=session)
        return key_id
    who = actor or audit.system_actor("keys")

    def insert(s: ClientSession) -> None:
        db[dbm.KEYS].insert_one(record, session=s)
        audit.record(db, s, actor=who, action="key.seal", target=f"key:{key_id}",
                     project_id=project_id,
                     details={"purpose": purpose, "key_type": key_type,
                              "kek_version": version, "public_key_sha256": fingerprint})

    dbm.transaction(db, insert, what="seal private key")
    return key_id


def sealed_of(record: Doc) -> envelope.Sealed:
    """The encrypted fields of a record; KeyIntegrityError if they are missing or mangled."""
    try:
        sealed = envelope.Sealed(bytes(record["nonce"]), bytes(record["ciphertext"]),
                                 int(record["kek_version"]), bytes(record["dek_nonce"]),
                                 bytes(record["wrapped_dek"]))
    except (KeyError, TypeError, ValueError):
        raise KeyIntegrityError(f"key {record.get('_id')} record is malformed (encrypted "
                                "fields missing or of the wrong type)",
                                key_id=str(record.get("_id"))) from None
    if len(sealed.nonce) != envelope.NONCE_BYTES or len(sealed.dek_nonce) != \
            envelope.NONCE_BYTES:
        raise KeyIntegrityError(f"key {record['_id']}: a nonce has the wrong length",
                                key_id=str(record["_id"]))
    return sealed


def _find(db: Database[Doc], key_id: str, project_id: str) -> Doc:
    if not isinstance(key_id, str) or not isinstance(project_id, str):
        raise KeyNotFound(f"key {key_id!s:.64} not found in project {project_id!s:.64}")
    record = dbm.retry(lambda: dbm.primary(db)[dbm.KEYS].find_one(
        {"_id": key_id, "project_id": project_id}), what="read key")
    if record is None:
        raise KeyNotFound(f"key {key_id:.64} not found in project {project_id:.64}")
    return record


def open_private_key(db: Database[Doc], key_id: str, *, project_id: str,
                     keyring: Keyring | None = None) -> bytes:
    """The PEM of key ``key_id`` of ``project_id`` (keep it in memory, only while used).

    KeyNotFound: no such key in this project. KeyUnavailable: this process lacks the KEK
    version or holds a wrong one (retry later). KeyIntegrityError: the record was altered
    or its ciphertext moved from another record.
    """
    record = _find(db, key_id, project_id)
    sealed = sealed_of(record)
    version = sealed.kek_version
    if keyring is None:
        keyring = get_keyring(need_version=version)
    kek = keyring.aead(version)
    try:
        return envelope.open_sealed(sealed, key_id=key_id, project_id=project_id, kek=kek)
    except envelope.DekUnwrapFailed:
        if canary.check(db, keyring, version) is not True:
            raise canary.wrong_kek(version, keyring) from None
        raise KeyIntegrityError(
            f"key {key_id}: wrapped DEK does not authenticate under KEK v{version} (the "
            "record's wrapped DEK, its nonce, KEK version or bound id/project was altered)",
            key_id=key_id) from None
    except envelope.CiphertextInvalid:
        raise KeyIntegrityError(
            f"key {key_id}: ciphertext does not authenticate (altered, or moved from "
            "another record)", key_id=key_id) from None


def describe_key(db: Database[Doc], key_id: str, *, project_id: str) -> Doc:
    """Metadata of a key, safe to show (never ciphertext or wrapped DEK)."""
    record = _find(db, key_id, project_id)
    return {"id": record["_id"], **{f: record.get(f) for f in PUBLIC_FIELDS}}
