"""The KEK keyring: directory, single file and command sources; clear errors."""

from __future__ import annotations

import base64
import os
import secrets
import sys
from pathlib import Path

import pytest

from app.config import load_settings
from app.keys import Keyring, KeyringError, KeyUnavailable
from app.keys.keyring import get_keyring, load_keyring, parse_key


def _write(path: Path, key: bytes | None = None, text: str | None = None) -> bytes:
    key = key or secrets.token_bytes(32)
    path.write_text(text if text is not None else base64.b64encode(key).decode() + "\n")
    path.chmod(0o600)
    return key


def _settings(**env: str):
    return load_settings(env)


def test_directory_of_versions(tmp_path: Path) -> None:
    k1 = _write(tmp_path / "v1.key")
    _write(tmp_path / "v3.key")
    _write(tmp_path / "v2.key.bak")  # ignored: not v<N>.key
    (tmp_path / "README").write_text("not a key")
    keyring = load_keyring(_settings(CAP_KEK_DIR=str(tmp_path)))
    assert keyring.versions == (1, 3)
    assert (keyring.lowest, keyring.highest) == (1, 3)
    assert 2 not in keyring
    nonce = os.urandom(12)
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    assert AESGCM(k1).decrypt(nonce, keyring.aead(1).encrypt(nonce, b"x", None), None) == b"x"
    assert base64.b64encode(k1).decode() not in repr(keyring)


def test_missing_version_is_key_unavailable_naming_versions(tmp_path: Path) -> None:
    _write(tmp_path / "v1.key")
    keyring = load_keyring(_settings(CAP_KEK_DIR=str(tmp_path)))
    with pytest.raises(KeyUnavailable) as info:
        keyring.aead(2)
    assert "v2" in info.value.message and "v1" in info.value.message
    assert info.value.kek_version == 2 and info.value.status == 503


@pytest.mark.parametrize(("content", "reason"), [
    ("not base64 at all!!", "not valid base64"),
    (base64.b64encode(b"short").decode(), "decodes to 5 bytes"),
    (base64.b64encode(b"x" * 33).decode(), "decodes to 33 bytes"),
    ("", "decodes to 0 bytes"),
])
def test_bad_key_file_names_the_file_not_the_content(tmp_path: Path, content: str,
                                                     reason: str) -> None:
    _write(tmp_path / "v1.key")
    _write(tmp_path / "v2.key", text=content)
    with pytest.raises(KeyringError) as info:
        load_keyring(_settings(CAP_KEK_DIR=str(tmp_path)))
    message = info.value.message
    assert str(tmp_path / "v2.key") in message and reason in message
    if content:
        assert content not in message


def test_binary_garbage_file(tmp_path: Path) -> None:
    (tmp_path / "v1.key").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(KeyringError, match="v1.key: not valid base64"):
        load_keyring(_settings(CAP_KEK_DIR=str(tmp_path)))


def test_empty_directory(tmp_path: Path) -> None:
    with pytest.raises(KeyringError, match="no KEK file named v<N>.key"):
        load_keyring(_settings(CAP_KEK_DIR=str(tmp_path)))


def test_single_file_version_from_name_else_1(tmp_path: Path) -> None:
    _write(tmp_path / "v7.key")
    _write(tmp_path / "kek.b64")
    assert load_keyring(_settings(CAP_KEK_FILE=str(tmp_path / "v7.key"))).versions == (7,)
    assert load_keyring(_settings(CAP_KEK_FILE=str(tmp_path / "kek.b64"))).versions == (1,)


def test_no_source_configured() -> None:
    with pytest.raises(KeyringError, match="no KEK configured"):
        load_keyring(_settings())


def _command(tmp_path: Path, output: str, status: int = 0) -> str:
    script = tmp_path / "kek-cmd.py"
    script.write_text(f"import sys\nsys.stdout.write({output!r})\nsys.exit({status})\n")
    return f"{sys.executable} {script}"


def test_command_with_one_key_is_v1(tmp_path: Path) -> None:
    key = base64.b64encode(secrets.token_bytes(32)).decode()
    keyring = load_keyring(_settings(CAP_KEK_COMMAND=_command(tmp_path, key + "\n")))
    assert keyring.versions == (1,) and keyring.source == "CAP_KEK_COMMAND"


def test_command_with_versions(tmp_path: Path) -> None:
    a, b = (base64.b64encode(secrets.token_bytes(32)).decode() for _ in range(2))
    keyring = load_keyring(_settings(CAP_KEK_COMMAND=_command(tmp_path, f"v1 {a}\nv2={b}\n")))
    assert keyring.versions == (1, 2)


def test_failing_command_names_status_not_output(tmp_path: Path) -> None:
    with pytest.raises(KeyringError) as info:
        load_keyring(_settings(CAP_KEK_COMMAND=_command(tmp_path, "SECRETSTDOUT", 3)))
    assert "exited with status 3" in info.value.message
    assert "SECRETSTDOUT" not in info.value.message


def test_command_bad_output_and_missing_program(tmp_path: Path) -> None:
    key = base64.b64encode(secrets.token_bytes(32)).decode()
    with pytest.raises(KeyringError, match="line 2: expected 'v<N> <base64>'"):
        load_keyring(_settings(CAP_KEK_COMMAND=_command(tmp_path, f"v1 {key}\nnonsense\n")))
    with pytest.raises(KeyringError, match="v1 given twice"):
        load_keyring(_settings(CAP_KEK_COMMAND=_command(tmp_path, f"v1 {key}\nv1 {key}\n")))
    with pytest.raises(KeyringError, match="not found"):
        load_keyring(_settings(CAP_KEK_COMMAND="/nonexistent/kek-tool get"))


def test_parse_key_and_keyring_guards() -> None:
    with pytest.raises(KeyringError, match="somewhere: decodes to 3 bytes"):
        parse_key("YWJj", "somewhere")
    with pytest.raises(KeyringError):
        Keyring({1: b"short"}, "test")
    with pytest.raises(KeyringError):
        Keyring({}, "test")


def test_cache_reloads_when_a_version_is_missing(tmp_path: Path) -> None:
    _write(tmp_path / "v1.key")
    settings = _settings(CAP_KEK_DIR=str(tmp_path))
    first = get_keyring(settings)
    assert get_keyring(settings) is first
    _write(tmp_path / "v2.key")
    assert get_keyring(settings).versions == (1,)  # cached
    assert get_keyring(settings, need_version=2).versions == (1, 2)


def test_group_readable_file_still_loads(tmp_path: Path) -> None:
    _write(tmp_path / "v1.key")
    (tmp_path / "v1.key").chmod(0o644)
    assert load_keyring(_settings(CAP_KEK_DIR=str(tmp_path))).versions == (1,)
