"""Private keys under envelope encryption (DESIGN.md invariant 3).

Each private key is AES-256-GCM encrypted under its own DEK, bound to its record id and
project; the DEK is wrapped by a versioned KEK that lives outside MongoDB
(``CAP_KEK_DIR`` / ``CAP_KEK_FILE`` / ``CAP_KEK_COMMAND``). A canary per KEK version lets
``/readyz`` prove the KEK is right; ``certautopilot kek rotate`` re-wraps every DEK under a
new KEK in resumable steps.

Public API (the contract other parts code against)::

    pem = generate_private_key("ec256")
    key_id = seal_private_key(db, pem, project_id=p, purpose="certificate", session=s)
    pem = open_private_key(db, key_id, project_id=p)

Errors: ``KeyUnavailable`` (no/wrong KEK: retry later), ``KeyIntegrityError`` (tampered
or moved record), ``KeyNotFound``; all are ``CertAutoPilotError``.
"""

from app.keys.errors import (
    KeyIntegrityError,
    KeyNotFound,
    KeyringError,
    KeyUnavailable,
    RotationConflict,
)
from app.keys.keygen import KEY_TYPES, generate_private_key, load_private_key
from app.keys.keyring import Keyring, get_keyring, load_keyring
from app.keys.store import (
    active_version,
    describe_key,
    open_private_key,
    seal_private_key,
    seal_secret,
)

__all__ = [
    "KEY_TYPES",
    "KeyIntegrityError",
    "KeyNotFound",
    "KeyUnavailable",
    "Keyring",
    "KeyringError",
    "RotationConflict",
    "active_version",
    "describe_key",
    "generate_private_key",
    "get_keyring",
    "load_keyring",
    "load_private_key",
    "open_private_key",
    "seal_private_key",
    "seal_secret",
]
