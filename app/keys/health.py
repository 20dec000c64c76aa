"""The ``kek`` readiness check: the KEK is present and right, without touching real keys.

Fails (and names the reason) when the KEK source cannot be read or is malformed, when the
active version is not in the keyring, when a version's key does not open its canary (a
wrong key), or when keys are sealed under a version the keyring lacks. It writes nothing.
"""

from __future__ import annotations

from typing import Any

from pymongo.database import Database
from pymongo.errors import PyMongoError

from app import db as dbm
from app.db import Doc
from app.errors import CertAutoPilotError
from app.keys import canary
from app.keys.keyring import current_settings, get_keyring
from app.keys.rotation import retired_versions
from app.keys.store import active_version

# How old a keyring the probe may use: files are cheap to re-read; a KEK command (Vault,
# a KMS CLI) is not run on every probe.
READINESS_CACHE_SECONDS = 5.0
READINESS_COMMAND_CACHE_SECONDS = 60.0


def kek_check(db: Database[Doc]) -> tuple[bool, dict[str, Any]]:
    """Listed in ``app.health.CHECKS``."""
    settings = current_settings()
    max_age = READINESS_COMMAND_CACHE_SECONDS if settings.kek_command \
        else READINESS_CACHE_SECONDS
    try:
        keyring = get_keyring(settings, max_age=max_age)
    except CertAutoPilotError as exc:
        return False, {"error": exc.message}
    detail: dict[str, Any] = {"source": keyring.source,
                              "versions": [f"v{v}" for v in keyring.versions]}
    try:
        active = active_version(db, keyring)
        detail["active_version"] = f"v{active}"
        if active not in keyring:
            return False, {**detail, "error": f"the active KEK v{active} is not in this "
                                               f"process's keyring ({keyring.source})"}
        retired = set(retired_versions(db))
        unverified = []
        for version in keyring.versions:
            if version in retired:
                continue
            state = canary.check(db, keyring, version)
            if state is False:
                return False, {**detail, "error": canary.wrong_kek(version, keyring).message}
            if state is None:
                if canary.contradicting_record(db, keyring.aead(version), version):
                    return False, {**detail,
                                   "error": canary.wrong_kek(version, keyring).message}
                unverified.append(f"v{version}")
        orphan = dbm.retry(lambda: dbm.primary(db)[dbm.KEYS].find_one(
            {"kek_version": {"$nin": list(keyring.versions)}}, {"kek_version": 1}),
            what="look for keys under a missing KEK")
        if orphan is not None:
            return False, {**detail, "error": f"keys are sealed under KEK "
                                              f"v{orphan.get('kek_version')}, which is not in "
                                              f"this process's keyring ({keyring.source})"}
    except CertAutoPilotError as exc:
        return False, {**detail, "error": exc.message}
    except PyMongoError as exc:
        return False, {**detail, "error": f"cannot read KEK state: {exc.__class__.__name__}"}
    if unverified:
        # No canary yet (nothing sealed under these versions): the first seal stores it.
        detail["no_canary_yet"] = unverified
    return True, detail

