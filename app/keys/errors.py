"""Errors of the key store. Their messages name records and KEK versions, never key
material: a message may end up in a log line, a job's last error or an API answer."""

from __future__ import annotations

from app.errors import CertAutoPilotError, Conflict, NotFound, Unavailable


class KeyUnavailable(Unavailable):
    """The KEK a key needs is missing, unreadable or wrong in this process.

    Retryable: the operator fixes the keyring (or the pod gets the new secret) and the
    same operation then succeeds. Nothing was changed.
    """

    code = "key_unavailable"

    def __init__(self, message: str, *, kek_version: int | None = None,
                 retry_after: float | None = 30) -> None:
        super().__init__(message, retry_after=retry_after)
        self.kek_version = kek_version


class KeyringError(KeyUnavailable):
    """The configured KEK source cannot be read or holds a malformed key (a file that is
    not base64 of exactly 32 bytes, a command that failed, ...)."""

    code = "kek_misconfigured"


class KeyIntegrityError(CertAutoPilotError):
    """A sealed key failed authentication: its ciphertext, nonce, wrapped DEK or bound
    record (id, project) was altered, or the ciphertext was moved to another record.

    Not retryable: the record must be restored from a backup or the key replaced.
    """

    status, code = 500, "key_integrity_error"

    def __init__(self, message: str, *, key_id: str | None = None) -> None:
        super().__init__(message)
        self.key_id = key_id


class KeyNotFound(NotFound):
    """No key with this id in this project."""

    code = "key_not_found"


class RotationConflict(Conflict):
    """A KEK rotation or retirement that cannot proceed in the current state."""

    code = "kek_rotation_conflict"
