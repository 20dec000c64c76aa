"""/readyz and `certautopilot health` prove the KEK is present and right."""

from __future__ import annotations

import base64
import secrets
from pathlib import Path

from click.testing import CliRunner

from app import create_app
from app import db as dbm
from app.cli import cli
from app.config import load_settings
from app.keys import generate_private_key, seal_private_key


def kek_dir_with(path: Path, **versions: bytes | str | None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for name, key in versions.items():
        text = key if isinstance(key, str) else base64.b64encode(
            key or secrets.token_bytes(32)).decode()
        (path / f"{name}.key").write_text(text)
    return path


def readyz(cap_env: dict[str, str], **overrides: str):
    settings = load_settings({**cap_env, **overrides})
    return create_app(settings).test_client().get("/readyz")


def test_right_kek_200_wrong_kek_503_with_reason(migrated_db, cap_env, tmp_path) -> None:
    ok = readyz(cap_env)  # fresh install: nothing sealed yet, no canary
    assert ok.status_code == 200, ok.json
    assert ok.json["checks"]["kek"]["no_canary_yet"] == ["v1"]
    seal_private_key(migrated_db, generate_private_key("ec256"), project_id="p",
                     purpose="cert")
    ok = readyz(cap_env)
    assert ok.status_code == 200, ok.json
    kek = ok.json["checks"]["kek"]
    assert kek["ok"] is True and kek["active_version"] == "v1" and kek["versions"] == ["v1"]

    wrong = kek_dir_with(tmp_path / "wrong", v1=None)
    bad = readyz(cap_env, CAP_KEK_DIR=str(wrong))
    assert bad.status_code == 503
    assert bad.json["ready"] is False and bad.json["checks"]["database"]["ok"] is True
    assert bad.json["checks"]["kek"]["ok"] is False
    assert "KEK v1" in bad.json["checks"]["kek"]["error"]
    assert "wrong key" in bad.json["checks"]["kek"]["error"]
    assert readyz(cap_env).status_code == 200


def test_wrong_kek_detected_without_canary_from_an_existing_key(migrated_db, cap_env,
                                                                tmp_path) -> None:
    seal_private_key(migrated_db, generate_private_key("ec256"), project_id="p",
                     purpose="cert")
    migrated_db["kek_versions"].delete_many({})
    wrong = kek_dir_with(tmp_path / "wrong", v1=None)
    bad = readyz(cap_env, CAP_KEK_DIR=str(wrong))
    assert bad.status_code == 503 and "wrong key" in bad.json["checks"]["kek"]["error"]


def test_missing_or_malformed_kek_503_names_the_file(migrated_db, cap_env, tmp_path) -> None:
    empty = kek_dir_with(tmp_path / "empty")
    response = readyz(cap_env, CAP_KEK_DIR=str(empty))
    assert response.status_code == 503
    assert "no KEK file named v<N>.key" in response.json["checks"]["kek"]["error"]
    content = "c2hvcnQ="
    malformed = kek_dir_with(tmp_path / "malformed", v1=content)
    response = readyz(cap_env, CAP_KEK_DIR=str(malformed))
    assert response.status_code == 503
    error = response.json["checks"]["kek"]["error"]
    assert str(malformed / "v1.key") in error and content not in error
    no_source = {k: v for k, v in cap_env.items() if k != "CAP_KEK_DIR"}
    response = create_app(load_settings(no_source)).test_client().get("/readyz")
    assert response.status_code == 503
    assert "no KEK configured" in response.json["checks"]["kek"]["error"]


def test_keys_under_a_version_the_keyring_lacks_503(migrated_db, cap_env, tmp_path) -> None:
    key_id = seal_private_key(migrated_db, generate_private_key("ec256"), project_id="p",
                              purpose="cert")
    migrated_db[dbm.KEYS].update_one({"_id": key_id}, {"$set": {"kek_version": 4}})
    response = readyz(cap_env)
    assert response.status_code == 503
    assert "sealed under KEK v4" in response.json["checks"]["kek"]["error"]


def test_active_version_missing_from_keyring_503(migrated_db, cap_env, kek_dir) -> None:
    from app.audit import system_actor
    from app.keys import load_keyring
    from app.keys.rotation import start_rotation

    seal_private_key(migrated_db, generate_private_key("ec256"), project_id="p",
                     purpose="cert")
    kek_dir_with(kek_dir, v2=None)
    start_rotation(migrated_db, 2, keyring=load_keyring(load_settings(cap_env)),
                   actor=system_actor("cli"))
    (kek_dir / "v2.key").unlink()  # a pod that never got the new secret
    response = readyz(cap_env)
    assert response.status_code == 503
    assert "active KEK v2 is not in" in response.json["checks"]["kek"]["error"]


def test_health_cli_reports_the_kek(migrated_db, cap_env, tmp_path, monkeypatch) -> None:
    seal_private_key(migrated_db, generate_private_key("ec256"), project_id="p",
                     purpose="cert")
    runner = CliRunner()
    result = runner.invoke(cli, ["health"])
    # No scheduler or worker runs in this test (tests/integration/test_health_cli.py
    # covers those checks); the KEK's line is what this test is about.
    assert "ok   kek:" in result.output, result.output
    monkeypatch.setenv("CAP_KEK_DIR", str(kek_dir_with(tmp_path / "wrong", v1=None)))
    result = runner.invoke(cli, ["health", "--json"])
    assert result.exit_code == 1
    assert '"wrong key' not in result.output  # the reason is a sentence, not a quoted key
    assert "is the wrong key" in result.output


def test_kek_command_source(migrated_db, cap_env, kek_dir, tmp_path) -> None:
    import sys

    seal_private_key(migrated_db, generate_private_key("ec256"), project_id="p",
                     purpose="cert")
    key = (kek_dir / "v1.key").read_text().strip()
    script = tmp_path / "kek-tool.py"
    script.write_text("import sys\nif sys.argv[1] == 'ok':\n    print('v1 ' + open(sys.argv[2])"
                      ".read().strip())\nelse:\n    sys.exit(4)\n")
    no_dir = {k: v for k, v in cap_env.items() if k != "CAP_KEK_DIR"}
    good = f"{sys.executable} {script} ok {kek_dir / 'v1.key'}"
    app = create_app(load_settings({**no_dir, "CAP_KEK_COMMAND": good}))
    response = app.test_client().get("/readyz")
    assert response.status_code == 200, response.json
    assert response.json["checks"]["kek"]["source"] == "CAP_KEK_COMMAND"
    bad = f"{sys.executable} {script} fail"
    response = create_app(load_settings({**no_dir, "CAP_KEK_COMMAND": bad})).test_client() \
        .get("/readyz")
    assert response.status_code == 503
    error = response.json["checks"]["kek"]["error"]
    assert "exited with status 4" in error and key not in error
