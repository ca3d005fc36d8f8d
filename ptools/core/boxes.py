"""The IoU family: IoU, GIoU, DIoU and CIoU, and SAHI's IoS (intersection over the smaller
box), on numpy (torch-free) or torch tensors.

One set of formulas serves both uses: pairwise N×M matrices (:func:`box_iou`, equal to
torchvision's ``box_iou``, ``generalized_box_iou``, ``distance_box_iou`` and
``complete_box_iou``) and the element-wise criterion the NMS engine compares with its
threshold (:func:`overlap`). Boxes are xyxy; everything is computed in float64.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ptools.core.choices import IouKind, values
from ptools.errors import BadInputError

IOU_KINDS = values(IouKind)
_FOUR_OVER_PI_SQUARED = 4 / math.pi**2


def overlap(a: tuple[np.ndarray, ...], b: tuple[np.ndarray, ...], kind: str = "iou", eps: float = 0.0) -> np.ndarray:
    """The ``kind`` overlap of boxes ``a`` and ``b``, given as broadcastable coordinate arrays
    ``(x1, y1, x2, y2)`` (float64).

    - ``iou``: inter / (area_a + area_b − inter); NaN when both areas are 0.
    - ``giou``: IoU − (C − union) / C, C the area of the smallest enclosing box.
    - ``diou``: IoU − ρ² / (c² + eps), ρ the distance of the centres, c the enclosing diagonal.
    - ``ciou``: DIoU − α·v, v = 4/π² (atan(w_a/h_a) − atan(w_b/h_b))², α = v / (1 − IoU + v + eps)
      (α = 0 where v = 0, so identical boxes score 1 even with ``eps`` 0).
    - ``ios``: inter / min(area_a, area_b), intersection over the smaller box (SAHI's IOS): 1
      for a box inside another; NaN when the smaller area is 0.

    NaN (degenerate boxes) compares false with any threshold: it never suppresses.
    """
    if kind not in IOU_KINDS:
        raise BadInputError(f"unknown overlap `criterion` {kind!r}; choose one of: {', '.join(IOU_KINDS)}")
    ax1, ay1, ax2, ay2 = a
    bx1, by1, bx2, by2 = b
    area_a = (ax2 - ax1) * (ay2 - ay1)
    area_b = (bx2 - bx1) * (by2 - by1)
    w = np.clip(np.minimum(ax2, bx2) - np.maximum(ax1, bx1), 0, None)
    h = np.clip(np.minimum(ay2, by2) - np.maximum(ay1, by1), 0, None)
    inter = w * h
    union = area_a + area_b - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        if kind == "ios":
            return inter / np.minimum(area_a, area_b)
        iou = inter / union
        if kind == "iou":
            return iou
        enclosing_w = np.clip(np.maximum(ax2, bx2) - np.minimum(ax1, bx1), 0, None)
        enclosing_h = np.clip(np.maximum(ay2, by2) - np.minimum(ay1, by1), 0, None)
        if kind == "giou":
            enclosing = enclosing_w * enclosing_h
            return iou - (enclosing - union) / enclosing
        dx = (ax1 + ax2) / 2 - (bx1 + bx2) / 2
        dy = (ay1 + ay2) / 2 - (by1 + by2) / 2
        diou = iou - (dx * dx + dy * dy) / (enclosing_w * enclosing_w + enclosing_h * enclosing_h + eps)
        if kind == "diou":
            return diou
        v = _FOUR_OVER_PI_SQUARED * (np.arctan((ax2 - ax1) / (ay2 - ay1)) - np.arctan((bx2 - bx1) / (by2 - by1))) ** 2
        alpha = np.where(v == 0, 0.0, v / (1 - iou + v + eps))
        return diou - alpha * v


def _columns(boxes: np.ndarray) -> tuple[np.ndarray, ...]:
    return tuple(boxes[..., i] for i in range(4))


def box_iou(a: Any, b: Any, kind: IouKind = "iou", *, eps: float = 1e-7) -> Any:
    """Pairwise overlap of ``a (ndarray|Tensor[N, 4])`` and ``b (…[M, 4])``, xyxy: an N×M matrix.

    ``kind``: ``iou``, ``giou``, ``diou``, ``ciou`` or ``ios`` (see :func:`overlap`); ``eps`` is
    torchvision's (DIoU and CIoU only), so the results equal ``torchvision.ops.box_iou``,
    ``generalized_box_iou``, ``distance_box_iou`` and ``complete_box_iou``. numpy in, float64
    numpy out, without importing torch; torch tensors in (any device), a float64 tensor out on
    their device (computed on the CPU).

    Raises:
        BadInputError: an unknown kind, or arrays that are not [N, 4].
    """
    is_torch = type(a).__module__.startswith("torch")
    device = a.device if is_torch else None
    if is_torch:
        a, b = a.detach().cpu().numpy(), b.detach().cpu().numpy()
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or a.shape[1] != 4 or b.ndim != 2 or b.shape[1] != 4:
        raise BadInputError(f"boxes must be [N, 4] and [M, 4], not {list(a.shape)} and {list(b.shape)}")
    result = overlap(_columns(a[:, None, :]), _columns(b[None, :, :]), kind, eps if kind in ("diou", "ciou") else 0.0)
    if is_torch:
        import torch

        return torch.as_tensor(result, device=device)
    return result
