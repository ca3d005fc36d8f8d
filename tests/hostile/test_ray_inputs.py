"""``nms --ray``'s inputs as an attacker (or an accident) would give them: shards that are not
files, outputs that alias inputs, malformed shards. Each is refused in one line before or
without touching anything that is not ptools' own."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ptools.cli.app import app

pytest.importorskip("ray.data")
pytestmark = pytest.mark.ray
runner = CliRunner()


@pytest.fixture(scope="module")
def local_ray():
    import ray

    # A cluster of its own, even where another is running (ray.init would join that one).
    ray.init(address="local", num_cpus=2, log_to_driver=False, include_dashboard=False)
    yield
    ray.shutdown()


def shard(folder: Path, name: str = "a.jsonl") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(json.dumps({"image_id": 1, "category_id": 1, "bbox": [0, 0, 2, 2], "score": 0.5}) + "\n")
    return path


def run(*args: str):
    return runner.invoke(app, ["nms", *args])


def one_line_error(result, expect: str) -> None:
    assert result.exit_code == 1, result.output
    assert expect in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr[-2000:]


def test_a_fifo_or_device_among_the_shards_is_never_opened(local_ray, tmp_path: Path) -> None:
    shard(tmp_path / "preds")
    os.mkfifo(tmp_path / "preds" / "pipe.jsonl")  # opening it would block forever
    result = run(str(tmp_path / "preds"), "--ray", "-o", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["records_in"] == 1
    one_line_error(run("/dev/zero", "--ray", "-o", str(tmp_path / "out2")), "no detection files")


def test_an_output_that_is_a_symlink_to_the_inputs_folder(local_ray, tmp_path: Path) -> None:
    shard(tmp_path / "preds")
    os.symlink(tmp_path / "preds", tmp_path / "alias")
    one_line_error(run(str(tmp_path / "preds"), "--ray", "-o", str(tmp_path / "alias"), "--force"), "holds the input")
    assert sorted(p.name for p in (tmp_path / "preds").iterdir()) == ["a.jsonl"]


def test_an_output_that_is_a_file_is_not_replaced(local_ray, tmp_path: Path) -> None:
    shard(tmp_path / "preds")
    (tmp_path / "out").write_text("precious")
    one_line_error(run(str(tmp_path / "preds"), "--ray", "-o", str(tmp_path / "out"), "--force"), "not a folder")
    assert (tmp_path / "out").read_text() == "precious"


@pytest.mark.parametrize(("content", "expect"), [
    (b"\x00\xff not json", "not valid JSON"),
    (b'{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1e999, 1], "score": 0.5}\n', "bad.jsonl"),
    (b"[" * 100_000, "bad.jsonl"),  # nesting deep enough to break a recursive parser
])
def test_a_malformed_shard_is_named(local_ray, tmp_path: Path, content: bytes, expect: str) -> None:
    shard(tmp_path / "preds")
    (tmp_path / "preds" / "bad.jsonl").write_bytes(content)
    one_line_error(run(str(tmp_path / "preds"), "--ray", "-o", str(tmp_path / "out")), expect)
    assert not (tmp_path / "out").exists()


def test_a_glob_that_matches_nothing(tmp_path: Path) -> None:
    one_line_error(run(str(tmp_path / "nothing-*.jsonl"), "--ray", "-o", str(tmp_path / "out")), "no detection files")


def test_force_removes_only_what_a_previous_run_wrote(local_ray, tmp_path: Path) -> None:
    """Files named like shards but not listed in a ptools manifest are someone else's."""
    shard(tmp_path / "preds")
    out = tmp_path / "out"
    out.mkdir()
    (out / "part-00000.jsonl").write_text("a user's own file\n")
    refused = run(str(tmp_path / "preds"), "--ray", "-o", str(out), "--force")
    one_line_error(refused, "not empty")
    assert (out / "part-00000.jsonl").read_text() == "a user's own file\n"
    (out / "manifest.json").write_text(json.dumps({"shards": [{"file": "../preds/a.jsonl"}]}))
    one_line_error(run(str(tmp_path / "preds"), "--ray", "-o", str(out), "--force"), "not empty")
    assert (tmp_path / "preds" / "a.jsonl").exists()
