"""Every hostile file × every command that opens it, as a real subprocess under a memory limit
and a timeout: exit 1, one line on stderr, no traceback, no payload ran, nothing outside the
output folder changed, and no file (temporary or not) left in the output folder."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.hostile.corpus import CASES, Case
from tests.hostile.harness import (
    TORCH_COMMANDS,
    TORCH_FREE_LIMIT,
    TORCH_LIMIT,
    command_line,
    files_under,
    run_ptools,
    snapshot,
)

RUNS = [pytest.param(case, command, id=f"{case.attack}-{case.name}-{command}")
        for case in CASES for command in case.commands]

# Whole-model files are opened by torch after ptools' checks: torch's import needs more room.
_TORCH_CASES = {"pt2"}


_BUILT: dict[str, tuple[Path, Path, Path]] = {}


@pytest.fixture
def built(tmp_path_factory: pytest.TempPathFactory) -> Callable[[Case], tuple[Path, Path, Path]]:
    """Each case built once per session, in a folder of its own: (folder, input, marker)."""
    def build(case: Case) -> tuple[Path, Path, Path]:
        if case.name not in _BUILT:
            folder = tmp_path_factory.mktemp(case.name)
            marker = folder / "PAYLOAD_RAN"
            _BUILT[case.name] = (folder, case.build(folder, marker), marker)
        return _BUILT[case.name]
    return build


@pytest.mark.parametrize(("case", "command"), RUNS)
def test_hostile_input_is_refused_cleanly(case: Case, command: str,
                                          built: Callable[[Case], tuple[Path, Path, Path]], tmp_path: Path) -> None:
    folder, target, marker = built(case)
    out = tmp_path / "out"
    out.mkdir()
    before = snapshot(folder, skip=out)
    torch_needed = command in TORCH_COMMANDS or case.attack in _TORCH_CASES
    run = run_ptools(command_line(command, target, out), TORCH_LIMIT if torch_needed else TORCH_FREE_LIMIT,
                     cwd=tmp_path)
    assert not run.timed_out, f"still running after {run.seconds:.0f} s"
    assert not marker.exists(), "the payload ran"
    assert "Traceback" not in run.stderr, run.stderr[-2000:]
    assert run.returncode == 1, (run.returncode, run.stderr[-2000:])
    lines = run.stderr.splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], run.stderr[-2000:]
    assert len(errors[0]) < 600, errors[0]
    assert case.expect in errors[0], errors[0]
    assert run.stdout == "", run.stdout[:500]
    assert snapshot(folder, skip=out) == before, "files beside the input changed"
    assert files_under(out) == [], "something was left in the output folder"
