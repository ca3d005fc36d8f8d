"""The library's code passes its linter and formatter (configured in pyproject.toml)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def ruff(*args: str) -> subprocess.CompletedProcess:
    executable = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if executable is None:
        pytest.fail("ruff is not installed: pip install '.[test]'")
    return subprocess.run([executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_ruff_lint_passes() -> None:
    result = ruff("check", "ptools")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format_is_applied() -> None:
    result = ruff("format", "--check", "ptools")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_passes() -> None:
    executable = shutil.which("mypy", path=str(Path(sys.executable).parent)) or shutil.which("mypy")
    if executable is None:
        pytest.fail("mypy is not installed: pip install '.[test]'")
    result = subprocess.run([executable], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
