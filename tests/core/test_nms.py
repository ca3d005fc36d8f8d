"""NMS against torchvision and against slow, obviously-correct references of the notes' rules."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st

from ptools.core.nms import canonical_method, limit_per_image, nms, nms_groups, to_xyxy
from ptools.errors import BadInputError

# ---------------------------------------------------------------- slow references (the rules in README, `ptools nms`)


def ref_iou(a, b) -> float:
    area_a = (a[2] - a[0]) * (a[3] - a[1])
    area_b = (b[2] - b[0]) * (b[3] - b[1])
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = area_a + area_b - inter
    return inter / union if union > 0 else 0.0


def ref_diou(a, b) -> float:
    dx = (a[0] + a[2]) / 2 - (b[0] + b[2]) / 2
    dy = (a[1] + a[3]) / 2 - (b[1] + b[3]) / 2
    cw = max(a[2], b[2]) - min(a[0], b[0])
    ch = max(a[3], b[3]) - min(a[1], b[1])
    c2 = cw * cw + ch * ch
    return ref_iou(a, b) - ((dx * dx + dy * dy) / c2 if c2 > 0 else 0.0)


def by_rank(indices, scores):
    """Score descending, stable: equal scores keep input order."""
    return sorted(indices, key=lambda i: (-scores[i], i))


def ref_greedy(boxes, scores, labels, method, thr, and_thr=0.5):
    """One group at a time, one box at a time, as the rules read. Returns {index: box}."""
    kept = {}
    for label in sorted(set(labels)):
        remaining = by_rank([i for i in range(len(scores)) if labels[i] == label], scores)
        while remaining:
            head, rest = remaining[0], remaining[1:]
            measure = ref_diou if method == "diou" else ref_iou
            cluster = [j for j in rest if measure(boxes[head], boxes[j]) > thr]
            if method == "and":
                if any(ref_iou(boxes[head], boxes[j]) > and_thr for j in rest):
                    kept[head] = list(boxes[head])
            elif method == "merge":
                members = [head] + [j for j in rest if ref_iou(boxes[head], boxes[j]) > thr]
                total = sum(scores[j] for j in members)
                kept[head] = ([sum(scores[j] * boxes[j][k] for j in members) / total for k in range(4)]
                              if total > 0 else list(boxes[head]))
            else:
                kept[head] = list(boxes[head])
            remaining = [j for j in rest if j not in cluster]
    return kept


def ref_soft(boxes, scores, labels, fn, thr, sigma, score_thr):
    """Soft-NMS, re-picking the best current score after every decay. Returns {index: score}."""
    out = {}
    for label in sorted(set(labels)):
        current = {i: scores[i] for i in range(len(scores)) if labels[i] == label and scores[i] > score_thr}
        while current:
            head = min(current, key=lambda i: (-current[i], i))
            out[head] = current.pop(head)
            for j in list(current):
                iou = ref_iou(boxes[head], boxes[j])
                if fn == "gaussian":
                    current[j] *= math.exp(-(iou * iou) / sigma)
                elif iou > thr:
                    current[j] *= 1 - iou
                if current[j] <= score_thr:
                    del current[j]
    return out


# ---------------------------------------------------------------- case generators


def random_case(seed: int, n: int | None = None, negative: bool = False, classes: int = 4, grid: bool = False,
                ties: bool = False, duplicates: bool = False):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 200)) if n is None else n
    xy = rng.uniform(-60 if negative else 0, 400, (n, 2))
    wh = rng.uniform(0, 100, (n, 2))
    if grid:  # exact coordinates: touching edges, equal IoUs at thresholds
        xy, wh = np.round(xy / 25) * 25, np.round(wh / 25) * 25
    if duplicates:
        half = n // 2
        xy[half:2 * half], wh[half:2 * half] = xy[:half], wh[:half]
    boxes = np.concatenate([xy, xy + wh], axis=1)
    scores = rng.uniform(0, 1, n)
    if ties:
        scores = np.round(scores * 3) / 3
    labels = rng.integers(0, classes, n)
    return boxes, scores, labels


def per_class_torchvision(boxes, scores, labels, thr):
    kept = []
    for label in np.unique(labels):
        idx = np.flatnonzero(labels == label)
        keep = torchvision.ops.nms(torch.tensor(boxes[idx]), torch.tensor(scores[idx]), thr).numpy()
        kept.extend(idx[keep].tolist())
    return set(kept)


THRESHOLDS = [0.0, 0.25, 0.5, 0.7, 1.0]

# ---------------------------------------------------------------- hard == torchvision


@pytest.mark.parametrize("seed", range(40))
@pytest.mark.parametrize("thr", THRESHOLDS)
def test_hard_equals_torchvision_batched_nms(seed: int, thr: float) -> None:
    boxes, scores, labels = random_case(seed, grid=seed % 3 == 0, ties=seed % 2 == 0, duplicates=seed % 5 == 0)
    keep, kept_scores = nms(boxes, scores, labels, iou_threshold=thr)
    reference = torchvision.ops.batched_nms(torch.tensor(boxes), torch.tensor(scores), torch.tensor(labels), thr)
    assert keep.tolist() == reference.tolist()  # same set, same order (score desc, stable)
    np.testing.assert_array_equal(kept_scores, scores[keep])


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("thr", THRESHOLDS)
def test_hard_with_negative_coordinates_equals_per_class_torchvision(seed: int, thr: float) -> None:
    """torchvision's batched_nms offsets classes by max coordinate + 1, which lets classes
    overlap when coordinates are negative (detectron2's note); class-aware NMS is what is meant."""
    boxes, scores, labels = random_case(1000 + seed, negative=True, grid=seed % 2 == 0, ties=True)
    keep, _ = nms(boxes, scores, labels, iou_threshold=thr)
    assert set(keep.tolist()) == per_class_torchvision(boxes, scores, labels, thr)


def test_torchvision_offset_trick_can_mix_classes_and_we_do_not() -> None:
    """The README's example: two classes, one box each, negative coordinates. The offset is
    max coordinate + 1 = 6, so class 1's box moves to (-24, -24, 11, 11) and still overlaps
    class 0's box by IoU 0.52: batched_nms drops a box no class-aware NMS would drop."""
    boxes = np.array([[-30.0, -30.0, 5.0, 5.0], [-30.0, -30.0, 5.0, 5.0]])
    scores = np.array([0.9, 0.8])
    labels = np.array([0, 1])
    shifted = torchvision.ops.batched_nms(torch.tensor(boxes), torch.tensor(scores), torch.tensor(labels), 0.5)
    keep, _ = nms(boxes, scores, labels, iou_threshold=0.5)
    assert keep.tolist() == [0, 1]
    assert shifted.tolist() == [0], "torchvision no longer mixes classes here: update the README"


@pytest.mark.parametrize("thr", [0.0, 0.5, 1.0])
def test_hard_agnostic_equals_torchvision_nms(thr: float) -> None:
    boxes, scores, labels = random_case(7, n=300, ties=True, grid=True)
    keep, _ = nms(boxes, scores, labels, iou_threshold=thr, agnostic=True)
    assert keep.tolist() == torchvision.ops.nms(torch.tensor(boxes), torch.tensor(scores), thr).tolist()


def test_identical_and_zero_area_boxes() -> None:
    boxes = np.array([[0, 0, 10, 10]] * 3 + [[5, 5, 5, 5]] * 3 + [[0, 0, 0, 0]], dtype=float)
    scores = np.array([0.5, 0.5, 0.5, 0.9, 0.9, 0.1, 0.3])
    for thr in (0.0, 0.5, 1.0):
        keep, _ = nms(boxes, scores, iou_threshold=thr)
        reference = torchvision.ops.nms(torch.tensor(boxes), torch.tensor(scores), thr)
        assert keep.tolist() == reference.tolist()
    keep, _ = nms(boxes, scores, iou_threshold=0.5)
    assert keep.tolist() == [3, 4, 0, 6, 5]  # identical boxes with equal scores: the first wins


def test_thousands_of_boxes_in_one_class() -> None:
    boxes, scores, _ = random_case(3, n=4000, classes=1)
    labels = np.zeros(4000, dtype=np.int64)
    keep, _ = nms(boxes, scores, labels, iou_threshold=0.3)
    reference = torchvision.ops.batched_nms(torch.tensor(boxes), torch.tensor(scores), torch.tensor(labels), 0.3)
    assert keep.tolist() == reference.tolist()


def test_many_images_never_interact() -> None:
    rng = np.random.default_rng(5)
    boxes, scores, labels = random_case(11, n=2000, classes=6)
    images = rng.integers(0, 50, 2000)
    keep, _ = nms(boxes, scores, labels, images=images, iou_threshold=0.5)
    expected = []
    for image in np.unique(images):
        idx = np.flatnonzero(images == image)
        local = torchvision.ops.batched_nms(torch.tensor(boxes[idx]), torch.tensor(scores[idx]),
                                            torch.tensor(labels[idx]), 0.5).numpy()
        expected.extend(idx[local].tolist())
    assert keep.tolist() == expected  # by image, then score


# ---------------------------------------------------------------- the other methods


@pytest.mark.parametrize("seed", range(25))
@pytest.mark.parametrize("method", ["and", "merge", "diou"])
def test_greedy_variants_equal_references(seed: int, method: str) -> None:
    boxes, scores, labels = random_case(200 + seed, n=int(np.random.default_rng(seed).integers(1, 120)),
                                        grid=seed % 3 == 0, ties=seed % 2 == 0, duplicates=seed % 4 == 0)
    thr = THRESHOLDS[seed % 5]
    result = nms_groups(boxes, scores, labels, method=method, iou_threshold=thr)
    expected = ref_greedy(boxes.tolist(), scores.tolist(), labels.tolist(), method, thr)
    assert set(result.keep.tolist()) == set(expected)
    if method == "merge":
        for index, box in zip(result.keep.tolist(), result.boxes.tolist()):
            np.testing.assert_allclose(box, expected[index], rtol=1e-12, atol=1e-9)
        np.testing.assert_array_equal(result.scores, scores[result.keep])  # the head's score stays


@pytest.mark.parametrize("seed", range(25))
@pytest.mark.parametrize("fn", ["gaussian", "linear"])
def test_soft_equals_reference(seed: int, fn: str) -> None:
    boxes, scores, labels = random_case(400 + seed, n=int(np.random.default_rng(seed).integers(1, 100)),
                                        grid=seed % 3 == 0, ties=seed % 2 == 0, duplicates=seed % 4 == 0)
    thr, sigma, score_thr = [0.3, 0.5, 0.7][seed % 3], [0.5, 0.1, 2.0][seed % 3], [0.001, 0.1, 0.0][seed % 3]
    result = nms_groups(boxes, scores, labels, method="soft", soft_fn=fn, iou_threshold=thr, sigma=sigma,
                        score_threshold=score_thr)
    expected = ref_soft(boxes.tolist(), scores.tolist(), labels.tolist(), fn, thr, sigma, score_thr)
    assert set(result.keep.tolist()) == set(expected)
    for index, score in zip(result.keep.tolist(), result.scores.tolist()):
        assert score == pytest.approx(expected[index], abs=1e-6)
    keep, kept_scores = nms(boxes, scores, labels, method="soft", soft_fn=fn, iou_threshold=thr, sigma=sigma,
                            score_threshold=score_thr)
    assert (np.diff(kept_scores) <= 0).all()  # one image: decayed scores sorted descending


def test_soft_returns_decayed_scores() -> None:
    boxes = np.array([[0, 0, 10, 10], [1, 0, 11, 10]], dtype=float)
    keep, scores = nms(boxes, np.array([0.9, 0.8]), method="soft", sigma=0.5)
    iou = 90 / 110
    assert keep.tolist() == [0, 1]
    assert scores[1] == pytest.approx(0.8 * math.exp(-(iou ** 2) / 0.5), abs=1e-12)


# ---------------------------------------------------------------- options and the library


def test_score_threshold_and_max_det() -> None:
    boxes, scores, labels = random_case(9, n=150, classes=3)
    images = np.repeat([0, 1, 2], 50)
    keep, kept_scores = nms(boxes, scores, labels, images=images, score_threshold=0.5, max_det=4)
    assert (kept_scores > 0.5).all()
    counts = np.bincount(images[keep], minlength=3)
    assert (counts <= 4).all()
    full, full_scores = nms(boxes, scores, labels, images=images, score_threshold=0.5)
    for image in range(3):  # the top 4 per image of the full result
        top = full[images[full] == image][:4]
        assert keep[images[keep] == image].tolist() == top.tolist()


def test_torch_tensors_in_and_out() -> None:
    boxes, scores, labels = random_case(13, n=100)
    keep, kept_scores = nms(torch.tensor(boxes), torch.tensor(scores), torch.tensor(labels), method="soft")
    assert isinstance(keep, torch.Tensor) and keep.dtype == torch.int64
    reference, reference_scores = nms(boxes, scores, labels, method="soft")
    assert keep.tolist() == reference.tolist()
    np.testing.assert_allclose(kept_scores.numpy(), reference_scores)


@pytest.mark.cuda
def test_cuda_tensors_use_torchvision_kernel() -> None:
    boxes, scores, labels = random_case(17, n=3000, classes=5)
    keep, _ = nms(torch.tensor(boxes, device="cuda"), torch.tensor(scores, device="cuda"),
                  torch.tensor(labels, device="cuda"))
    assert keep.device.type == "cuda"
    assert keep.cpu().tolist() == nms(boxes, scores, labels)[0].tolist()


def test_box_formats_and_aliases() -> None:
    xyxy = np.array([[10.0, 20.0, 30.0, 60.0]])
    assert to_xyxy(np.array([[10.0, 20.0, 20.0, 40.0]]), "xywh").tolist() == xyxy.tolist()
    assert to_xyxy(np.array([[20.0, 40.0, 20.0, 40.0]]), "cxcywh").tolist() == xyxy.tolist()
    assert all(canonical_method(a) == "hard" for a in ("vision", "vision_batch", "batched", "or"))
    with pytest.raises(BadInputError, match="unknown method 'sfot'; choose one of: hard, and, merge, diou, soft"):
        canonical_method("sfot")


def test_empty_input() -> None:
    keep, scores = nms(np.zeros((0, 4)), np.zeros(0))
    assert keep.size == 0 and scores.size == 0
    assert limit_per_image(np.zeros(0, dtype=np.int64), keep, scores, 5).size == 0


# ---------------------------------------------------------------- properties


box_lists = st.lists(st.tuples(st.floats(-50, 300), st.floats(-50, 300), st.floats(0, 120), st.floats(0, 120),
                               st.floats(0, 1), st.integers(0, 2)), min_size=0, max_size=60)


@settings(max_examples=150, deadline=None)
@given(rows=box_lists, thr=st.sampled_from(THRESHOLDS))
def test_hard_properties(rows, thr: float) -> None:
    boxes = np.array([[x, y, x + w, y + h] for x, y, w, h, _, _ in rows]).reshape(-1, 4)
    scores = np.array([r[4] for r in rows])
    labels = np.array([r[5] for r in rows], dtype=np.int64)
    keep, _ = nms(boxes, scores, labels, iou_threshold=thr)
    assert set(keep.tolist()) <= set(range(len(rows)))
    for a in keep.tolist():  # no two kept boxes of a class overlap above the threshold
        for b in keep.tolist():
            if a < b and labels[a] == labels[b]:
                assert not ref_iou(boxes[a], boxes[b]) > thr
    again, _ = nms(boxes[keep], scores[keep], labels[keep], iou_threshold=thr)  # idempotent
    assert again.tolist() == list(range(keep.size))


@settings(max_examples=100, deadline=None)
@given(rows=box_lists, method=st.sampled_from(["and", "merge", "diou", "soft"]))
def test_other_methods_output_is_a_subset(rows, method: str) -> None:
    boxes = np.array([[x, y, x + w, y + h] for x, y, w, h, _, _ in rows]).reshape(-1, 4)
    scores = np.array([r[4] for r in rows])
    labels = np.array([r[5] for r in rows], dtype=np.int64)
    keep, kept_scores = nms(boxes, scores, labels, method=method)
    assert len(set(keep.tolist())) == keep.size and set(keep.tolist()) <= set(range(len(rows)))
    assert (kept_scores <= scores[keep] + 1e-12).all()


def test_parallel_parts_give_the_same_result(monkeypatch: pytest.MonkeyPatch) -> None:
    """Large inputs run one thread per part of the groups; the result must not change."""
    from ptools.core import nms as engine

    rng = np.random.default_rng(21)
    boxes, scores, labels = random_case(23, n=3000, classes=7)
    images = rng.integers(0, 40, 3000)
    expected = {m: nms(boxes, scores, labels, images=images, method=m) for m in ("hard", "soft", "merge")}
    monkeypatch.setattr(engine, "PARALLEL_MIN_BOXES", 10)
    monkeypatch.setattr(os, "cpu_count", lambda: 3)
    assert len(engine.split_groups(images * 7 + labels)) == 3
    for method, (keep, kept_scores) in expected.items():
        got_keep, got_scores = nms(boxes, scores, labels, images=images, method=method)
        assert got_keep.tolist() == keep.tolist()
        np.testing.assert_array_equal(got_scores, kept_scores)


@pytest.mark.parametrize("method", ["soft", "merge"])
def test_run_nms_leaves_the_callers_records_as_they_were(method: str) -> None:
    import copy

    from ptools.core import detections

    records = [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.9},
               {"image_id": 1, "category_id": 1, "bbox": [1, 1, 10, 10], "score": 0.8}]
    original = copy.deepcopy(records)
    kept, _ = detections.run_nms(detections.validate(records), method=method)
    assert records == original and kept and kept[0] is not records[0]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"iou_threshold": 1.5}, "`iou_threshold` must be between 0 and 1, not 1.5"),
    ({"iou_threshold": -0.1}, "`iou_threshold` must be between 0 and 1"),
    ({"max_det": 0}, "`max_det` must be 1 or more, not 0"),
    ({"method": "soft", "sigma": 0}, "`sigma` must be > 0, not 0"),
])
def test_library_nms_checks_its_own_parameters_in_python_words(kwargs: dict, message: str) -> None:
    boxes = np.array([[0, 0, 10, 10], [1, 1, 10, 10]], dtype=np.float64)
    with pytest.raises(BadInputError) as caught:
        nms(boxes, np.array([0.9, 0.8]), **kwargs)
    assert message in str(caught.value) and "--" not in str(caught.value)


def test_run_nms_may_update_records_the_caller_gives_up() -> None:
    from ptools.core import detections

    records = [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.9},
               {"image_id": 1, "category_id": 1, "bbox": [1, 1, 10, 10], "score": 0.8}]
    kept, _ = detections.run_nms(detections.validate(records), method="soft", keep_input=False)
    assert kept[1] is records[1] and records[1]["score"] < 0.8  # decayed in place, no copy


@pytest.mark.parametrize(("boxes", "scores", "message"), [
    (np.zeros((2, 6)), np.zeros(3), r"boxes must be \[N, 4\], not \[2, 6\]"),
    (np.zeros(8), np.zeros(2), r"boxes must be \[N, 4\], not \[8\]"),
    (np.zeros((2, 4)), np.zeros((2, 1)), r"scores must be \[N\] for boxes \[2, 4\], not \[2, 1\]"),
    (np.zeros((2, 4)), np.zeros(3), r"scores must be \[N\]"),
])
def test_nms_refuses_shapes_torchvision_refuses(boxes: np.ndarray, scores: np.ndarray, message: str) -> None:
    """A (2, 6) array was reshaped into three boxes and a flat array accepted."""
    from ptools.core.nms import nms

    with pytest.raises(BadInputError, match=message):
        nms(boxes, scores)
    with pytest.raises(BadInputError, match=message):
        nms(torch.as_tensor(boxes), torch.as_tensor(scores))
    with pytest.raises(BadInputError, match=r"labels must be \[N\]"):
        nms(np.zeros((2, 4)), np.zeros(2), np.zeros(3))


def test_iou_exactly_at_the_threshold_is_compared_in_float64() -> None:
    """(0,0,10,10) and (0,0,10,2) have IoU 0.2 exactly. torchvision compares a float32 IoU
    (0.2000000030) for float32 tensors and suppresses; in float64 it keeps both, as ptools
    does for every input (README: hard NMS, 'float32 inputs')."""
    from torchvision.ops import nms as torchvision_nms

    from ptools.core.nms import nms

    boxes, scores = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 2.0]]), torch.tensor([0.9, 0.8])
    assert torchvision_nms(boxes, scores, 0.2).tolist() == [0]
    assert torchvision_nms(boxes.double(), scores.double(), 0.2).tolist() == [0, 1]
    assert nms(boxes, scores, iou_threshold=0.2)[0].tolist() == [0, 1]


def test_a_nan_score_ranks_last_and_never_suppresses() -> None:
    """torchvision sorts NaN first, so a NaN-scored box is kept and suppresses real ones;
    ptools ranks it below every number (README: hard NMS, 'NaN scores')."""
    from torchvision.ops import nms as torchvision_nms

    from ptools.core.nms import nms

    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 9.0], [50, 50, 60, 60]])
    scores = torch.tensor([float("nan"), 0.8, 0.7])
    assert torchvision_nms(boxes, scores, 0.5).tolist() == [0, 2]
    assert nms(boxes, scores, iou_threshold=0.5)[0].tolist() == [1, 2]
