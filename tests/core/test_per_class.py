"""Per-class IoU and score thresholds: the same as running each class on its own with its own
settings (NMS and fusion), and the keys of a per-class table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ptools.core.detections import resolve_class_table
from ptools.core.fusion import fuse_groups
from ptools.core.nms import nms_groups
from ptools.errors import BadInputError


def _case(seed: int, count: int = 400):
    generator = np.random.default_rng(seed)
    corner = generator.uniform(0, 300, (count, 2))
    xyxy = np.concatenate([corner, corner + generator.uniform(10, 90, (count, 2))], 1)
    return xyxy, generator.random(count), generator.integers(0, 4, count)


@pytest.mark.parametrize("method", ["hard", "and", "merge", "soft"])
@pytest.mark.parametrize("seed", range(3))
def test_per_class_thresholds_equal_each_class_on_its_own(method: str, seed: int) -> None:
    xyxy, scores, classes = _case(seed)
    iou = {0: 0.2, 2: 0.8}  # classes 1 and 3 keep the single value
    cut = {1: 0.5, 3: 0.3}
    single_iou, single_cut = 0.5, (0.05 if method == "soft" else 0.1)
    soft = {"soft_fn": "linear"} if method == "soft" else {}
    per_box_iou = np.array([iou.get(c, np.nan) for c in classes])
    per_box_cut = np.array([cut.get(c, np.nan) for c in classes])
    together = nms_groups(xyxy, scores, classes, method=method, iou_threshold=single_iou, score_threshold=single_cut,
                          iou_thresholds=per_box_iou, score_thresholds=per_box_cut, **soft)
    for label in range(4):
        rows = np.flatnonzero(classes == label)
        alone = nms_groups(xyxy[rows], scores[rows], classes[rows], method=method,
                           iou_threshold=iou.get(label, single_iou), score_threshold=cut.get(label, single_cut),
                           **soft)
        mine = np.isin(together.keep, rows)
        order_together = np.argsort(together.keep[mine])
        order_alone = np.argsort(rows[alone.keep])
        np.testing.assert_array_equal(together.keep[mine][order_together], rows[alone.keep][order_alone])
        np.testing.assert_allclose(together.scores[mine][order_together], alone.scores[order_alone])
        np.testing.assert_allclose(together.boxes[mine][order_together], alone.boxes[order_alone])


def test_per_class_iou_in_fusion_equals_each_class_on_its_own() -> None:
    xyxy, scores, classes = _case(5, 600)
    models = np.random.default_rng(6).integers(0, 3, xyxy.shape[0])
    iou = {1: 0.3, 3: 0.75}
    together = fuse_groups(xyxy, scores, classes, models, iou_thresholds=np.array([iou.get(c, np.nan) for c in classes]))
    for label in range(4):
        rows = np.flatnonzero(classes == label)
        alone = fuse_groups(xyxy[rows], scores[rows], classes[rows], models[rows], model_weights=np.ones(3),
                            iou_threshold=iou.get(label, 0.55))
        mine = np.isin(together.head, rows)
        assert sorted(together.head[mine].tolist()) == sorted(rows[alone.head].tolist())


def test_class_table_keys() -> None:
    assert resolve_class_table({"3": 0.4, "x": 0.2}, [1, 3, "x"]) == {3: 0.4, "x": 0.2}
    assert resolve_class_table({"person": 0.4, "9": 0.1}, [1, 2], {"person": 1}) == {1: 0.4, 9: 0.1}
    with pytest.raises(BadInputError, match="class 'persn' is not a category id of the input or a category name"):
        resolve_class_table({"persn": 0.4}, [1], {"person": 1})
    with pytest.raises(BadInputError, match="must be a number"):
        resolve_class_table({"1": "high"}, [1])


def test_cli_per_class_settings(tmp_path: Path) -> None:
    records = [{"image_id": 1, "category_id": c, "bbox": [0, 0, 10, 10 + i], "score": 0.9 - i / 10}
               for c in (1, 2) for i in range(3)]  # per class: three boxes with IoU 10/11 and 10/12
    (tmp_path / "in.json").write_text(json.dumps(records))
    ground_truth = {"images": [{"id": 1, "width": 50, "height": 50}], "annotations": [],
                    "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]}
    (tmp_path / "gt.json").write_text(json.dumps(ground_truth))
    (tmp_path / "iou.json").write_text(json.dumps({"dog": 0.95}))

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "ptools", "nms", "in.json", *args], cwd=tmp_path,
                              capture_output=True, text=True)

    inline = run("--class-iou", '{"2": 0.95}')
    kept = json.loads(inline.stdout)
    assert [r["category_id"] for r in kept].count(1) == 1 and [r["category_id"] for r in kept].count(2) == 3
    assert "per-class IoU for 1 class(es)" in inline.stderr
    by_name = run("--class-iou", "iou.json", "--eval", "gt.json", "-o", "out.json")
    assert by_name.returncode == 0, by_name.stderr
    assert json.loads((tmp_path / "out.json").read_text()) == kept
    cut = run("--class-score-thr", '{"1": 0.85}')
    assert [r["category_id"] for r in json.loads(cut.stdout)] == [1, 2]  # each keeps its 0.9 box; class 1 no other
    agnostic = run("--class-iou", '{"1": 0.3}', "--agnostic")
    assert agnostic.returncode == 1 and "cannot go with --agnostic" in agnostic.stderr
    typo = run("--class-iou", '{"dgo": 0.3}')
    assert typo.returncode == 1 and "class 'dgo' is not a category id" in typo.stderr
