"""``ptools nms --ray`` on a real local two-node Ray cluster: shards whose images are spread
across files, grouped by Ray Data's shuffle, equal (as a multiset of records) to the
single-machine run of the concatenated input, for several methods; the output folder's
manifest; and the refusals."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ptools.cli.app import app

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")
cluster_utils = pytest.importorskip("ray.cluster_utils")

pytestmark = pytest.mark.ray
runner = CliRunner()


@pytest.fixture(scope="module")
def cluster():
    local = cluster_utils.Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    local.add_node(num_cpus=1)
    ray.init(address=local.address, log_to_driver=False)
    yield local
    ray.shutdown()
    local.shutdown()


def make_shards(folder: Path, shards: int = 4, images: int = 30, per_image: int = 12, seed: int = 0) -> list[dict]:
    """Records of each image scattered over every shard (as inference workers write them), with
    tied scores and string and integer image ids."""
    rng = random.Random(seed)
    records = []
    for image in range(images):
        image_id = image if image % 3 else f"img_{image}"
        for _ in range(per_image):
            x, y = rng.uniform(0, 80), rng.uniform(0, 80)
            records.append({"image_id": image_id, "category_id": rng.randint(1, 3),
                            "bbox": [round(x, 2), round(y, 2), round(rng.uniform(5, 30), 2), round(rng.uniform(5, 30), 2)],
                            "score": rng.choice([0.9, 0.8, 0.5, round(rng.random(), 4)])})
    rng.shuffle(records)
    folder.mkdir(parents=True, exist_ok=True)
    for number in range(shards):
        part = records[number::shards]
        (folder / f"preds-{number:02d}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    # What one machine would read: the shards concatenated, in the order --ray sorts them.
    ordered = [r for number in range(shards) for r in records[number::shards]]
    (folder.parent / "all.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ordered))
    return ordered


def multiset(lines: list[str]) -> list[str]:
    return sorted(json.dumps(json.loads(line), sort_keys=True) for line in lines if line.strip())


def ray_output(folder: Path) -> list[str]:
    manifest = json.loads((folder / "manifest.json").read_text())
    return [line for shard in manifest["shards"] for line in (folder / shard["file"]).read_text().splitlines()]


@pytest.mark.parametrize("method", ["hard", "soft", "wbf", "greedy-nmm"])
def test_equals_the_single_machine_run(cluster, tmp_path: Path, method: str) -> None:
    make_shards(tmp_path / "preds")
    single = runner.invoke(app, ["nms", str(tmp_path / "all.jsonl"), "--method", method, "-o",
                                 str(tmp_path / "single.jsonl")])
    assert single.exit_code == 0, single.output
    result = runner.invoke(app, ["nms", str(tmp_path / "preds" / "*.jsonl"), "--ray", "--method", method,
                                 "-o", str(tmp_path / "out"), "--json"])
    assert result.exit_code == 0, result.output
    expected = multiset((tmp_path / "single.jsonl").read_text().splitlines())
    assert multiset(ray_output(tmp_path / "out")) == expected and expected
    report = json.loads(result.stdout)
    assert report["records_in"] == 360 and report["images"] == 30 and report["records_out"] == len(expected)


def test_folder_input_shards_and_manifest(cluster, tmp_path: Path) -> None:
    make_shards(tmp_path / "preds", shards=3)
    result = runner.invoke(app, ["nms", str(tmp_path / "preds"), "--ray", "--shards", "2", "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "nms on Ray: 360 records of 30 images from 3 shard(s)" in result.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [s["file"] for s in manifest["shards"]] == ["part-00000.jsonl", "part-00001.jsonl"]
    assert sum(s["records"] for s in manifest["shards"]) == manifest["records_out"] == len(ray_output(tmp_path / "out"))
    assert manifest["options"]["method"] == "hard" and len(manifest["inputs"]) == 3
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["manifest.json", "part-00000.jsonl",
                                                                    "part-00001.jsonl"]


def test_output_folder_rules(cluster, tmp_path: Path) -> None:
    make_shards(tmp_path / "preds", shards=2)
    args = ["nms", str(tmp_path / "preds"), "--ray", "-o", str(tmp_path / "out")]
    assert runner.invoke(app, args).exit_code == 0
    again = runner.invoke(app, args)
    assert again.exit_code == 1 and "not empty" in again.stderr and "--force" in again.stderr
    assert runner.invoke(app, [*args, "--force", "--shards", "1"]).exit_code == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["manifest.json", "part-00000.jsonl"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    foreign = runner.invoke(app, ["nms", str(tmp_path / "preds"), "--ray", "-o", str(tmp_path / "mine"), "--force"])
    assert foreign.exit_code == 1 and (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    into_input = runner.invoke(app, ["nms", str(tmp_path / "preds"), "--ray", "-o", str(tmp_path / "preds")])
    assert into_input.exit_code == 1 and "holds the input" in into_input.stderr


def test_an_invalid_record_is_named_and_nothing_is_left(cluster, tmp_path: Path) -> None:
    make_shards(tmp_path / "preds", shards=2)
    with (tmp_path / "preds" / "preds-01.jsonl").open("a") as handle:
        handle.write(json.dumps({"image_id": 1, "category_id": 1, "bbox": [0, 0, -5, 3], "score": 0.5}) + "\n")
    result = runner.invoke(app, ["nms", str(tmp_path / "preds"), "--ray", "-o", str(tmp_path / "out")])
    assert result.exit_code == 1, result.output
    assert "preds-01.jsonl: record 180: field 'bbox' has a negative width" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr[-3000:]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("args", "expect"), [
    (["--eval", "gt.json"], "--eval"),
    (["-o", "-"], "-o FOLDER"),
])
def test_refusals(cluster, tmp_path: Path, args: list[str], expect: str) -> None:
    make_shards(tmp_path / "preds", shards=2)
    result = runner.invoke(app, ["nms", str(tmp_path / "preds"), "--ray", "-o", str(tmp_path / "out"), *args])
    assert result.exit_code == 1 and expect in result.stderr


def test_shards_without_ray_is_refused(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text("[]")
    result = runner.invoke(app, ["nms", str(tmp_path / "a.json"), "--shards", "2", "-o", str(tmp_path / "o.json")])
    assert result.exit_code == 1 and "add --ray" in result.stderr
