"""``import ptools`` gives the documented entry points, lazily and torch-free."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import ptools

ROOT = Path(__file__).resolve().parents[1]


def test_import_ptools_imports_neither_torch_nor_numpy() -> None:
    process = subprocess.run([sys.executable, "-X", "importtime", "-c", "import ptools; ptools.__all__"],
                             capture_output=True, text=True, timeout=60)
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0]
                for line in process.stderr.splitlines() if line.startswith("import time:")}
    assert process.returncode == 0 and not imported & {"torch", "torchvision", "numpy", "typer", "rich"}


@pytest.mark.parametrize("name", [n for n in ptools.__all__ if not n.startswith("__")])
def test_every_public_name_resolves_to_its_core_definition(name: str) -> None:
    value = getattr(ptools, name)
    assert callable(value) and (value.__module__.startswith("ptools.") or name.endswith("Error"))


def test_unknown_names_are_attribute_errors() -> None:
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        ptools.nope  # noqa: B018


def test_the_package_is_marked_typed() -> None:
    assert (ROOT / "ptools" / "py.typed").exists()
    assert 'ptools = ["py.typed"]' in (ROOT / "pyproject.toml").read_text()
