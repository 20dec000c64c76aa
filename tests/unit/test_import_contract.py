"""The import contracts of DESIGN.md ("Layout"), kept by import-linter (setup.cfg,
``[importlinter]``): app never imports tasks, scheduler or the dev stack; app.acme never
imports app.domain, app.api or app.jobs; app.domain never imports app.api; no cycles
inside app."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("app", "tasks", "scheduler", "devstack")


def lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` over the packages found under ``tree`` (first on the path)."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    exe = Path(sys.executable).with_name("lint-imports")
    return subprocess.run([str(exe), str(tree / "setup.cfg"), "--no-cache"],
                          cwd=tree, env=env, capture_output=True, text=True, timeout=120)


def copy_of_the_tree(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tree / package,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy2(ROOT / "setup.cfg", tree / "setup.cfg")
    return tree


def test_the_tree_keeps_every_import_contract() -> None:
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "4 kept, 0 broken" in result.stdout


@pytest.mark.parametrize("module, line, contract", [
    ("app/acme/client.py", "import app.domain.certificates", "app.acme never imports"),
    ("app/acme/errors.py", "from app import jobs", "app.acme never imports"),
    ("app/domain/orders.py", "import app.api.common", "app.domain never imports app.api"),
    ("app/db/__init__.py" if (ROOT / "app/db/__init__.py").exists() else "app/db.py",
     "import scheduler.lease", "app never imports tasks"),
    ("app/keys/envelope.py", "import app.domain.certificates", "no import cycles"),
])
def test_a_forbidden_import_breaks_the_contract(tmp_path: Path, module: str, line: str,
                                                contract: str) -> None:
    tree = copy_of_the_tree(tmp_path)
    target = tree / module
    target.write_text(target.read_text() + f"\n{line}  # added by the test\n")
    result = lint_imports(tree)
    assert result.returncode != 0, result.stdout[-3000:]
    broken = result.stdout.split("Broken contracts", 1)[-1]
    assert contract in broken, result.stdout[-3000:]
