"""nmm and greedy-nmm (non-maximum merging) against SAHI's postprocess, NMS with the IoS
metric against SAHI's NMS, on random and adversarial inputs; and `ptools nms` with them."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from ptools.core import detections as core
from ptools.core.merging import merge_groups
from ptools.core.nms import nms_groups
from ptools.errors import BadInputError

pytest.importorskip("sahi")
from sahi.postprocess.backends import set_postprocess_backend  # noqa: E402
from sahi.postprocess.combine import GreedyNMMPostprocess, NMMPostprocess, NMSPostprocess  # noqa: E402
from sahi.prediction import ObjectPrediction  # noqa: E402

SAHI_CLASSES = {"greedy-nmm": GreedyNMMPostprocess, "nmm": NMMPostprocess, "hard": NMSPostprocess}


def _sahi(method, boxes, scores, categories, metric, threshold, agnostic, backend="numpy", dense=True):
    """SAHI's output as sorted (box, score) rows. ``dense``: at threshold 0, run SAHI's own
    loop rather than its every-pair-matches shortcut, which differs from the loop for nmm
    (see test_sahi_nmm_shortcut_at_threshold_zero)."""
    set_postprocess_backend(backend)
    if dense and threshold <= 0:
        import sahi.postprocess._numpy_backend as numpy_backend

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(numpy_backend, "matches_all_pairs", lambda threshold: False)
            return _sahi(method, boxes, scores, categories, metric, threshold, agnostic, "numpy", dense=False)
    predictions = [
        ObjectPrediction(bbox=[float(v) for v in box], score=float(score), category_id=int(category))
        for box, score, category in zip(boxes, scores, categories)
    ]
    postprocess = SAHI_CLASSES[method](match_threshold=threshold, match_metric=metric.upper(), class_agnostic=agnostic)
    with np.errstate(invalid="ignore", divide="ignore"):  # SAHI divides 0 by 0 on empty boxes
        return sorted((tuple(p.bbox.to_xyxy()), p.score.value) for p in postprocess(predictions))


def _ours(method, boxes, scores, categories, metric, threshold, agnostic):
    groups = np.zeros(len(scores), dtype=np.int64) if agnostic else np.asarray(categories, dtype=np.int64)
    if method == "hard":
        result = nms_groups(boxes, scores, groups, method="hard", iou_threshold=threshold, criterion=metric)
    else:
        result = merge_groups(boxes, scores, groups, method=method, metric=metric, threshold=threshold)
    return sorted((tuple(float(v) for v in box), float(score)) for box, score in zip(result.boxes, result.scores))


def _float32_agrees(boxes, metric, threshold, strict):
    """Whether SAHI's float32 metric matrix takes the same side of the threshold as float64 on
    every pair: where it does not, the rounding decides, and neither answer is wrong."""
    def matrix(b):
        x1, y1, x2, y2 = (b[:, i] for i in range(4))
        area = (x2 - x1) * (y2 - y1)
        w = np.maximum(np.minimum(x2[:, None], x2[None]) - np.maximum(x1[:, None], x1[None]), 0)
        h = np.maximum(np.minimum(y2[:, None], y2[None]) - np.maximum(y1[:, None], y1[None]), 0)
        inter = w * h
        denominator = area[:, None] + area[None] - inter if metric == "iou" else np.minimum(area[:, None], area[None])
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(denominator > 0, inter / denominator, 0)

    wide, narrow = matrix(boxes), matrix(boxes.astype(np.float32)).astype(np.float32)
    if strict:  # our NMS suppresses on >, SAHI's on >=: an exact tie is the difference, not a bug
        return bool(((wide > threshold) == (narrow >= threshold)).all() and (wide != threshold).all())
    return bool(((wide >= threshold) == (narrow >= threshold)).all())


def _case(seed: int, coarse: bool):
    """Boxes exactly representable in float32 (SAHI casts to it), with near-duplicates,
    exact duplicates, tied scores and zero-area boxes when ``coarse``."""
    generator = np.random.default_rng(seed)
    count = int(generator.integers(1, 50))
    corner = generator.uniform(0, 200, (count, 2))
    size = generator.uniform(0, 60, (count, 2))
    if coarse:
        corner, size = np.round(corner / 10) * 10, np.round(size / 10) * 10
        if count > 3:
            corner[1], size[1] = corner[0], size[0]
    boxes = np.concatenate([corner, corner + size], axis=1).astype(np.float32).astype(np.float64)
    scores = generator.choice([0.3, 0.5, 0.9], count) if coarse else generator.random(count)
    scores = scores.astype(np.float32).astype(np.float64)
    categories = generator.integers(0, 3, count)
    return boxes, scores, categories


@pytest.mark.parametrize("method", ["greedy-nmm", "nmm"])
@pytest.mark.parametrize("metric", ["iou", "ios"])
@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    coarse=st.booleans(),
    threshold=st.sampled_from([0.0, 0.1, 0.3, 0.5, 0.7, 1.0]),
    agnostic=st.booleans(),
)
def test_merging_equals_sahi(method, metric, seed, coarse, threshold, agnostic) -> None:
    boxes, scores, categories = _case(seed, coarse)
    assume(_float32_agrees(boxes, metric, threshold, strict=False))
    ours = _ours(method, boxes, scores, categories, metric, threshold, agnostic)
    assert ours == _sahi(method, boxes, scores, categories, metric, threshold, agnostic)


@pytest.mark.parametrize("backend", ["numba", "numpy"])
@pytest.mark.parametrize("method", ["greedy-nmm", "nmm"])
def test_large_group_equals_sahi_sparse_backends(backend, method) -> None:
    """2,500 boxes in one group: SAHI switches to its sparse (STRtree) path; same answer."""
    if backend == "numba":
        pytest.importorskip("numba")
    generator = np.random.default_rng(7)
    corner = generator.uniform(0, 2000, (2500, 2))
    boxes = np.concatenate([corner, corner + generator.uniform(5, 90, (2500, 2))], 1).astype(np.float32)
    boxes = boxes.astype(np.float64)
    scores = generator.random(2500).astype(np.float32).astype(np.float64)
    categories = np.zeros(2500, dtype=np.int64)
    for metric in ("iou", "ios"):
        assert _float32_agrees(boxes, metric, 0.3, strict=False)  # no pair within float32 rounding of 0.3
        ours = _ours(method, boxes, scores, categories, metric, 0.3, True)
        assert ours == _sahi(method, boxes, scores, categories, metric, 0.3, True, backend)


@pytest.mark.parametrize("metric", ["iou", "ios"])
@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), threshold=st.sampled_from([0.2, 0.5, 0.8]), agnostic=st.booleans())
def test_hard_nms_with_ios_equals_sahi_nms(metric, seed, threshold, agnostic) -> None:
    """`--method hard --match-metric ios` is SAHI's NMSPostprocess with IOS, but for exact ties
    at the threshold (SAHI suppresses on >=, ptools' NMS on >) and tied scores (SAHI breaks
    them by coordinates, ptools by input order): the test keeps clear of both."""
    boxes, scores, categories = _case(seed, coarse=False)
    assume(len(set(scores.tolist())) == len(scores))
    assume(_float32_agrees(boxes, metric, threshold, strict=True))
    ours = _ours("hard", boxes, scores, categories, metric, threshold, agnostic)
    assert ours == _sahi("hard", boxes, scores, categories, metric, threshold, agnostic)


def test_greedy_merge_rechecks_against_the_growing_box() -> None:
    """A claimed box that no longer matches the box merged so far is dropped, not merged and
    not kept (SAHI's has_match before each merge): B and C each overlap A by IoU 7/13, but
    once A has grown over B, C's IoU with it is 70/160."""
    boxes = np.array([[10, 0, 20, 10], [13, 0, 23, 10], [7, 0, 17, 10]], dtype=float)
    scores = np.array([0.9, 0.8, 0.7])
    result = merge_groups(boxes, scores, np.zeros(3, dtype=np.int64), method="greedy-nmm", metric="iou", threshold=0.5)
    assert result.keep.tolist() == [0]
    assert result.boxes.tolist() == [[10.0, 0.0, 23.0, 10.0]]
    assert _sahi("greedy-nmm", boxes, scores, [0, 0, 0], "iou", 0.5, True) == [((10.0, 0.0, 23.0, 10.0), 0.9)]


def test_transitive_merging_reaches_what_greedy_does_not() -> None:
    """A chain A-B-C where only neighbours overlap: nmm merges all three into one box, greedy
    merges A and B and keeps C apart."""
    boxes = np.array([[0, 0, 10, 10], [6, 0, 16, 10], [12, 0, 22, 10]], dtype=float)
    scores = np.array([0.9, 0.8, 0.7])
    groups = np.zeros(3, dtype=np.int64)
    transitive = merge_groups(boxes, scores, groups, method="nmm", metric="ios", threshold=0.4)
    greedy = merge_groups(boxes, scores, groups, method="greedy-nmm", metric="ios", threshold=0.4)
    assert transitive.boxes.tolist() == [[0.0, 0.0, 22.0, 10.0]]
    assert sorted(greedy.boxes.tolist()) == [[0.0, 0.0, 16.0, 10.0], [12.0, 0.0, 22.0, 10.0]]
    for method, result in (("nmm", transitive), ("greedy-nmm", greedy)):
        assert sorted(tuple(map(float, b)) for b in result.boxes) == [
            row[0] for row in _sahi(method, boxes, scores, [0, 0, 0], "ios", 0.4, True)
        ]


def test_zero_area_boxes_and_thresholds_at_the_ends() -> None:
    boxes = np.array([[0, 0, 10, 10], [5, 5, 5, 5], [5, 5, 5, 5], [100, 100, 110, 110]], dtype=float)
    scores = np.array([0.9, 0.8, 0.8, 0.7])
    for method in ("greedy-nmm", "nmm"):
        for metric in ("iou", "ios"):
            for threshold in (0.0, 0.5, 1.0):
                ours = _ours(method, boxes, scores, [0] * 4, metric, threshold, True)
                theirs = _sahi(method, boxes, scores, [0] * 4, metric, threshold, True)
                assert ours == theirs, (method, metric, threshold)


def test_sahi_nmm_shortcut_at_threshold_zero() -> None:
    """At threshold 0 every pair matches, and SAHI's nmm takes a shortcut that keeps two
    identical boxes apart when they tie with the top score; its own loop (and ptools) merges
    the second into the first. ptools follows the loop."""
    boxes = np.array([[0, 0, 10, 10], [20, 20, 30, 30], [20, 20, 30, 30], [50, 50, 60, 60]], dtype=float)
    scores = np.array([0.9, 0.9, 0.9, 0.5])
    ours = _ours("nmm", boxes, scores, [0] * 4, "iou", 0.0, True)
    assert ours == _sahi("nmm", boxes, scores, [0] * 4, "iou", 0.0, True)  # the loop
    shortcut = _sahi("nmm", boxes, scores, [0] * 4, "iou", 0.0, True, dense=False)
    assert len(shortcut) == 3 and len(ours) == 2
    assert ours == [((0.0, 0.0, 60.0, 60.0), 0.9), ((20.0, 20.0, 30.0, 30.0), 0.9)]


def test_exact_threshold_where_sahi_float32_rounds_below() -> None:
    """Two boxes (xywh) whose IoS is 98.95 / 197.9 = 0.5 exactly: float64 computes 0.5000000000000002,
    SAHI's float32 0.49999994. At threshold 0.5 (>=) ptools merges them, SAHI keeps both."""
    boxes = np.array([[403.06, 110.93, 22.16, 197.9], [331.47, 209.88, 196.53, 122.41]])
    boxes[:, 2:] += boxes[:, :2]
    scores = np.array([0.18433, 0.05778])
    ours = _ours("greedy-nmm", boxes, scores, [0, 0], "ios", 0.5, True)
    assert len(ours) == 1 and ours[0][0] == pytest.approx((331.47, 110.93, 528.0, 332.29))
    assert len(_sahi("greedy-nmm", boxes, scores, [0, 0], "ios", 0.5, True)) == 2


def test_bad_arguments_are_refused() -> None:
    boxes, scores, groups = np.zeros((1, 4)), np.ones(1), np.zeros(1, dtype=np.int64)
    with pytest.raises(BadInputError, match="merging method"):
        merge_groups(boxes, scores, groups, method="soft")
    with pytest.raises(BadInputError, match="iou or ios"):
        merge_groups(boxes, scores, groups, metric="giou")
    with pytest.raises(BadInputError, match="between 0 and 1"):
        merge_groups(boxes, scores, groups, threshold=1.5)


def _records():
    return [
        {"image_id": 1, "category_id": 3, "bbox": [0, 0, 10, 10], "score": 0.9, "slice": "left"},
        {"image_id": 1, "category_id": 3, "bbox": [5, 0, 10, 10], "score": 0.6, "slice": "right"},
        {"image_id": 1, "category_id": 4, "bbox": [5, 0, 10, 10], "score": 0.5},
        {"image_id": 2, "category_id": 3, "bbox": [50, 50, 5, 5], "score": 0.7},
    ]


def test_run_nms_merges_records_and_keeps_other_fields() -> None:
    records = _records()
    detections = core.validate(records)
    kept, report = core.run_nms(detections, method="greedy-nmm", criterion="ios", iou_threshold=0.5)
    assert kept == [
        {"image_id": 1, "category_id": 3, "bbox": [0.0, 0.0, 15.0, 10.0], "score": 0.9, "slice": "left"},
        {"image_id": 1, "category_id": 4, "bbox": [5.0, 0.0, 10.0, 10.0], "score": 0.5},
        {"image_id": 2, "category_id": 3, "bbox": [50.0, 50.0, 5.0, 5.0], "score": 0.7},
    ]
    assert records == _records()  # the caller's records are left as they were
    assert report.rule == "IoS >= 0.5, merged greedily into the best box"
    agnostic, _ = core.run_nms(core.validate(_records()), method="nmm", criterion="ios", agnostic=True)
    assert [r["bbox"] for r in agnostic] == [[0.0, 0.0, 15.0, 10.0], [50.0, 50.0, 5.0, 5.0]]


def test_run_nms_merging_options() -> None:
    detections = core.validate(_records())
    with pytest.raises(BadInputError, match="iou or ios"):
        core.run_nms(detections, method="nmm", criterion="diou")
    with pytest.raises(BadInputError, match="cuda"):
        core.run_nms(detections, method="nmm", device="cuda")
    with pytest.raises(BadInputError, match="apply to `method` wbf and nmw"):
        core.run_nms(detections, method="greedy-nmm", model_weights=[1.0])
    # per-class threshold and score cut-off
    kept, _ = core.run_nms(
        detections, method="greedy-nmm", criterion="ios", class_iou={3: 0.6}, class_score_threshold={4: 0.55}
    )
    assert [(r["category_id"], r["bbox"]) for r in kept] == [
        (3, [0.0, 0.0, 10.0, 10.0]), (3, [5.0, 0.0, 10.0, 10.0]), (3, [50.0, 50.0, 5.0, 5.0])
    ]  # fmt: skip


def test_cli_greedy_nmm_with_match_metric(tmp_path) -> None:
    source = tmp_path / "sliced.json"
    source.write_text(json.dumps(_records()))
    run = subprocess.run(
        [sys.executable, "-m", "ptools", "nms", str(source), "--method", "greedy-nmm", "--match-metric", "ios"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    assert [r["bbox"] for r in json.loads(run.stdout)] == [[0.0, 0.0, 15.0, 10.0], [5.0, 0.0, 10.0, 10.0],
                                                           [50.0, 50.0, 5.0, 5.0]]  # fmt: skip
    assert "IoS >= 0.5, merged greedily" in run.stderr
    refused = subprocess.run(
        [sys.executable, "-m", "ptools", "nms", str(source), "--method", "nmm", "--criterion", "ciou"],
        capture_output=True,
        text=True,
    )
    assert refused.returncode == 1 and "iou or ios" in refused.stderr


@pytest.mark.parametrize("method", ["hard", "and", "merge", "soft", "diou", "greedy-nmm", "nmm"])
@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), criterion=st.sampled_from(["iou", "giou", "ciou", "ios"]),
       threshold=st.sampled_from([0.0, 0.3, 0.7]))  # fmt: skip
def test_splitting_large_groups_changes_nothing(method, seed, criterion, threshold) -> None:
    """A group split into parts that cannot overlap (what makes one image of thousands of boxes
    fast) gives the same result as the group whole: boxes touching, nested, identical, empty."""
    import ptools.core.nms as nms_module

    generator = np.random.default_rng(seed)
    count = 300
    corner = np.round(generator.uniform(0, 400, (count, 2)) / 5) * 5  # on a grid: edges touch
    size = np.round(generator.uniform(0, 40, (count, 2)) / 5) * 5  # some zero-area boxes
    boxes = np.concatenate([corner, corner + size], axis=1)
    boxes[10:20] = boxes[0]  # identical boxes
    scores = np.round(generator.random(count), 2)  # ties
    groups = generator.integers(0, 2, count)

    def run():
        if method in ("greedy-nmm", "nmm"):
            metric = criterion if criterion in ("iou", "ios") else "iou"
            return merge_groups(boxes, scores, groups, method=method, metric=metric, threshold=threshold)
        kind = "diou" if method == "diou" else criterion
        return nms_groups(boxes, scores, groups, method=method, iou_threshold=threshold, criterion=kind)

    def rows(result):
        return sorted(zip(result.keep.tolist(), result.scores.tolist(), map(tuple, result.boxes.tolist())))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(nms_module, "SPLIT_MIN_GROUP", 10**9)
        whole = rows(run())
        patch.setattr(nms_module, "SPLIT_MIN_GROUP", 2)
        assert rows(run()) == whole


def test_thousands_of_boxes_in_one_image_split_into_parts() -> None:
    """The slow case of the lockstep engine: one image, 20,000 boxes in a grid. Split, it
    takes a few numpy passes; the parts are the grid's cells."""
    from ptools.core.nms import overlap_components

    cells = np.arange(20_000)
    corner = np.stack([cells % 200 * 20.0, cells // 200 * 20.0], axis=1)
    boxes = np.concatenate([corner, corner + 10], axis=1)
    assert np.unique(overlap_components(boxes, np.zeros(20_000, dtype=np.int64))).size == 20_000
    touching = np.array([[0, 0, 10, 10], [10, 0, 20, 10], [30, 0, 40, 10]], dtype=float)
    assert overlap_components(touching, np.zeros(3, dtype=np.int64)).tolist() == [0, 0, 1]
