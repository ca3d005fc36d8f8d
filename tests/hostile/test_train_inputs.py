"""``summary --train``'s own inputs, as an attacker (or a typo) would give them, in a real
process under a memory limit: sizes no machine has, budgets no GPU has, sweeps without end.
Each is refused in one line, or answered on the meta device without allocating."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.hostile.harness import TORCH_LIMIT, run_ptools

SPEC_HUGE = '{"args": [{"shape": [1, 3, 100000, 100000]}]}'


@pytest.mark.parametrize(("arguments", "expect"), [
    # A batch the real device cannot hold: the allocator's refusal, in one line.
    (["--device", "cpu", "--sweep", "input=3x100000x100000"], "cannot make the inputs"),
    (["--device", "cpu", "--input-spec", SPEC_HUGE], "cannot make the inputs"),
    # A real step that runs out of memory half-way: the phase is named, nothing is printed.
    (["--device", "cpu", "--input-size", "3,2000,2000", "--batch-size", "64"], "training step failed"),
])
def test_impossible_real_steps_are_one_line_errors(arguments: list[str], expect: str, tmp_path: Path) -> None:
    run = run_ptools(["summary", "resnet18", "--train", *arguments], TORCH_LIMIT, cwd=tmp_path)
    assert not run.timed_out and run.returncode == 1, (run.returncode, run.stderr[-1500:])
    assert "Traceback" not in run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and expect in errors[0] and len(errors[0]) < 600, run.stderr[-1500:]
    assert run.stdout == ""


@pytest.mark.parametrize("arguments", [
    ["--fit", "8000000TiB"],  # the largest batch tried (2^24) fits: answered in a few traces
    ["--sweep", "batch=16777216", "--input-size", "3,1000,1000"],  # petabytes, traced without memory
    ["--input-spec", SPEC_HUGE],
])
def test_huge_requests_are_traced_without_memory(arguments: list[str], tmp_path: Path) -> None:
    run = run_ptools(["summary", "resnet18", "--train", "--json", *arguments], TORCH_LIMIT, cwd=tmp_path)
    assert not run.timed_out and run.returncode == 0, run.stderr[-1500:]
    assert run.peak_rss_bytes < 2 << 30, run.peak_rss_bytes
    data = json.loads(run.stdout)
    assert data["step"]["device"] == "meta"
    if data["fit"]:
        assert data["fit"]["batch_size"] == 1 << 24 and len(data["fit"]["points"]) <= 4


@pytest.mark.parametrize("arguments", [
    ["--sweep", "batch=" + ",".join(["1"] * 10_000)],
    ["--sweep", "batch=99999999999999999999999"],
    ["--fit", "1" + "0" * 400 + "GiB"],
    ["--fit", "-1GiB"],
])
def test_absurd_option_values_are_usage_errors(arguments: list[str], tmp_path: Path) -> None:
    run = run_ptools(["summary", "resnet18", "--train", *arguments], TORCH_LIMIT, cwd=tmp_path)
    assert not run.timed_out and "Traceback" not in run.stderr
    assert run.returncode in (1, 2), run.stderr[-1500:]
    assert run.stdout == ""
