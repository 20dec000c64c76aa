"""The KEK keyring: versioned key-encryption keys read from outside MongoDB.

Sources (at most one is configured, see ``app/config.py``):

- ``CAP_KEK_DIR``: a directory of files named ``v<N>.key`` (N = 1, 2, ...); each holds
  base64 of exactly 32 random bytes (an AES-256 key). Other files are ignored.
- ``CAP_KEK_FILE``: one such file. Its version is N when it is named ``v<N>.key``,
  otherwise 1.
- ``CAP_KEK_COMMAND``: a program (split like a shell command line, run without a shell,
  15 s timeout) that prints either one base64 key (version 1) or one line per version,
  ``v<N> <base64>`` (``v<N>=<base64>`` also works). For Vault or a cloud KMS CLI.

Which version seals new keys is NOT decided here: adding a file never changes it. The
active version is the target of the last ``certautopilot kek rotate`` recorded in the
database, or the lowest version of the keyring before any rotation (``app.keys.store``).

A keyring is cached per process for ``CACHE_SECONDS`` and re-read at once when a version
it lacks is asked for, so a pod picks up a newly mounted key without a restart.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
import shlex
import subprocess
import threading
import time
from collections.abc import Mapping
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from app.config import Settings, load_settings
from app.keys.errors import KeyringError, KeyUnavailable

log = logging.getLogger(__name__)

KEK_BYTES = 32
CACHE_SECONDS = 30.0
COMMAND_TIMEOUT_SECONDS = 15.0
_FILE_NAME = re.compile(r"^v([1-9][0-9]{0,8})\.key$")
_COMMAND_LINE = re.compile(r"^v([1-9][0-9]{0,8})\s*[=: ]\s*(\S+)$")


class Keyring:
    """KEK versions of this process. Holds AES-GCM objects, never shows key bytes."""

    def __init__(self, keys: Mapping[int, bytes], source: str) -> None:
        if not keys:
            raise KeyringError(f"{source}: no KEK found")
        for version, key in keys.items():
            if len(key) != KEK_BYTES:  # loaders check this; a guard for direct use
                raise KeyringError(f"{source}: KEK v{version} is not {KEK_BYTES} bytes")
        self._aead = {int(v): AESGCM(bytes(k)) for v, k in keys.items()}
        self.source = source

    @property
    def versions(self) -> tuple[int, ...]:
        return tuple(sorted(self._aead))

    @property
    def lowest(self) -> int:
        return min(self._aead)

    @property
    def highest(self) -> int:
        return max(self._aead)

    def __contains__(self, version: object) -> bool:
        return version in self._aead

    def aead(self, version: int) -> AESGCM:
        """The AES-256-GCM cipher of KEK ``version``; KeyUnavailable if it is absent."""
        try:
            return self._aead[version]
        except KeyError:
            raise KeyUnavailable(
                f"KEK v{version} is not in this process's keyring ({self.source}, versions "
                f"{', '.join(f'v{v}' for v in self.versions)}): install it on every pod",
                kek_version=version) from None

    def __repr__(self) -> str:
        return f"Keyring(source={self.source!r}, versions={list(self.versions)})"


def parse_key(text: str, where: str) -> bytes:
    """Decode one KEK (base64 of exactly 32 bytes); the error names ``where``, never the
    content."""
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise KeyringError(f"{where}: not valid base64 (expected base64 of "
                           f"{KEK_BYTES} random bytes)") from None
    if len(key) != KEK_BYTES:
        raise KeyringError(f"{where}: decodes to {len(key)} bytes, expected exactly "
                           f"{KEK_BYTES} (base64 of {KEK_BYTES} random bytes)")
    return key


_warned_modes: set[Path] = set()


def _read_key_file(path: Path, variable: str) -> bytes:
    where = f"{variable} file {path}"
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="ascii")
    except UnicodeDecodeError:
        raise KeyringError(f"{where}: not valid base64 (expected base64 of "
                           f"{KEK_BYTES} random bytes)") from None
    except OSError as exc:
        raise KeyringError(f"{where}: cannot be read ({exc.strerror or exc.__class__.__name__})"
                           ) from None
    if mode & 0o077 and path not in _warned_modes:
        _warned_modes.add(path)
        log.warning("KEK file is readable by group or others; use mode 0600",
                    extra={"path": str(path), "mode": oct(mode & 0o777)})
    return parse_key(text, where)


def _from_dir(directory: Path) -> Keyring:
    keys: dict[int, bytes] = {}
    try:
        entries = sorted(directory.iterdir())
    except OSError as exc:
        raise KeyringError(f"CAP_KEK_DIR {directory}: cannot be listed "
                           f"({exc.strerror or exc.__class__.__name__})") from None
    for entry in entries:
        match = _FILE_NAME.match(entry.name)
        if match and entry.is_file():
            keys[int(match.group(1))] = _read_key_file(entry, "CAP_KEK_DIR")
    if not keys:
        raise KeyringError(f"CAP_KEK_DIR {directory}: no KEK file named v<N>.key "
                           "(e.g. v1.key holding base64 of 32 random bytes)")
    return Keyring(keys, f"CAP_KEK_DIR={directory}")


def _from_file(path: Path) -> Keyring:
    match = _FILE_NAME.match(path.name)
    version = int(match.group(1)) if match else 1
    return Keyring({version: _read_key_file(path, "CAP_KEK_FILE")}, f"CAP_KEK_FILE={path}")


def _from_command(command: str) -> Keyring:
    source = "CAP_KEK_COMMAND"
    try:
        argv = shlex.split(command)
    except ValueError:
        raise KeyringError(f"{source}: cannot be parsed as a command line") from None
    if not argv:
        raise KeyringError(f"{source}: empty command")
    try:
        result = subprocess.run(argv, capture_output=True, timeout=COMMAND_TIMEOUT_SECONDS,
                                check=False, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise KeyringError(f"{source}: program {argv[0]!r} not found") from None
    except subprocess.TimeoutExpired:
        raise KeyringError(f"{source}: no answer within {COMMAND_TIMEOUT_SECONDS:g} s") from None
    except OSError as exc:
        raise KeyringError(f"{source}: cannot run {argv[0]!r} "
                           f"({exc.strerror or exc.__class__.__name__})") from None
    if result.returncode != 0:
        # Its stderr is not echoed: a failing secret tool may print what it was given.
        raise KeyringError(f"{source}: {argv[0]!r} exited with status {result.returncode}")
    try:
        lines = [line.strip() for line in result.stdout.decode("ascii").splitlines()]
    except UnicodeDecodeError:
        raise KeyringError(f"{source}: output is not ASCII base64") from None
    lines = [line for line in lines if line]
    keys: dict[int, bytes] = {}
    if len(lines) == 1 and not _COMMAND_LINE.match(lines[0]):
        keys[1] = parse_key(lines[0], f"{source} output")
    else:
        for number, line in enumerate(lines, 1):
            match = _COMMAND_LINE.match(line)
            if not match:
                raise KeyringError(f"{source} output line {number}: expected 'v<N> <base64>'")
            version = int(match.group(1))
            if version in keys:
                raise KeyringError(f"{source} output: KEK v{version} given twice")
            keys[version] = parse_key(match.group(2), f"{source} output line {number} "
                                                      f"(v{version})")
    if not keys:
        raise KeyringError(f"{source}: printed no key")
    return Keyring(keys, source)


def load_keyring(settings: Settings) -> Keyring:
    """Read the configured KEK source now; KeyringError names what is wrong."""
    if settings.kek_dir is not None:
        return _from_dir(settings.kek_dir)
    if settings.kek_file is not None:
        return _from_file(settings.kek_file)
    if settings.kek_command:
        return _from_command(settings.kek_command)
    raise KeyringError("no KEK configured: set CAP_KEK_DIR (or CAP_KEK_FILE or "
                       "CAP_KEK_COMMAND)")


_cache: dict[tuple[str | None, str | None, str | None], tuple[float, Keyring]] = {}
_cache_lock = threading.Lock()


def _source_key(settings: Settings) -> tuple[str | None, str | None, str | None]:
    return (str(settings.kek_dir) if settings.kek_dir else None,
            str(settings.kek_file) if settings.kek_file else None, settings.kek_command)


def get_keyring(settings: Settings | None = None, *, max_age: float = CACHE_SECONDS,
                need_version: int | None = None) -> Keyring:
    """The process's keyring, re-read when older than ``max_age`` seconds or when it lacks
    ``need_version``."""
    settings = settings or current_settings()
    key = _source_key(settings)
    now = time.monotonic()
    with _cache_lock:
        cached = _cache.get(key)
    if cached is not None:
        loaded_at, keyring = cached
        if now - loaded_at <= max_age and (need_version is None or need_version in keyring):
            return keyring
    keyring = load_keyring(settings)
    with _cache_lock:
        _cache[key] = (time.monotonic(), keyring)
    return keyring


def clear_cache() -> None:
    with _cache_lock:
        _cache.clear()


def current_settings() -> Settings:
    """Settings of the running app (inside a Flask app context), else from the environment."""
    try:
        from flask import current_app, has_app_context
    except ImportError:  # pragma: no cover - flask is a runtime dependency
        has_app_context = None  # type: ignore[assignment]
    if has_app_context is not None and has_app_context():
        settings = current_app.extensions.get("cap_settings")
        if isinstance(settings, Settings):
            return settings
    return load_settings()
