"""Nothing ptools did not write is ever removed or overwritten; the input and its neighbours
are never touched; an interrupted run leaves no partial output and says what an earlier,
killed run left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.hostile.harness import TORCH_FREE_LIMIT, run_ptools, snapshot


def _run_folder(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"model": {f"layer{i}.weight": torch.randn(1024, 256) for i in range(6)}, "epoch": 3},
               run / "model.pt")
    torch.save({"w": torch.ones(3)}, run / "other.pt")
    (run / "notes.txt").write_text("keep me")
    return run


def _convert(*arguments: str) -> tuple[int, str]:
    run = run_ptools(["convert-ckpt", *arguments], TORCH_FREE_LIMIT)
    assert "Traceback" not in run.stderr, run.stderr
    return run.returncode, run.stderr


def test_sharding_into_the_inputs_folder_removes_nothing(tmp_path: Path) -> None:
    run = _run_folder(tmp_path)
    before = snapshot(run, skip=tmp_path / "none")
    code, _ = _convert(str(run / "model.pt"), str(run), "--shard-size", "1MB", "--force", "--extract", "auto")
    assert code == 0
    after = snapshot(run, skip=tmp_path / "none")
    assert {k: v for k, v in after.items() if k in before} == before  # every old file as it was
    new = sorted(set(after) - set(before))
    assert new == ["model-00001-of-00006.safetensors", "model-00002-of-00006.safetensors",
                   "model-00003-of-00006.safetensors", "model-00004-of-00006.safetensors",
                   "model-00005-of-00006.safetensors", "model-00006-of-00006.safetensors",
                   "model.safetensors.index.json"]


def test_resharding_a_folder_in_place_is_refused(tmp_path: Path) -> None:
    run = _run_folder(tmp_path)
    hub = tmp_path / "hub"
    assert _convert(str(run / "model.pt"), str(hub), "--shard-size", "1MB", "--extract", "auto")[0] == 0
    (hub / "config.json").write_text("{}")
    (hub / "tokenizer.json").write_text("{}")
    before = snapshot(hub, skip=tmp_path / "none")
    code, message = _convert(str(hub), str(hub), "--shard-size", "2MB", "--force")
    assert code == 1 and "the input" in message
    assert snapshot(hub, skip=tmp_path / "none") == before


def test_replacing_a_sharded_output_removes_only_its_own_shards(tmp_path: Path) -> None:
    run = _run_folder(tmp_path)
    out = tmp_path / "out"
    assert _convert(str(run / "model.pt"), str(out), "--shard-size", "1MB", "--extract", "auto")[0] == 0
    (out / "config.json").write_text("{}")
    (out / "model-00009-of-00009.safetensors").write_text("not ours: not in the index")
    code, message = _convert(str(run / "model.pt"), str(out), "--shard-size", "1MB", "--extract", "auto")
    assert code == 1 and "--force" in message
    assert _convert(str(run / "model.pt"), str(out), "--shard-size", "4MB", "--extract", "auto", "--force")[0] == 0
    names = sorted(os.listdir(out))
    assert names == ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                     "model-00009-of-00009.safetensors", "model.safetensors.index.json"]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}


def test_a_stranger_file_with_a_shard_name_is_never_replaced(tmp_path: Path) -> None:
    run = _run_folder(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "model-00001-of-00006.safetensors").write_text("someone else's")
    code, message = _convert(str(run / "model.pt"), str(out), "--shard-size", "1MB", "--extract", "auto", "--force")
    assert code == 1 and "never replaces it" in message
    assert (out / "model-00001-of-00006.safetensors").read_text() == "someone else's"


@pytest.mark.parametrize("how", ["same", "dot-slash", "symlink", "hardlink"])
def test_output_that_is_the_input_is_refused(tmp_path: Path, how: str) -> None:
    run = _run_folder(tmp_path)
    source = run / "model.pt"
    if how == "same":
        target = str(source)
    elif how == "dot-slash":
        target = f"{run}/./model.pt"
    elif how == "symlink":
        os.symlink(source, run / "link.pt")
        target = str(run / "link.pt")
    else:
        os.link(source, run / "hard.pt")
        target = str(run / "hard.pt")
    before = source.read_bytes()
    code, message = _convert(str(source), target, "--force")
    assert code == 1 and "the input" in message
    assert source.read_bytes() == before


def test_a_folder_as_single_file_output_is_refused(tmp_path: Path) -> None:
    run = _run_folder(tmp_path)
    folder = tmp_path / "existing_dir.pt"
    folder.mkdir()
    (folder / "inside.txt").write_text("keep")
    code, message = _convert(str(run / "model.pt"), str(folder), "--force")
    assert code == 1 and "is a folder" in message
    assert (folder / "inside.txt").read_text() == "keep"


def _slow_convert(source: Path, destination: Path) -> subprocess.Popen[bytes]:
    """A conversion whose writing sleeps between chunks, so that a signal lands mid-write."""
    script = (
        "import sys, time\n"
        "import ptools.core.checkpoint.writers as writers\n"
        "real = writers.prefetched\n"
        "def slow(pieces, depth=2):\n"
        "    for piece in real(pieces, depth):\n"
        "        time.sleep(0.2)\n"
        "        yield piece\n"
        "writers.prefetched = slow\n"
        "writers.COPY_CHUNK_BYTES = 1 << 16\n"
        "from ptools.cli.app import main\n"
        f"sys.argv = ['ptools', 'convert-ckpt', {str(source)!r}, {str(destination)!r}, '--extract', 'auto']\n"
        "main()\n")
    return subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE)


def _wait_for_temporary(folder: Path, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while not any(name.endswith(".ptools-tmp") for name in os.listdir(folder)):
        assert process.poll() is None, process.stderr.read() if process.stderr else ""
        assert time.monotonic() < deadline
        time.sleep(0.02)


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGINT])
def test_an_interrupted_conversion_leaves_nothing(tmp_path: Path, signal_number: int) -> None:
    run = _run_folder(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    process = _slow_convert(run / "model.pt", out / "model.safetensors")
    _wait_for_temporary(out, process)
    process.send_signal(signal_number)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == (143 if signal_number == signal.SIGTERM else 130), stderr
    assert os.listdir(out) == []


def test_temporaries_of_a_killed_run_are_reported_not_removed(tmp_path: Path) -> None:
    run = _run_folder(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    process = _slow_convert(run / "model.pt", out / "model.safetensors")
    _wait_for_temporary(out, process)
    process.kill()
    process.communicate(timeout=60)
    (stale,) = os.listdir(out)
    code, message = _convert(str(run / "model.pt"), str(out / "model.safetensors"), "--extract", "auto")
    assert code == 0
    assert "interrupted earlier run" in message and stale in message and "rm" in message
    assert stale in os.listdir(out)


def test_nms_output_that_is_a_folder_is_refused(tmp_path: Path) -> None:
    detections = tmp_path / "preds.json"
    detections.write_text(json.dumps([{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.5}]))
    folder = tmp_path / "existing"
    folder.mkdir()
    (folder / "keep.txt").write_text("keep")
    run = run_ptools(["nms", str(detections), "-o", str(folder)], TORCH_FREE_LIMIT)
    assert run.returncode == 1 and "-o takes a file path" in run.stderr and "Traceback" not in run.stderr
    assert os.listdir(folder) == ["keep.txt"]
