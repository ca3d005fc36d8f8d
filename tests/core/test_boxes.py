"""The IoU family against torchvision, and every greedy method with every criterion against a
one-box-at-a-time reference."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision.ops import box_iou as tv_iou
from torchvision.ops import complete_box_iou, distance_box_iou, generalized_box_iou

from ptools.core.boxes import box_iou
from ptools.core.nms import nms
from ptools.errors import BadInputError

TORCHVISION = {"iou": tv_iou, "giou": generalized_box_iou, "diou": distance_box_iou, "ciou": complete_box_iou}
KINDS = list(TORCHVISION)


def _random_boxes(generator: np.random.Generator, count: int) -> np.ndarray:
    corner = generator.uniform(-50, 200, (count, 2))
    size = generator.uniform(0, 80, (count, 2))
    size[generator.random(count) < 0.1] = 0  # zero-area boxes
    return np.concatenate([corner, corner + size], axis=1)


def _degenerate() -> np.ndarray:
    return np.array(
        [
            [0, 0, 10, 10],
            [0, 0, 10, 10],  # identical
            [20, 20, 30, 40],  # disjoint
            [5, 5, 5, 5],  # a point
            [5, 5, 5, 5],  # the same point
            [0, 3, 10, 3],  # zero height
            [-10, -10, 0, 0],  # touching a corner
            [2, 2, 8, 8],  # inside
        ],
        dtype=np.float64,
    )


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed", range(4))
def test_box_iou_equals_torchvision(kind: str, seed: int) -> None:
    generator = np.random.default_rng(seed)
    a = np.concatenate([_degenerate(), _random_boxes(generator, 60)])
    b = np.concatenate([_degenerate(), _random_boxes(generator, 45)])
    ours = box_iou(a, b, kind)
    theirs = TORCHVISION[kind](torch.from_numpy(a), torch.from_numpy(b)).numpy()
    assert ours.shape == (len(a), len(b)) and ours.dtype == np.float64
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(theirs))
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6, equal_nan=True)


def test_box_iou_takes_torch_tensors_and_stays_torch_free_on_numpy() -> None:
    a = torch.tensor([[0.0, 0, 10, 10]])
    b = torch.tensor([[5.0, 5, 15, 15], [0, 0, 10, 10]])
    result = box_iou(a, b, "giou")
    assert isinstance(result, torch.Tensor) and result.shape == (1, 2)
    torch.testing.assert_close(result, generalized_box_iou(a.double(), b.double()))
    code = "import numpy, sys; from ptools.core.boxes import box_iou; box_iou(numpy.ones((1, 4)), numpy.ones((2, 4)), 'ciou'); print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
    with pytest.raises(BadInputError, match="unknown overlap `criterion` 'eiou'"):
        box_iou(np.ones((1, 4)), np.ones((1, 4)), "eiou")  # type: ignore[arg-type]
    with pytest.raises(BadInputError, match=r"\[N, 4\]"):
        box_iou(np.ones((3,)), np.ones((1, 4)))


# ---------------------------------------------------------------- the criterion in the engine


def ref_overlap(a, b, kind: str) -> float:
    """One pair, as the formulas read (no eps; CIoU's alpha 0 where v is 0)."""
    area_a = (a[2] - a[0]) * (a[3] - a[1])
    area_b = (b[2] - b[0]) * (b[3] - b[1])
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = area_a + area_b - inter
    iou = inter / union if union > 0 else math.nan
    if kind == "iou":
        return iou
    cw = max(a[2], b[2]) - min(a[0], b[0])
    ch = max(a[3], b[3]) - min(a[1], b[1])
    if kind == "giou":
        return iou - (cw * ch - union) / (cw * ch) if cw * ch > 0 else math.nan
    rho2 = ((a[0] + a[2]) / 2 - (b[0] + b[2]) / 2) ** 2 + ((a[1] + a[3]) / 2 - (b[1] + b[3]) / 2) ** 2
    diou = iou - rho2 / (cw * cw + ch * ch) if cw * cw + ch * ch > 0 else math.nan
    if kind == "diou":
        return diou
    def angle(box):  # noqa: E306
        w, h = box[2] - box[0], box[3] - box[1]
        return math.atan(w / h) if h else (math.pi / 2 if w else math.nan)
    v = 4 / math.pi**2 * (angle(a) - angle(b)) ** 2
    if v == 0:
        return diou
    return diou - v / (1 - iou + v) * v


def ref_hard(boxes, scores, kind, threshold):
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    kept = []
    while order:
        head, order = order[0], order[1:]
        kept.append(head)
        order = [j for j in order if not ref_overlap(boxes[head], boxes[j], kind) > threshold]
    return kept


box_rows = st.lists(
    st.tuples(
        st.integers(0, 40), st.integers(0, 40), st.integers(0, 30), st.integers(1, 30), st.integers(1, 9)
    ),
    min_size=1,
    max_size=25,
)


@settings(max_examples=150, deadline=None)
@given(rows=box_rows, kind=st.sampled_from(KINDS), threshold=st.sampled_from([0.0, 0.1, 0.3, 0.5, 0.7]))
def test_hard_nms_with_each_criterion_equals_the_reference(rows, kind, threshold) -> None:
    boxes = [[x, y, x + w, y + h] for x, y, w, h, _ in rows]
    scores = [s / 10 for *_, s in rows]  # coarse scores: many ties
    keep, _ = nms(np.array(boxes, dtype=float), np.array(scores), criterion=kind, iou_threshold=threshold)
    assert sorted(keep.tolist()) == sorted(ref_hard(boxes, scores, kind, threshold))


def test_method_diou_is_hard_with_the_diou_criterion() -> None:
    generator = np.random.default_rng(3)
    boxes = _random_boxes(generator, 300)
    scores = generator.random(300)
    labels = generator.integers(0, 4, 300)
    by_method, _ = nms(boxes, scores, labels, method="diou", iou_threshold=0.4)
    by_criterion, _ = nms(boxes, scores, labels, criterion="diou", iou_threshold=0.4)
    np.testing.assert_array_equal(by_method, by_criterion)
    with pytest.raises(BadInputError, match="method diou compares DIoU"):
        nms(boxes, scores, method="diou", criterion="giou")


def test_giou_suppresses_less_than_iou_at_zero_and_soft_ignores_negative_overlaps() -> None:
    boxes = np.array([[0, 0, 10, 10], [20, 0, 30, 10]], dtype=float)  # disjoint: IoU 0, GIoU < 0
    scores = np.array([0.9, 0.8])
    keep, _ = nms(boxes, scores, iou_threshold=0.0, criterion="giou")
    assert sorted(keep.tolist()) == [0, 1]
    keep, decayed = nms(boxes, scores, method="soft", criterion="giou")
    assert sorted(decayed.tolist()) == [0.8, 0.9]  # a negative GIoU decays nothing
