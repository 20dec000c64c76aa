"""`certautopilot kek rotate | status | retire`."""

from __future__ import annotations

import base64
import json
import secrets

from click.testing import CliRunner

from app import db as dbm
from app.cli import cli
from app.keys import generate_private_key, seal_private_key
from app.keys.rotation import run_step


def test_rotate_status_retire(migrated_db, cap_env, kek_dir) -> None:
    for _ in range(8):
        seal_private_key(migrated_db, generate_private_key("ec256"), project_id="p",
                         purpose="cert")
    runner = CliRunner()
    result = runner.invoke(cli, ["kek", "status"])
    assert result.exit_code == 0, result.output
    assert "active KEK: v1" in result.output and "keys: 8 (v1: 8)" in result.output
    assert "rotation: none recorded" in result.output

    result = runner.invoke(cli, ["kek", "rotate", "--to", "2"])
    assert result.exit_code == 1
    assert "KEK v2 is not in this process's keyring" in result.output

    (kek_dir / "v2.key").write_text(base64.b64encode(secrets.token_bytes(32)).decode())
    result = runner.invoke(cli, ["kek", "rotate", "--to", "2"])
    assert result.exit_code == 0, result.output
    assert "8 key(s) to re-wrap" in result.output
    again = runner.invoke(cli, ["kek", "rotate", "--to", "2"])
    assert again.exit_code == 1 and "already in progress" in again.output

    from app.config import load_settings
    from app.keys import load_keyring

    ring = load_keyring(load_settings())
    run_step(migrated_db, ring, owner="t", batch_size=3, budget_seconds=0)
    result = runner.invoke(cli, ["kek", "status"])
    assert result.exit_code == 0, result.output
    assert "[" + "#" * 11 in result.output and "3/8 keys re-wrapped, 5 remaining" in result.output
    assert "running" in result.output

    refused = runner.invoke(cli, ["kek", "retire", "1"])
    assert refused.exit_code == 1 and "in progress" in refused.output

    run_step(migrated_db, ring, owner="t", budget_seconds=60)
    result = runner.invoke(cli, ["kek", "status", "--watch", "--interval", "0.1"])
    assert result.exit_code == 0, result.output
    assert "100.0%" in result.output and "8/8 keys re-wrapped, 0 remaining" in result.output
    data = json.loads(runner.invoke(cli, ["kek", "status", "--json"]).output)
    assert data["rotation"]["state"] == "done" and data["keys_by_version"] == {"2": 8}

    result = runner.invoke(cli, ["kek", "retire", "1"])
    assert result.exit_code == 0, result.output
    assert "KEK v1 retired" in result.output
    assert migrated_db[dbm.AUDIT].count_documents({"action": "kek.retire"}) == 1
    result = runner.invoke(cli, ["kek", "retire", "2"])
    assert result.exit_code == 1 and "active version" in result.output
    bad = runner.invoke(cli, ["kek", "rotate", "--to", "0"])
    assert bad.exit_code == 2


def test_status_watch_follows_a_running_rotation(migrated_db, cap_env, kek_dir) -> None:
    import threading
    import time

    from app.config import load_settings
    from app.keys import load_keyring

    for _ in range(12):
        seal_private_key(migrated_db, generate_private_key("ec256"), project_id="p",
                         purpose="cert")
    (kek_dir / "v2.key").write_text(base64.b64encode(secrets.token_bytes(32)).decode())
    runner = CliRunner()
    assert runner.invoke(cli, ["kek", "rotate", "--to", "2"]).exit_code == 0
    ring = load_keyring(load_settings())

    def steps() -> None:
        time.sleep(0.5)
        while run_step(migrated_db, ring, owner="t", batch_size=2,
                       budget_seconds=0)["state"] != "done":
            time.sleep(0.1)

    stepper = threading.Thread(target=steps)
    stepper.start()
    try:
        result = runner.invoke(cli, ["kek", "status", "--watch", "--interval", "0.1"])
    finally:
        stepper.join()
    assert result.exit_code == 0, result.output
    assert "re-wrapping under v2" in result.output
    assert "12/12 keys re-wrapped, 0 remaining" in result.output
