"""Pytest plugin: after the whole run, no private key sits in any database or log.

What it watches (DESIGN.md invariant 3):

- Every private key the run handled: each key generated or sealed in this process
  (``app.keys.generate_private_key`` / ``seal_private_key`` are wrapped to note it), and
  each key found sealed in a test's database (opened with that test's KEK), including
  keys that worker subprocesses created.
- Every test database: just before a test's ``db`` fixture drops it, every collection of
  it and of its broker database is read as raw BSON; databases of tests without the
  ``db`` fixture stay on the server and are read by the final test.
- Logs: the ``procs`` log files of each test, every ``*.log`` under pytest's base temp
  directory, and the stdout/stderr the app wrote during each test (pytest's own
  "Captured log" copy bypasses the app's redacting handler, so it is not the app's log).

A finding is a PEM private-key block (``-----BEGIN ... PRIVATE KEY-----``) or a key's raw
secret bytes (its private scalar / exponent) or the base64 of them as a PEM body carries
them. Findings are collected here and asserted by ``tests/e2e/test_zz_no_key_leak.py``,
which this plugin moves to the end of the run; they are also listed in the summary.
Findings name where (test, database, collection, document id, file), never the secret.
"""

from __future__ import annotations

import base64
import functools
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

PEM_BLOCK = re.compile(rb"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----")
LEAK_TEST_PREFIX = "test_zz_"
SYSTEM_DATABASES = {"admin", "config", "local"}

# Needles are found with aligned windows: a needle of at least WINDOW + STRIDE - 1 bytes
# always covers one haystack window starting at a multiple of STRIDE.
WINDOW = 16
STRIDE = 16
NEEDLE = 32


@dataclass(repr=False)
class Needles:
    """Secret byte strings of every key seen, searchable in one pass over a haystack."""

    windows: dict[bytes, list[int]] = field(default_factory=dict)
    needles: list[bytes] = field(default_factory=list)
    seen: set[bytes] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add_pem(self, pem: bytes) -> None:
        for needle in secret_needles(pem):
            self._add(needle)

    def _add(self, needle: bytes) -> None:
        with self.lock:
            if needle in self.seen or len(needle) < WINDOW + STRIDE - 1:
                return
            self.seen.add(needle)
            index = len(self.needles)
            self.needles.append(needle)
            for offset in range(STRIDE):
                self.windows.setdefault(needle[offset:offset + WINDOW], []).append(
                    index * STRIDE + offset)

    def __len__(self) -> int:
        return len(self.needles)

    def __repr__(self) -> str:  # never show the secrets, not even in a failed assert
        return f"Needles({len(self.needles)} secrets)"

    def found_anywhere(self, data: bytes) -> bool:
        """found_in, also across line breaks (a PEM body is wrapped at 64 characters,
        and JSON logs escape its newlines as \\n)."""
        if self.found_in(data):
            return True
        joined = data.replace(b"\\r", b"").replace(b"\\n", b"").replace(b"\r", b"") \
            .replace(b"\n", b"")
        return joined != data and self.found_in(joined)

    def found_in(self, data: bytes) -> bool:
        windows = self.windows
        if not windows:
            return False
        for position in range(0, len(data) - WINDOW + 1, STRIDE):
            hits = windows.get(data[position:position + WINDOW])
            if not hits:
                continue
            for code in hits:
                needle = self.needles[code // STRIDE]
                start = position - code % STRIDE
                if start >= 0 and data[start:start + len(needle)] == needle:
                    return True
        return False


def _int_bytes(value: int) -> bytes:
    return value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big")


def secret_needles(pem: bytes) -> list[bytes]:
    """The key's private scalar (EC) or private exponent (RSA), raw, and the base64 chars
    that carry it inside the PKCS#8 PEM body."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    try:
        key = serialization.load_pem_private_key(pem, None,
                                                 unsafe_skip_rsa_key_validation=True)
    except (ValueError, TypeError):
        return []
    if isinstance(key, ec.EllipticCurvePrivateKey):
        size = (key.curve.key_size + 7) // 8
        secret = key.private_numbers().private_value.to_bytes(size, "big")
    elif isinstance(key, rsa.RSAPrivateKey):
        secret = _int_bytes(key.private_numbers().d)
    else:
        return []
    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    needles = [secret[:NEEDLE]]
    start = der.find(secret)
    if start >= 0:
        first = -(-start // 3)  # the first base64 group made of secret bytes only
        encoded = base64.b64encode(der)
        chunk = encoded[first * 4:first * 4 + NEEDLE]
        if len(chunk) == NEEDLE and (len(secret) - (first * 3 - start)) * 4 // 3 >= NEEDLE:
            needles.append(chunk)
    return needles


@dataclass
class Finding:
    where: str
    what: str

    def __str__(self) -> str:
        return f"{self.what} in {self.where}"


class KeyLeakWatch:
    """The plugin object: registry of keys, findings, and the hooks."""

    def __repr__(self) -> str:
        return f"KeyLeakWatch({len(self.needles)} secrets, {len(self.findings)} findings)"

    def __init__(self) -> None:
        self.needles = Needles()
        self.findings: list[Finding] = []
        self.databases_scanned = 0
        self.documents_scanned = 0
        self.files_scanned = 0
        self._patched = False

    # -- the registry ----------------------------------------------------------------

    def note_pem(self, pem: object) -> None:
        if isinstance(pem, (bytes, bytearray)):
            try:
                self.needles.add_pem(bytes(pem))
            except Exception:  # noqa: BLE001 - watching must never break a test
                pass

    def patch_key_functions(self) -> None:
        """Wrap generate/seal so every key this process handles is noted."""
        if self._patched:
            return
        self._patched = True
        import app.keys as keys
        import app.keys.keygen as keygen
        import app.keys.store as store

        def watch_generate(fn: Callable[..., bytes]) -> Callable[..., bytes]:
            @functools.wraps(fn)
            def wrapper(*args: Any, **kwargs: Any) -> bytes:
                pem = fn(*args, **kwargs)
                self.note_pem(pem)
                return pem
            return wrapper

        def watch_seal(fn: Callable[..., str]) -> Callable[..., str]:
            @functools.wraps(fn)
            def wrapper(db: Any, private_key_pem: bytes, *args: Any, **kwargs: Any) -> str:
                self.note_pem(private_key_pem)
                return fn(db, private_key_pem, *args, **kwargs)
            return wrapper

        generate = watch_generate(keygen.generate_private_key)
        seal = watch_seal(store.seal_private_key)
        keygen.generate_private_key = generate  # type: ignore[assignment]
        keys.generate_private_key = generate  # type: ignore[assignment]
        store.seal_private_key = seal  # type: ignore[assignment]
        keys.seal_private_key = seal  # type: ignore[assignment]

    # -- scanning --------------------------------------------------------------------

    def scan_bytes(self, data: bytes, where: str) -> None:
        if PEM_BLOCK.search(data):
            self.findings.append(Finding(where, "a PEM private key block"))
        elif self.needles.found_anywhere(data):
            self.findings.append(Finding(where, "raw private key bytes"))

    def note_sealed_keys(self, database: Any, kek_env: dict[str, str] | None) -> None:
        """Open every sealed key of ``database`` with the test's KEK and note it."""
        if not kek_env:
            return
        try:
            from app.config import load_settings
            from app.keys import envelope, load_keyring
            from app.keys.store import sealed_of

            keyring = load_keyring(load_settings(kek_env))
        except Exception:  # noqa: BLE001 - no usable KEK for this test
            return
        for record in database["keys"].find({}):
            try:
                sealed = sealed_of(record)
                if sealed.kek_version not in keyring:
                    continue
                pem = envelope.open_sealed(sealed, key_id=str(record["_id"]),
                                           project_id=str(record["project_id"]),
                                           kek=keyring.aead(sealed.kek_version))
            except Exception:  # noqa: BLE001 - tampered records in tests, other KEKs
                continue
            self.note_pem(pem)

    def scan_database(self, client: Any, name: str, label: str) -> None:
        from bson.codec_options import CodecOptions
        from bson.raw_bson import RawBSONDocument

        options = CodecOptions(document_class=RawBSONDocument)
        database = client.get_database(name, codec_options=options)
        self.databases_scanned += 1
        for collection in database.list_collection_names():
            if collection.startswith("system."):
                continue
            for raw in database[collection].find({}):
                self.documents_scanned += 1
                data = bytes(raw.raw)
                if PEM_BLOCK.search(data) or self.needles.found_anywhere(data):
                    doc_id = raw.get("_id", "?")
                    self.scan_bytes(data, f"{label}: {name}.{collection} _id={doc_id!s:.80}")

    def scan_test_database(self, item: pytest.Item) -> None:
        funcargs = getattr(item, "funcargs", {})
        database = funcargs.get("migrated_db")
        if database is None:
            database = funcargs.get("db")
        if database is None or not hasattr(database, "client"):
            return
        env = funcargs.get("cap_env")
        own_client: Any = None
        try:
            from pymongo.errors import InvalidOperation

            try:
                database.client.list_database_names()
            except InvalidOperation:  # the test closed the app's clients: use our own
                from pymongo import MongoClient

                own_client = MongoClient((env or {})["CAP_MONGO_URI"],
                                         serverSelectionTimeoutMS=5000, tz_aware=True)
                database = own_client.get_database(database.name)
            self.note_sealed_keys(database, env)
            names = [database.name]
            settings = funcargs.get("settings")
            broker = getattr(settings, "broker_db", None) or (env or {}).get("CAP_BROKER_DB")
            if broker:
                names.append(broker)
            existing = set(database.client.list_database_names())
            for name in names:
                if name in existing:
                    self.scan_database(database.client, name, item.nodeid)
        except Exception as exc:  # noqa: BLE001 - a dead server is the test's own business
            self.findings.append(Finding(item.nodeid, f"database not scannable "
                                                      f"({exc.__class__.__name__})"))
        finally:
            if own_client is not None:
                own_client.close()

    def scan_files(self, paths: Iterable[Path], label: str) -> None:
        for path in paths:
            try:
                data = path.read_bytes()
            except OSError:
                continue
            self.files_scanned += 1
            self.scan_bytes(data, f"{label}: {path}")

    def scan_all_databases(self, uri: str, label: str, only_prefix: str | None) -> None:
        from pymongo import MongoClient

        client: Any = MongoClient(uri, serverSelectionTimeoutMS=5000, tz_aware=True)
        try:
            for name in client.list_database_names():
                if name in SYSTEM_DATABASES or (only_prefix and not name.startswith(only_prefix)):
                    continue
                self.scan_database(client, name, label)
        finally:
            client.close()

    # -- hooks -----------------------------------------------------------------------

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        last = [i for i in items if Path(str(i.fspath)).name.startswith(LEAK_TEST_PREFIX)]
        if last:
            items[:] = [i for i in items if i not in last] + last

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_teardown(self, item: pytest.Item) -> Iterator[None]:
        self.patch_key_functions()
        self.scan_test_database(item)  # before the db fixture drops it
        yield
        procs = getattr(item, "funcargs", {}).get("procs")
        log_dir = getattr(procs, "log_dir", None)
        if isinstance(log_dir, Path) and log_dir.is_dir():
            self.scan_files(sorted(log_dir.rglob("*")), item.nodeid)

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item,
                                  call: pytest.CallInfo[None]) -> Iterator[None]:
        outcome = yield
        report = outcome.get_result()
        for name, text in getattr(report, "sections", []):
            if name.startswith("Captured stdout") or name.startswith("Captured stderr"):
                self.scan_bytes(text.encode(errors="replace"), f"{item.nodeid}: {name}")

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.findings:
            terminalreporter.section("private key leaks", sep="!", red=True)
            for finding in dict.fromkeys(str(f) for f in self.findings):
                terminalreporter.line(finding)


_WATCH = KeyLeakWatch()


def watch() -> KeyLeakWatch:
    return _WATCH


def pytest_configure(config: pytest.Config) -> None:
    if not config.pluginmanager.has_plugin("key-leak-watch"):
        config.pluginmanager.register(_WATCH, "key-leak-watch")
        _WATCH.patch_key_functions()
