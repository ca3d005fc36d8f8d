"""WBF and NMW against ensemble-boxes (the reference implementation), on random and
adversarial inputs, and `ptools nms` over several files."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ptools.core.fusion import fuse_groups
from ptools.errors import BadInputError

ensemble_boxes = pytest.importorskip("ensemble_boxes")
ROOT = Path(__file__).resolve().parents[2]
CONF_TYPES = ["avg", "max", "box_and_model_avg", "absent_model_aware_avg"]


def _reference(method, boxes_list, scores_list, labels_list, weights, iou, skip, conf):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ensemble-boxes warns about zero-area boxes it skips
        if method == "wbf":
            return ensemble_boxes.weighted_boxes_fusion(
                boxes_list, scores_list, labels_list, weights=weights, iou_thr=iou, skip_box_thr=skip, conf_type=conf
            )
        return ensemble_boxes.non_maximum_weighted(
            boxes_list, scores_list, labels_list, weights=weights, iou_thr=iou, skip_box_thr=skip
        )


def _ours(method, boxes_list, scores_list, labels_list, weights, iou, skip, conf):
    xyxy = np.concatenate([np.asarray(b, dtype=float).reshape(-1, 4) for b in boxes_list])
    scores = np.concatenate([np.asarray(s, dtype=float) for s in scores_list])
    labels = np.concatenate([np.asarray(label, dtype=np.int64) for label in labels_list])
    models = np.concatenate([np.full(len(s), m) for m, s in enumerate(scores_list)]).astype(np.int64)
    result = fuse_groups(xyxy, scores, labels, models, method=method, model_weights=np.asarray(weights, float),
                         iou_threshold=iou, skip_box_threshold=skip, conf_type=conf)
    return result.boxes, result.scores, labels[result.head]


def assert_same_fusion(ours, theirs) -> None:
    """The same fused boxes (label, score, coordinates to 1e-6), matched one to one: order among
    equal scores is not part of either contract."""
    def rows(boxes, scores, labels):
        return list(zip(np.asarray(labels).astype(int).tolist(), np.asarray(scores).tolist(),
                        np.asarray(boxes).reshape(-1, 4).tolist()))
    a, left = rows(*ours), rows(*theirs)
    assert len(a) == len(left), (len(a), len(left))
    for label, score, box in a:
        match = next((row for row in left if row[0] == label and abs(row[1] - score) <= 1e-6
                      and max(abs(x - y) for x, y in zip(row[2], box)) <= 1e-6), None)
        assert match is not None, ((label, score, box), left)
        left.remove(match)


def _models(seed: int, coarse: bool):
    generator = np.random.default_rng(seed)
    boxes_list, scores_list, labels_list = [], [], []
    for _ in range(int(generator.integers(1, 4))):
        count = int(generator.integers(0, 40))  # 0: this model saw nothing in the image
        corner = generator.uniform(0, 0.8, (count, 2))
        box = np.concatenate([corner, np.minimum(corner + generator.uniform(0.01, 0.3, (count, 2)), 1)], 1)
        if coarse:  # identical boxes and tied scores
            box = np.round(box * 10) / 10
            box[:, 2:] = np.maximum(box[:, 2:], box[:, :2] + 0.1)
        scores = generator.choice([0.3, 0.5, 0.9], count) if coarse else generator.random(count)
        boxes_list.append(box)
        scores_list.append(scores)
        labels_list.append(generator.integers(0, 3, count))
    weights = generator.integers(1, 4, len(boxes_list)).astype(float).tolist()
    return boxes_list, scores_list, labels_list, weights


@pytest.mark.parametrize("conf", CONF_TYPES)
@pytest.mark.parametrize("seed", range(40))
def test_wbf_equals_ensemble_boxes(seed: int, conf: str) -> None:
    case = _models(seed, coarse=seed % 2 == 1)
    iou = [0.3, 0.55, 0.7][seed % 3]
    assert_same_fusion(_ours("wbf", *case, iou, 0.1, conf), _reference("wbf", *case, iou, 0.1, conf))


@pytest.mark.parametrize("seed", range(40))
def test_nmw_equals_ensemble_boxes(seed: int) -> None:
    case = _models(seed, coarse=seed % 2 == 1)
    iou = [0.3, 0.55, 0.7][seed % 3]
    assert_same_fusion(_ours("nmw", *case, iou, 0.1, "avg"), _reference("nmw", *case, iou, 0.1, "avg"))


boxes_strategy = st.lists(
    st.tuples(st.integers(0, 6), st.integers(0, 6), st.integers(1, 4), st.integers(1, 4), st.integers(1, 4),
              st.integers(0, 1)),
    max_size=30,
)


@settings(max_examples=120, deadline=None)
@given(models=st.lists(boxes_strategy, min_size=1, max_size=3), method=st.sampled_from(["wbf", "nmw"]),
       conf=st.sampled_from(CONF_TYPES), iou=st.sampled_from([0.0, 0.2, 0.5, 0.8]))
def test_fusion_equals_ensemble_boxes_on_grids_of_ties(models, method, conf, iou) -> None:
    """Coordinates on a 0.1 grid inside [0, 1] (ensemble-boxes clips to it) and scores in quarters:
    identical boxes, exact ties everywhere."""
    boxes_list = [[[x / 10, y / 10, (x + w) / 10, (y + h) / 10] for x, y, w, h, _, _ in m] for m in models]
    scores_list = [[s / 4 for *_, s, _ in m] for m in models]
    labels_list = [[label for *_, label in m] for m in models]
    weights = [1.0 + i for i in range(len(models))]
    case = ([np.array(b).reshape(-1, 4) for b in boxes_list], scores_list, labels_list, weights)
    assert_same_fusion(_ours(method, *case, iou, 0.0, conf), _reference(method, *case, iou, 0.0, conf))


def test_fusion_refuses_bad_settings() -> None:
    one = np.array([[0, 0, 1, 1.0]])
    with pytest.raises(BadInputError, match="positive weight for each of the 2 inputs"):
        fuse_groups(np.repeat(one, 2, 0), np.ones(2), np.zeros(2), np.array([0, 1]), model_weights=np.array([1.0]))
    with pytest.raises(BadInputError, match="unknown `conf_type`"):
        fuse_groups(one, np.ones(1), np.zeros(1), np.zeros(1), conf_type="mean")


# ---------------------------------------------------------------- ptools nms over several files


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ptools", "nms", *args], cwd=cwd, capture_output=True, text=True)


def test_cli_fuses_three_files_like_ensemble_boxes_per_image(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "examples"))
    from make_detections import HEIGHT, WIDTH, generate

    files = []
    for model in range(3):
        detections, _ = generate(6, 60, seed=4, model_seed=model)
        for record in detections:  # inside the image: ensemble-boxes clips to [0, 1], ptools never clips
            x, y, w, h = record["bbox"]
            x1, y1 = min(max(x, 0), WIDTH - 1), min(max(y, 0), HEIGHT - 1)
            record["bbox"] = [x1, y1, min(x + w, WIDTH) - x1, min(y + h, HEIGHT) - y1]
        path = tmp_path / f"m{model}.json"
        path.write_text(json.dumps(detections))
        files.append((path, detections))
    run = _run(*(str(p) for p, _ in files), "--method", "wbf", "--model-weights", "2,1,1", "--skip-box-thr", "0.05",
               "--box-format", "xywh", "-o", "fused.json", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    fused = json.loads((tmp_path / "fused.json").read_text())
    for image in range(1, 7):
        def per_model(records, image=image):
            rows = [r for r in records if r["image_id"] == image]
            boxes = np.array([r["bbox"] for r in rows], dtype=float).reshape(-1, 4)
            boxes[:, 2:] += boxes[:, :2]
            return boxes / [WIDTH, HEIGHT, WIDTH, HEIGHT], [r["score"] for r in rows], [r["category_id"] for r in rows]
        parts = [per_model(records) for _, records in files]
        # ensemble-boxes wants [0, 1]: compare on normalised coordinates, our boxes scaled back
        theirs = _reference("wbf", [p[0] for p in parts], [p[1] for p in parts], [p[2] for p in parts],
                            [2, 1, 1], 0.55, 0.05, "avg")
        ours_rows = [r for r in fused if r["image_id"] == image]
        ours_boxes = np.array([r["bbox"] for r in ours_rows], dtype=float).reshape(-1, 4)
        ours_boxes[:, 2:] += ours_boxes[:, :2]
        ours = (ours_boxes / [WIDTH, HEIGHT, WIDTH, HEIGHT], [r["score"] for r in ours_rows],
                [r["category_id"] for r in ours_rows])
        assert len(ours[1]) == len(theirs[1])
        np.testing.assert_allclose(sorted(ours[1]), sorted(theirs[1]), atol=1e-6)
    assert "3 input(s)" in run.stderr


def test_cli_several_inputs_options_and_errors(tmp_path: Path) -> None:
    records = [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.9}]
    for name in ("a.json", "b.json"):
        (tmp_path / name).write_text(json.dumps(records))
    hard = _run("a.json", "b.json", cwd=tmp_path)
    assert hard.returncode == 0 and len(json.loads(hard.stdout)) == 1  # concatenated, then NMS
    fused = _run("a.json", "b.json", "--method", "wbf", cwd=tmp_path)
    assert json.loads(fused.stdout) == records  # two identical boxes fuse into the same box
    cases = [
        (["a.json", "b.json", "--method", "wbf", "--model-weights", "1"], "1 weight(s) for 2 input(s)"),
        (["a.json", "--model-weights", "1"], "apply to --method wbf and nmw"),
        (["a.json", "b.json", "--method", "wbf", "--score-thr", "0.1"], "use --skip-box-thr"),
        (["a.json", "b.json", "--method", "nmw", "--criterion", "giou"], "wbf and nmw compare IoU"),
        (["a.json", "b.json", "-o", "b.json", "--force"], "is the input file b.json"),
    ]
    for args, message in cases:
        run = _run(*args, cwd=tmp_path)
        assert run.returncode == 1 and message in run.stderr, (args, run.stderr)
    bad = _run("a.json", "--method", "wbf", "--model-weights", "1,x", cwd=tmp_path)
    assert bad.returncode == 2


def test_fusion_split_into_threads_gives_the_same_clusters(monkeypatch: pytest.MonkeyPatch) -> None:
    from ptools.core import nms as nms_core

    generator = np.random.default_rng(9)
    count = 3000
    corner = generator.uniform(0, 500, (count, 2))
    xyxy = np.concatenate([corner, corner + generator.uniform(5, 80, (count, 2))], 1)
    scores, groups, models = generator.random(count), generator.integers(0, 40, count), generator.integers(0, 3, count)
    whole = fuse_groups(xyxy, scores, groups, models, model_weights=np.array([2.0, 1, 1]))
    monkeypatch.setattr(nms_core, "PARALLEL_MIN_BOXES", 10)
    monkeypatch.setattr("os.cpu_count", lambda: 4)
    split = fuse_groups(xyxy, scores, groups, models, model_weights=np.array([2.0, 1, 1]))
    order_whole, order_split = np.argsort(whole.head), np.argsort(split.head)
    np.testing.assert_array_equal(whole.head[order_whole], split.head[order_split])
    np.testing.assert_array_equal(whole.boxes[order_whole], split.boxes[order_split])
    np.testing.assert_array_equal(whole.scores[order_whole], split.scores[order_split])


def test_soft_nms_returns_decayed_scores_where_ensemble_boxes_returns_the_originals() -> None:
    """The case README gives: same boxes kept, but ensemble-boxes' soft_nms reports the input scores."""
    import math

    from ptools.core.nms import nms

    boxes = np.array([[0, 0, 0.5, 0.5], [0.05, 0, 0.55, 0.5]])
    keep, scores = nms(boxes, np.array([0.9, 0.8]), method="soft", sigma=0.5)
    iou = 0.45 * 0.5 / (0.25 + 0.25 - 0.45 * 0.5)
    assert keep.tolist() == [0, 1] and scores[1] == pytest.approx(0.8 * math.exp(-iou * iou / 0.5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, theirs, _ = ensemble_boxes.soft_nms([boxes], [np.array([0.9, 0.8])], [np.array([0, 0])], sigma=0.5)
    assert sorted(theirs.tolist()) == [0.8, 0.9]  # the original scores: what README calls out
    assert round(float(scores[1]), 4) == 0.2097


def test_the_library_refuses_options_the_method_would_ignore() -> None:
    from ptools.core.detections import run_nms, validate

    detections = validate([{"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.9}])
    with pytest.raises(BadInputError, match="for wbf and nmw use `skip_box_threshold`"):
        run_nms(detections, method="wbf", score_threshold=0.1)
    with pytest.raises(BadInputError, match="apply to `method` wbf and nmw"):
        run_nms(detections, method="hard", conf_type="max")
    with pytest.raises(BadInputError, match="wbf and nmw compare IoU"):
        run_nms(detections, method="nmw", criterion="giou")
