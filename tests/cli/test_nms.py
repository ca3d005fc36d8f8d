"""``ptools nms`` on detection files: formats, pipelines, bad input, evaluation."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from ptools.cli.app import app
from ptools.core import detections as core

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))
from make_detections import generate  # noqa: E402  (the example and benchmark generator)


def run(*args: str, input: bytes | None = None):
    return runner.invoke(app, ["nms", *map(str, args)], input=input)


@pytest.fixture(scope="module")
def synthetic() -> tuple[list, dict]:
    return generate(images=12, per_image=80, seed=3)


def write(path: Path, records) -> Path:
    path.write_text(json.dumps(records))
    return path


def torchvision_reference(records, iou: float) -> list[int]:
    """What a careful user script gets: per image, batched_nms on float64 xyxy boxes."""
    kept = []
    for image in sorted({r["image_id"] for r in records}):
        idx = [i for i, r in enumerate(records) if r["image_id"] == image]
        boxes = torch.tensor([[records[i]["bbox"][0], records[i]["bbox"][1],
                               records[i]["bbox"][0] + records[i]["bbox"][2],
                               records[i]["bbox"][1] + records[i]["bbox"][3]] for i in idx], dtype=torch.float64)
        scores = torch.tensor([records[i]["score"] for i in idx], dtype=torch.float64)
        labels = torch.tensor([records[i]["category_id"] for i in idx])
        keep = torchvision.ops.batched_nms(boxes, scores, labels, iou).tolist()
        kept.extend(idx[k] for k in keep)
    return kept


def test_hard_file_equals_torchvision_script(tmp_path: Path, synthetic) -> None:
    records, _ = synthetic
    for record, extra in zip(records, range(len(records))):
        record["extra"] = {"tag": extra}
    path = write(tmp_path / "in.json", records)
    result = run(path, "--iou", "0.6")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    expected = [records[i] for i in torchvision_reference(records, 0.6)]
    assert out == expected  # same records, every field, same order (image, score desc)
    assert "nms hard (IoU > 0.6): 12 images, 960 → " in result.stderr


def test_stdin_stdout_pipeline_and_jsonl(tmp_path: Path, synthetic) -> None:
    records, _ = synthetic
    lines = b"".join(json.dumps(r).encode() + b"\n" for r in records)
    as_lines = run("-", "--method", "soft", input=lines)
    as_array = run("-", "--method", "soft", input=json.dumps(records).encode())
    assert as_lines.exit_code == 0 and as_array.exit_code == 0
    from_lines = [json.loads(line) for line in as_lines.stdout.splitlines()]
    assert from_lines == json.loads(as_array.stdout)
    converted = run("-", "--output-format", "json", input=lines)
    assert isinstance(json.loads(converted.stdout), list)


def test_output_file_and_order(tmp_path: Path, synthetic) -> None:
    records, _ = synthetic
    out = tmp_path / "out.json"
    result = run(write(tmp_path / "in.json", records), "-o", out, "--method", "soft", "--max-det", "5")
    assert result.exit_code == 0 and result.stdout == ""
    kept = json.loads(out.read_text())
    images = [r["image_id"] for r in kept]
    assert images == sorted(images)
    for image in set(images):
        scores = [r["score"] for r in kept if r["image_id"] == image]
        assert scores == sorted(scores, reverse=True) and len(scores) <= 5


def test_empty_array_gives_empty_array(tmp_path: Path) -> None:
    result = run(write(tmp_path / "e.json", []))
    assert (result.exit_code, result.stdout) == (0, "[]")


def test_string_ids_and_agnostic(tmp_path: Path) -> None:
    records = [{"image_id": "a.jpg", "category_id": "cat", "bbox": [0, 0, 10, 10], "score": 0.9},
               {"image_id": "a.jpg", "category_id": "dog", "bbox": [0, 0, 10, 10], "score": 0.8},
               {"image_id": "b.jpg", "category_id": "dog", "bbox": [0, 0, 10, 10], "score": 0.7}]
    path = write(tmp_path / "s.json", records)
    assert len(json.loads(run(path).stdout)) == 3
    assert [r["category_id"] for r in json.loads(run(path, "--agnostic").stdout)] == ["cat", "dog"]


@pytest.mark.parametrize(("content", "message"), [
    (b"", "is empty"),
    (b"   \n", "is empty"),
    (b"not json", "is not valid JSON"),
    (b'{"a": 1', "line 1 is not valid JSON"),
    (b"42", "holds a JSON number, not an array"),
    (b"[1, 2]", "record 0 is a int, not an object"),
    (b'[{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1]}]', "record 0: missing field 'score'"),
    (b'[{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1], "score": 1}]', "record 0: field 'bbox' must be a list of 4 numbers"),
    (b'[{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1], "score": "high"}]', "record 0: field 'score' must be a number"),
    (b'[{"image_id": 1.5, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1}]', "record 0: field 'image_id' must be an integer or a string"),
    (b'[{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1}, {"image_id": 1, "category_id": 1, "bbox": [0, 0, -1, 1], "score": 1}]', "record 1: field 'bbox' has a negative width or height"),
    (b'[{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1e999, 1], "score": 1}]', "not valid JSON"),
    (b'[{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1], "score": NaN}]', "not valid JSON"),
    (b'[{"image_id": 1, "category_id": true, "bbox": [0, 0, 1, 1], "score": 1}]', "field 'category_id' must be an integer or a string"),
])
def test_bad_input_is_one_line_exit_1(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    result = run(path)
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith("error: ") and message in result.stderr, result.stderr
    assert len(result.stderr.splitlines()) == 1 and result.stdout == ""


def test_xyxy_rule_and_skip_invalid(tmp_path: Path) -> None:
    records = [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.9, "keep": True},
               {"image_id": 1, "category_id": 1, "bbox": [10, 0, 5, 10], "score": 0.8},
               {"image_id": 1, "category_id": 1, "bbox": [0, 0, 10], "score": 0.7},
               {"image_id": 1, "score": 0.7}]
    path = write(tmp_path / "x.json", records)
    stopped = run(path, "--box-format", "xyxy")
    assert "record 1: field 'bbox' has x2 < x1 or y2 < y1" in stopped.stderr and stopped.exit_code == 1
    skipped = run(path, "--box-format", "xyxy", "--skip-invalid")
    assert skipped.exit_code == 0
    assert json.loads(skipped.stdout) == [records[0]]
    assert "(3 invalid skipped)" in skipped.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--method", "soft", "--sigma", "0"], "--sigma must be > 0"),
])
def test_bad_options(tmp_path: Path, synthetic, args: list[str], message: str) -> None:
    result = run(write(tmp_path / "in.json", synthetic[0][:20]), *args)
    assert result.exit_code == 1 and message in result.stderr


def test_cuda_device_without_gpu_is_exit_3(tmp_path: Path, synthetic) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    result = run(write(tmp_path / "in.json", synthetic[0][:20]), "--device", "cuda")
    assert result.exit_code == 3 and "torch sees no CUDA device" in result.stderr


@pytest.mark.cuda
def test_cuda_device_matches_cpu(tmp_path: Path, synthetic) -> None:
    path = write(tmp_path / "in.json", synthetic[0])
    assert json.loads(run(path, "--device", "cuda").stdout) == json.loads(run(path).stdout)


def test_eval_on_the_shipped_example(tmp_path: Path) -> None:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    detections, ground_truth = ROOT / "examples" / "detections.json", ROOT / "examples" / "detections_gt.json"
    out = tmp_path / "out.json"
    result = run(detections, "--method", "soft", "--eval", ground_truth, "-o", out)
    assert result.exit_code == 0, result.output
    assert "COCO bbox evaluation (pycocotools)" in result.stderr
    gt = COCO(str(ground_truth))
    evaluator = COCOeval(gt, gt.loadRes(str(out)), "bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    row = next(line for line in result.stderr.splitlines() if line.strip().startswith("│ AP ") or
               line.strip().startswith("AP "))
    assert f"{evaluator.stats[0]:.4f}" in row
    original = json.loads(detections.read_text())
    assert json.loads(out.read_text())[0]["score"] <= max(r["score"] for r in original)


def test_eval_with_unknown_images(tmp_path: Path, synthetic) -> None:
    records, gt = synthetic
    gt_path = tmp_path / "gt.json"
    gt_path.write_text(json.dumps({**gt, "images": gt["images"][:2]}))
    result = run(write(tmp_path / "in.json", records), "--eval", gt_path)
    assert result.exit_code == 1 and "do not match" in result.stderr


# ---------------------------------------------------------------- properties


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), method=st.sampled_from(["hard", "soft", "merge", "and", "diou"]))
def test_json_and_lines_agree_and_fields_survive(seed: int, method: str) -> None:
    records, _ = generate(images=3, per_image=30, seed=seed)
    for index, record in enumerate(records):
        record["source"] = f"model-{index}"
    copy = json.loads(json.dumps(records))
    array_out, _ = core.run_nms(core.validate(json.loads(core.dump_detections(copy, "json"))), method=method)
    lines = core.parse_detections(core.dump_detections(records, "jsonl"))[0]
    lines_out, _ = core.run_nms(core.validate(lines), method=method)
    assert array_out == lines_out
    sources = {r["source"] for r in records}
    assert {r["source"] for r in lines_out} <= sources
    for record in lines_out:
        assert set(record) == {"image_id", "category_id", "bbox", "score", "source"}


def test_real_process_stdin_to_stdout(synthetic) -> None:
    records, _ = synthetic
    result = subprocess.run([sys.executable, "-m", "ptools", "nms", "-", "--method", "soft"],
                            input=json.dumps(records).encode(), capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)) > 0
    assert b"nms soft" in result.stderr


def test_nms_never_imports_torch() -> None:
    example = ROOT / "examples" / "detections.json"
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "ptools", "nms", str(example)],
                            capture_output=True, text=True, timeout=120)
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0]
                for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert result.returncode == 0 and "torch" not in imported and "numpy" in imported


def test_json_summary_needs_an_output_file(tmp_path: Path, synthetic) -> None:
    path = write(tmp_path / "in.json", synthetic[0])
    refused = run(path, "--json")
    assert refused.exit_code == 1 and "-o FILE" in refused.stderr
    evaluated = json.loads(run(ROOT / "examples" / "detections.json", "--json", "-o", tmp_path / "out.json",
                               "--eval", ROOT / "examples" / "detections_gt.json").stdout)
    assert set(evaluated["evaluation"]) == {"input", "output"}
    assert set(evaluated["evaluation"]["output"]) == {"AP", "AP50", "AP75", "AR@100"}
    report = json.loads(run(path, "--json", "-o", tmp_path / "out2.json").stdout)
    assert report["detections_in"] == len(synthetic[0])
    assert report["detections_out"] == len(json.loads((tmp_path / "out2.json").read_text()))
    assert sum(counts[0] for counts in report["per_class"].values()) == report["detections_in"]


def test_gaussian_soft_rejects_iou_and_says_what_it_applied(tmp_path: Path, synthetic) -> None:
    path = write(tmp_path / "in.json", synthetic[0][:50])
    refused = run(path, "--method", "soft", "--iou", "0.3")
    assert refused.exit_code == 1 and "--iou has no effect on gaussian Soft-NMS" in refused.stderr
    done = run(path, "--method", "soft", "--sigma", "0.3")
    assert "nms soft (gaussian decay s *= exp(-IoU^2 / 0.3), kept while s > 0.001)" in done.stderr
    linear = run(path, "--method", "soft", "--soft-fn", "linear", "--iou", "0.3")
    assert "nms soft (linear decay s *= 1 - IoU where IoU > 0.3, kept while s > 0.001)" in linear.stderr


def test_existing_output_needs_force(tmp_path: Path, synthetic) -> None:
    path = write(tmp_path / "in.json", synthetic[0][:50])
    out = tmp_path / "out.json"
    out.write_text("precious")
    refused = run(path, "-o", out)
    assert refused.exit_code == 1 and f"--output {out} exists" in refused.stderr and "--force" in refused.stderr
    assert out.read_text() == "precious"
    assert run(path, "-o", out, "--force").exit_code == 0 and out.read_text() != "precious"


def test_readme_method_table_is_what_ptools_measures(tmp_path: Path) -> None:
    """The quick start's table of hard vs soft on the shipped examples, recomputed."""
    readme = (ROOT / "README.md").read_text()
    rows = re.findall(r"^\| `examples/(\w+)\.json`[^|]*\| ([\w ()]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$",
                      readme, flags=re.MULTILINE)
    assert len(rows) == 6
    measured = {}
    for name in ("crowd", "detections"):
        for method in ("hard", "soft"):
            result = run(ROOT / "examples" / f"{name}.json", "--method", method, "--eval",
                         ROOT / "examples" / f"{name}_gt.json", "--json", "-o", tmp_path / f"{name}_{method}.json")
            evaluation = json.loads(result.stdout)["evaluation"]
            measured[(name, method)] = evaluation["output"]
            measured[(name, "input (no NMS)")] = evaluation["input"]
    for name, method, *numbers in rows:
        metrics = measured[(name, method)]
        assert [f"{metrics[k]:.3f}" for k in ("AP", "AP50", "AP75", "AR@100")] == numbers, (name, method)


@pytest.mark.parametrize(("name", "crowd"), [("detections", False), ("crowd", True)])
def test_shipped_examples_are_what_the_generator_writes(name: str, crowd: bool) -> None:
    detections, ground_truth = generate(20, 100, 0, crowd=crowd)
    assert json.loads((ROOT / "examples" / f"{name}.json").read_text()) == detections
    assert json.loads((ROOT / "examples" / f"{name}_gt.json").read_text()) == ground_truth


def test_crowd_example_is_crowded() -> None:
    """Most neighbours in a crowd overlap above the usual NMS threshold, as documented."""
    ground_truth = json.loads((ROOT / "examples" / "crowd_gt.json").read_text())
    by_group: dict = {}
    for a in ground_truth["annotations"]:
        by_group.setdefault((a["image_id"], a["category_id"]), []).append(a["bbox"])

    def iou(a: list[float], b: list[float]) -> float:
        w = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
        h = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
        return w * h / (a[2] * a[3] + b[2] * b[3] - w * h)

    neighbours = [iou(boxes[i], boxes[i + 1]) for boxes in by_group.values() for i in range(len(boxes) - 1)]
    assert len(neighbours) >= 40 and sum(v > 0.5 for v in neighbours) / len(neighbours) > 0.5


def test_criterion_names_its_rule_and_matches_the_library(tmp_path: Path, synthetic) -> None:
    from ptools.core.nms import nms

    records = synthetic[0][:400]
    path = write(tmp_path / "in.json", records)
    for kind, rule in [("giou", "GIoU > 0.4"), ("ciou", "CIoU > 0.4")]:
        result = run(path, "--criterion", kind, "--iou", "0.4")
        assert result.exit_code == 0 and f"({rule})" in result.stderr, result.stderr
        import numpy as np

        boxes = np.array([r["bbox"] for r in records], dtype=float)
        boxes[:, 2:] += boxes[:, :2]
        keep, _ = nms(boxes, np.array([r["score"] for r in records]), [r["category_id"] for r in records],
                      images=[r["image_id"] for r in records], criterion=kind, iou_threshold=0.4)
        kept = json.loads(result.stdout)
        assert sorted(json.dumps(r, sort_keys=True) for r in kept) == sorted(
            json.dumps(records[i], sort_keys=True) for i in keep.tolist())
    soft = run(path, "--method", "soft", "--criterion", "diou")
    assert "gaussian decay s *= exp(-DIoU^2 / 0.5)" in soft.stderr
    clash = run(path, "--method", "diou", "--criterion", "ciou")
    assert clash.exit_code == 1 and "method diou compares DIoU" in clash.stderr


@pytest.mark.parametrize("order", ["empty last", "empty first"])
def test_wbf_counts_every_input_as_a_model_even_without_records(order: str, tmp_path: Path) -> None:
    """The model count is the number of inputs: an input without records given last made every
    score 0.8 instead of ensemble-boxes' 0.4."""
    from ensemble_boxes import weighted_boxes_fusion

    boxes = write(tmp_path / "a.json", [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.8}])
    empty = write(tmp_path / "empty.json", [])
    inputs = [boxes, empty] if order == "empty last" else [empty, boxes]
    result = run(*map(str, inputs), "--method", "wbf")
    assert result.exit_code == 0, result.stderr
    _, expected, _ = weighted_boxes_fusion([[[0, 0, 0.1, 0.1]], []], [[0.8], []], [[1], []])
    assert [record["score"] for record in json.loads(result.stdout)] == pytest.approx(list(expected))


def test_a_detections_file_given_as_ground_truth_is_one_line(tmp_path: Path) -> None:
    """`--eval DETS.json` printed pycocotools' 48-line assertion traceback."""
    detections = write(tmp_path / "dets.json", [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 1}])
    done = subprocess.run([sys.executable, "-m", "ptools", "nms", str(detections), "--eval", str(detections)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "is a list of records (detections?), not a COCO ground-truth file" in lines[0]
    broken = write(tmp_path / "broken.json", {"images": 3, "annotations": []})
    result = run(str(detections), "--eval", str(broken))
    assert result.exit_code == 1 and "not a COCO ground-truth file" in result.stderr


def test_errors_over_several_inputs_name_the_file_and_its_own_record(tmp_path: Path) -> None:
    good = write(tmp_path / "a.json", [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 1}] * 3)
    bad = write(tmp_path / "b.json", [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 1},
                                      {"image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5]}])
    result = run(str(good), str(bad))
    assert result.exit_code == 1
    assert f"error: {bad}: record 1: missing field 'score'" in result.stderr


@pytest.mark.parametrize("layout", ["pretty", "one line"])
def test_a_ground_truth_file_given_as_detections_points_to_eval(layout: str, tmp_path: Path) -> None:
    """It said "record 0: missing field 'image_id' … pass --skip-invalid", and --skip-invalid
    then gave an empty output with exit 0."""
    truth = {"images": [{"id": 1, "width": 10, "height": 10}], "annotations": [], "categories": [{"id": 1}]}
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(truth, indent=2 if layout == "pretty" else None))
    for extra in ([], ["--skip-invalid"]):
        result = run(str(path), *extra)
        assert result.exit_code == 1 and result.stdout == ""
        assert "is a COCO ground-truth file" in result.stderr and "--eval" in result.stderr


def test_the_batch_default_is_the_librarys() -> None:
    """--batch said 16MB (16,000,000 bytes) while the core default is 16 MiB."""
    import inspect

    from ptools.cli import nms as nms_cli
    from ptools.core.streaming import BATCH_BYTES
    from ptools.core.units import parse_size

    default = inspect.signature(nms_cli.command).parameters["batch"].default
    assert parse_size(default) == BATCH_BYTES
