"""Non-maximum suppression: hard (torchvision's keep set, exactly), and, merge, DIoU, soft.

Semantics (see README): boxes are xyxy in pixels; IoU = inter / (area_a + area_b - inter) with
no "+1", computed in float64 in torchvision's operation order; a box is suppressed when the
criterion is **> threshold**; order is score descending, **stable** (equal scores: the earlier
input wins); groups (image × class, or image alone when class-agnostic) never interact.

The engine is greedy NMS run in lockstep over all groups at once: every step, each group
takes its best remaining box and tests the rest of its group against it with one vectorised
numpy pass. Steps are as many as the most boxes any one group keeps, so thousands of images
and classes cost a handful of numpy calls each, not a Python loop per box.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, overload

import numpy as np

from ptools.core.boxes import IOU_KINDS, overlap
from ptools.core.choices import BoxFormat, IouKind, NmsMethod, SoftFunction, values
from ptools.errors import BadInputError, RequirementNotMetError

if TYPE_CHECKING:
    import torch

METHODS = ("hard", "and", "merge", "diou", "soft")
ALIASES = {"vision": "hard", "vision_batch": "hard", "batched": "hard", "or": "hard"}
SOFT_FUNCTIONS = values(SoftFunction)
BOX_FORMATS = values(BoxFormat)
DEFAULT_SOFT_SCORE_THRESHOLD = 0.001


def canonical_method(method: str) -> str:
    """``hard`` for its aliases (``vision``, ``vision_batch``, ``batched``, ``or``).

    Raises:
        BadInputError: unknown method, listing the allowed names.
    """
    name = ALIASES.get(method, method)
    if name in ("wbf", "nmw"):
        raise BadInputError(
            f"method {name} fuses the boxes of several models; use ptools.core.fusion.fuse_groups, "
            "or `ptools nms` with several inputs"
        )
    if name in ("nmm", "greedy-nmm"):
        raise BadInputError(f"method {name} merges boxes; use ptools.merge_groups (or run_nms over detections)")
    if name not in METHODS:
        names = ", ".join((*METHODS, *ALIASES))
        raise BadInputError(f"unknown method {method!r}; choose one of: {names}")
    return name


def method_and_criterion(method: str, criterion: str = "iou") -> tuple[str, str]:
    """The engine's method and overlap: ``diou`` is hard NMS with the DIoU criterion.

    Raises:
        BadInputError: an unknown method or criterion, or diou with another criterion.
    """
    name = canonical_method(method)
    if criterion not in IOU_KINDS:
        raise BadInputError(f"unknown overlap `criterion` {criterion!r}; choose one of: {', '.join(IOU_KINDS)}")
    if name == "diou":
        if criterion not in ("iou", "diou"):
            raise BadInputError(f"method diou compares DIoU; it cannot take `criterion` {criterion}")
        return "hard", "diou"
    return name, criterion


def check_parameters(iou_threshold: float, max_det: int | None = None) -> None:
    """The ranges every entry point shares.

    Raises:
        BadInputError: ``iou_threshold`` outside [0, 1], or ``max_det`` below 1.
    """
    if not 0 <= iou_threshold <= 1:
        raise BadInputError(f"`iou_threshold` must be between 0 and 1, not {iou_threshold}")
    if max_det is not None and max_det < 1:
        raise BadInputError(f"`max_det` must be 1 or more, not {max_det}")


def to_xyxy(boxes: np.ndarray, box_format: str) -> np.ndarray:
    """Convert ``boxes (ndarray[N, 4])`` from ``xyxy``, ``xywh`` (COCO) or ``cxcywh`` to xyxy."""
    if box_format == "xyxy":
        return boxes.astype(np.float64, copy=True)
    if box_format == "xywh":
        x, y, w, h = boxes.T
        return np.stack([x, y, x + w, y + h], axis=1)
    if box_format == "cxcywh":
        cx, cy, w, h = boxes.T
        return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
    raise BadInputError(f"unknown box format {box_format!r}; choose one of: {', '.join(BOX_FORMATS)}")


def from_xyxy(boxes: np.ndarray, box_format: str) -> np.ndarray:
    """The inverse of :func:`to_xyxy`."""
    x1, y1, x2, y2 = boxes.T
    if box_format == "xyxy":
        return boxes
    if box_format == "xywh":
        return np.stack([x1, y1, x2 - x1, y2 - y1], axis=1)
    if box_format == "cxcywh":
        return np.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], axis=1)
    raise BadInputError(f"unknown box format {box_format!r}; choose one of: {', '.join(BOX_FORMATS)}")


@dataclass
class NmsResult:
    """What survives: ``keep`` (ndarray[K]) indices into the input, with their final
    ``scores`` (ndarray[K]; decayed for soft) and ``boxes`` (ndarray[K, 4], xyxy; merged for
    merge), in no particular order (:func:`limit_per_image` sorts them for output)."""

    keep: np.ndarray
    scores: np.ndarray
    boxes: np.ndarray


class _Boxes:
    """Coordinates, areas and centres, gathered per index without recomputation."""

    def __init__(self, xyxy: np.ndarray) -> None:
        self.x1, self.y1, self.x2, self.y2 = (np.ascontiguousarray(xyxy[:, i]) for i in range(4))
        self.area = (self.x2 - self.x1) * (self.y2 - self.y1)

    def iou(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """IoU of boxes ``a[i]`` and ``b[i]``, in torchvision's operation order; NaN when
        both areas are 0 (which, like 0, never exceeds a threshold)."""
        w = np.minimum(self.x2[a], self.x2[b]) - np.maximum(self.x1[a], self.x1[b])
        h = np.minimum(self.y2[a], self.y2[b]) - np.maximum(self.y1[a], self.y1[b])
        np.maximum(w, 0, out=w)
        np.maximum(h, 0, out=h)
        inter = w * h
        with np.errstate(divide="ignore", invalid="ignore"):
            return inter / (self.area[a] + self.area[b] - inter)

    def criterion(self, kind: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """The ``kind`` overlap (iou, giou, diou, ciou, ios; see :func:`ptools.core.boxes.overlap`,
        without eps) of boxes ``a[i]`` and ``b[i]``."""
        if kind == "iou":
            return self.iou(a, b)
        columns = (self.x1, self.y1, self.x2, self.y2)
        return overlap(tuple(c[a] for c in columns), tuple(c[b] for c in columns), kind)


T = TypeVar("T")
Threshold = float | np.ndarray  # one for all boxes, or one per box (per-class settings)


def per_box(single: float, given: np.ndarray | None) -> Threshold:
    """``single`` for every box, or ``given`` per box (per-class settings) with ``single``
    where it is NaN."""
    if given is None:
        return single
    given = np.asarray(given, dtype=np.float64)
    return np.where(np.isnan(given), single, given)


def overlap_limits(iou_threshold: float, iou_thresholds: np.ndarray | None) -> Threshold:
    """The overlap threshold of each box (:func:`per_box`), each between 0 and 1.

    Raises:
        BadInputError: a per-box threshold outside [0, 1].
    """
    limits = per_box(float(iou_threshold), iou_thresholds)
    if not isinstance(limits, float) and not ((limits >= 0) & (limits <= 1)).all():
        raise BadInputError("per-class IoU thresholds must be between 0 and 1")
    return limits


def _at(threshold: Threshold, index: np.ndarray) -> Threshold:
    """The threshold of the boxes at ``index``: a scalar stays a scalar (the common, fast case)."""
    return threshold if isinstance(threshold, float) else threshold[index]


def _segments(groups_of_rem: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For an array sorted by group: a flag at each group's first element, and group ordinals."""
    heads = np.empty(groups_of_rem.size, dtype=bool)
    heads[0] = True
    np.not_equal(groups_of_rem[1:], groups_of_rem[:-1], out=heads[1:])
    return heads, np.cumsum(heads) - 1


def _greedy(
    boxes: _Boxes,
    scores: np.ndarray,
    groups: np.ndarray,
    method: str,
    threshold: Threshold,
    and_threshold: float,
    kind: str = "iou",
) -> tuple[np.ndarray, np.ndarray | None]:
    """Hard, and or merge NMS with the ``kind`` overlap. Returns kept indices and, for merge,
    merged xyxy boxes."""
    order = np.lexsort((np.arange(scores.size), -scores, groups))  # group, score desc, input order
    remaining = order
    kept, merged = [], []
    while remaining.size:
        heads, segment = _segments(groups[remaining])
        head_index = remaining[heads]
        against = head_index[segment]
        criterion = boxes.criterion(kind, remaining, against)
        suppressed = criterion > _at(threshold, remaining)
        suppressed |= heads
        if method == "and":
            # Kept only if it overlaps some other remaining box of its group by more than
            # and_threshold; isolated boxes are dropped (but still suppress as in hard NMS).
            overlapping = (criterion > and_threshold) & ~heads
            has_partner = np.bincount(segment, weights=overlapping, minlength=head_index.size) > 0
            head_index = head_index[has_partner]
        elif method == "merge":
            weights = np.where(suppressed, scores[remaining], 0.0)
            total = np.bincount(segment, weights=weights, minlength=head_index.size)
            coordinates = []
            for values in (boxes.x1, boxes.y1, boxes.x2, boxes.y2):
                summed = np.bincount(segment, weights=weights * values[remaining], minlength=head_index.size)
                with np.errstate(divide="ignore", invalid="ignore"):
                    mean = summed / total
                coordinates.append(np.where(total > 0, mean, values[head_index]))
            merged.append(np.stack(coordinates, axis=1))
        kept.append(head_index)
        remaining = remaining[~suppressed]
    keep = np.concatenate(kept) if kept else np.empty(0, dtype=np.int64)
    merged_boxes = np.concatenate(merged) if merged else None
    return keep, merged_boxes


def _soft(
    boxes: _Boxes,
    scores: np.ndarray,
    groups: np.ndarray,
    function: str,
    threshold: Threshold,
    sigma: float,
    score_threshold: Threshold,
    kind: str = "iou",
) -> tuple[np.ndarray, np.ndarray]:
    """Soft-NMS: re-pick the best *current* score after every decay; drop scores <= threshold.
    The ``kind`` overlap decays the scores (negative GIoU/DIoU/CIoU decay nothing)."""
    current = scores.astype(np.float64, copy=True)
    remaining = np.lexsort((np.arange(scores.size), groups))  # group, then input order for ties
    remaining = remaining[current[remaining] > _at(score_threshold, remaining)]
    picked, picked_scores = [], []
    while remaining.size:
        heads, segment = _segments(groups[remaining])
        values = current[remaining]
        best = np.maximum.reduceat(values, np.flatnonzero(heads))
        candidates = np.flatnonzero(values == best[segment])
        first = np.empty(candidates.size, dtype=bool)
        first[0] = True
        np.not_equal(segment[candidates][1:], segment[candidates][:-1], out=first[1:])
        chosen_positions = candidates[first]  # one per group: its best, earliest input on ties
        chosen = remaining[chosen_positions]
        picked.append(chosen)
        picked_scores.append(current[chosen])
        iou = boxes.criterion(kind, remaining, chosen[segment])
        iou = np.where(iou > 0, iou, 0.0)  # NaN (two empty boxes) and negative overlaps decay nothing
        if function == "gaussian":
            decay = np.exp(-(iou * iou) / sigma)
        else:
            decay = np.where(iou > _at(threshold, remaining), 1.0 - iou, 1.0)
        values = values * decay
        current[remaining] = values
        alive = values > _at(score_threshold, remaining)
        alive[chosen_positions] = False
        remaining = remaining[alive]
    if not picked:
        return np.empty(0, dtype=np.int64), np.empty(0)
    return np.concatenate(picked), np.concatenate(picked_scores)


def nms_groups(
    xyxy: np.ndarray,
    scores: np.ndarray,
    groups: np.ndarray,
    *,
    method: str = "hard",
    iou_threshold: float = 0.5,
    soft_fn: str = "gaussian",
    sigma: float = 0.5,
    score_threshold: float | None = None,
    and_threshold: float = 0.5,
    criterion: IouKind = "iou",
    iou_thresholds: np.ndarray | None = None,
    score_thresholds: np.ndarray | None = None,
) -> NmsResult:
    """NMS within each group of ``groups (ndarray[N], int)`` over ``xyxy (ndarray[N, 4])``;
    ``criterion`` is the overlap compared with ``iou_threshold`` (``diou`` for method diou).
    ``iou_thresholds`` and ``score_thresholds`` (ndarray[N], optional): per box, in place of
    the single values (per-class settings; NaN: the single value applies to that box).

    Returns:
        NmsResult, unordered.

    Raises:
        BadInputError: unknown method or soft function, sigma <= 0, IoU threshold outside [0, 1].
    """
    method, kind = method_and_criterion(method, criterion)
    check_parameters(iou_threshold)
    if soft_fn not in SOFT_FUNCTIONS:
        raise BadInputError(f"unknown soft function `soft_fn` {soft_fn!r}; choose one of: {', '.join(SOFT_FUNCTIONS)}")
    if method == "soft" and not sigma > 0:
        raise BadInputError(f"`sigma` must be > 0, not {sigma}")
    scores = np.asarray(scores, dtype=np.float64)
    groups = np.asarray(groups, dtype=np.int64)
    xyxy = np.asarray(xyxy, dtype=np.float64).reshape(-1, 4)
    threshold: Threshold | None
    if method == "soft":
        threshold = float(DEFAULT_SOFT_SCORE_THRESHOLD if score_threshold is None else score_threshold)
    else:
        threshold = None if score_threshold is None else float(score_threshold)
    if score_thresholds is not None:  # per box; NaN: the single value (or none) applies
        threshold = per_box(-np.inf if threshold is None else threshold, score_thresholds)
    overlap_limit = overlap_limits(iou_threshold, iou_thresholds)
    if threshold is not None and method != "soft":
        candidates = np.flatnonzero(scores > threshold)
        sub_xyxy, sub_scores, sub_groups = xyxy[candidates], scores[candidates], groups[candidates]
    else:  # every box takes part: no copies
        candidates = np.arange(scores.size)
        sub_xyxy, sub_scores, sub_groups = xyxy, scores, groups
    sub_limit = _at(overlap_limit, candidates)
    sub_cut = None if threshold is None else _at(threshold, candidates)
    if candidates.size == 0:
        return NmsResult(np.empty(0, dtype=np.int64), np.empty(0), np.empty((0, 4)))

    def run(part: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        part_xyxy, part_scores, part_groups = (
            (sub_xyxy, sub_scores, sub_groups) if part is None else (sub_xyxy[part], sub_scores[part], sub_groups[part])
        )
        boxes = _Boxes(part_xyxy)
        limit = sub_limit if part is None else _at(sub_limit, part)
        if method == "soft":
            assert sub_cut is not None  # soft always has its cut-off
            cut = sub_cut if part is None else _at(sub_cut, part)
            local, final_scores = _soft(boxes, part_scores, part_groups, soft_fn, limit, sigma, cut, kind)
            final_boxes = part_xyxy[local]
        else:
            local, merged = _greedy(boxes, part_scores, part_groups, method, limit, and_threshold, kind)
            final_scores = part_scores[local]
            final_boxes = merged if merged is not None else part_xyxy[local]
        return (local if part is None else part[local]), final_scores, final_boxes

    # Boxes interact only through a positive overlap (every criterion is <= 0 for disjoint
    # boxes, and the rule is "> threshold >= 0"): parts of a group that cannot overlap run apart.
    sub_groups = split_large_groups(sub_xyxy, sub_groups)
    parts = split_groups(sub_groups)
    if len(parts) == 1:
        local, final_scores, final_boxes = run(None)
    else:  # groups never interact, and numpy releases the GIL: one thread per part
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(len(parts)) as pool:
            results = list(pool.map(run, parts))
        local = np.concatenate([r[0] for r in results])
        final_scores = np.concatenate([r[1] for r in results])
        final_boxes = np.concatenate([r[2] for r in results])
    # Left in the engine's order; limit_per_image (or the caller) sorts once for output.
    return NmsResult(keep=candidates[local], scores=final_scores, boxes=final_boxes)


PARALLEL_MIN_BOXES = 100_000
SPLIT_MIN_GROUP = 1_000  # a group this large is split into parts that cannot overlap


def overlap_components(xyxy: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Finer group codes: boxes of a group that cannot overlap - separated along x, then
    along y inside each part - get different codes. Every method whose boxes interact only
    through a positive overlap gives the same result on the finer groups; and where one image
    holds thousands of boxes (sliced inference of a large scene), the engine's steps go from
    one per kept box of the image to one per kept box of the largest part.

    Exact: coordinates become integer ranks before any arithmetic, and boxes that merely touch
    stay together."""
    codes = np.unique(groups, return_inverse=True)[1].reshape(-1).astype(np.int64)
    for axis in (0, 1):
        ranks = np.unique(np.concatenate((xyxy[:, axis], xyxy[:, axis + 2])), return_inverse=True)[1].reshape(-1)
        low, high = ranks[: codes.size], ranks[codes.size :]
        order = np.lexsort((low, codes))
        sorted_codes = codes[order]
        heads, _ = _segments(sorted_codes)
        # a running maximum of the far edge, restarted in each group by an offset larger than any rank
        span = int(ranks.max(initial=0)) + 1
        reach = np.maximum.accumulate(high[order] + sorted_codes * span) - sorted_codes * span
        starts = heads.copy()
        starts[1:] |= low[order][1:] > reach[:-1]
        fresh = np.empty(codes.size, dtype=np.int64)
        fresh[order] = np.cumsum(starts) - 1
        codes = fresh
    return codes


def split_large_groups(xyxy: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """:func:`overlap_components` when some group reaches SPLIT_MIN_GROUP boxes (else the
    groups as they are: the split costs a few sorts)."""
    if groups.size < SPLIT_MIN_GROUP:
        return groups
    low, high = int(groups.min()), int(groups.max())
    sizes = (
        np.bincount(groups - low) if high - low < 4 * groups.size else np.unique(groups, return_counts=True)[1]
    )  # the largest group's size, by counting where the codes are dense (image x class codes are)
    if sizes.max() < SPLIT_MIN_GROUP:
        return groups
    return overlap_components(xyxy, groups)


def split_groups(groups: np.ndarray) -> list[np.ndarray]:
    """Positions split into up to one part per CPU by whole groups, each with about as many
    boxes; a single part (no threads) for small inputs or one CPU."""
    import os

    workers = min(os.cpu_count() or 1, 8)
    if groups.size < PARALLEL_MIN_BOXES or workers < 2:
        return [np.arange(groups.size)]
    order = np.argsort(groups, kind="stable")
    sorted_groups = groups[order]
    cuts = [
        int(np.searchsorted(sorted_groups, sorted_groups[groups.size * i // workers], side="left"))
        for i in range(1, workers)
    ]
    bounds = sorted({0, *cuts, groups.size})
    return [np.sort(order[a:b]) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def map_parts(groups: np.ndarray, run: Callable[[np.ndarray], T]) -> list[T]:
    """``run(part)`` for each part of :func:`split_groups`: groups never interact and numpy
    releases the GIL, so each part gets a thread; a small input is one plain call."""
    parts = split_groups(groups)
    if len(parts) == 1:
        return [run(parts[0])]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(parts)) as pool:
        return list(pool.map(run, parts))


def limit_per_image(images: np.ndarray, keep: np.ndarray, scores: np.ndarray, max_det: int | None) -> np.ndarray:
    """Positions (into ``keep``) of at most ``max_det`` highest final scores per image, ties by
    input order; returned sorted by image, then score descending."""
    order = np.lexsort((keep, -scores, images[keep]))
    if max_det is None:
        return order
    image_of = images[keep][order]
    heads, _ = _segments(image_of) if order.size else (np.empty(0, bool), np.empty(0, np.int64))
    starts = np.flatnonzero(heads)
    rank = np.arange(order.size) - np.repeat(starts, np.diff(np.append(starts, order.size)))
    return order[rank < max_det]


@overload
def nms(
    boxes: np.ndarray,
    scores: np.ndarray,
    labels: np.ndarray | Sequence[Any] | None = None,
    *,
    method: NmsMethod = "hard",
    iou_threshold: float = 0.5,
    score_threshold: float | None = None,
    soft_fn: SoftFunction = "gaussian",
    sigma: float = 0.5,
    max_det: int | None = None,
    agnostic: bool = False,
    box_format: BoxFormat = "xyxy",
    images: np.ndarray | Sequence[Any] | None = None,
    and_threshold: float = 0.5,
    criterion: IouKind = "iou",
) -> tuple[np.ndarray, np.ndarray]: ...


@overload
def nms(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    method: NmsMethod = "hard",
    iou_threshold: float = 0.5,
    score_threshold: float | None = None,
    soft_fn: SoftFunction = "gaussian",
    sigma: float = 0.5,
    max_det: int | None = None,
    agnostic: bool = False,
    box_format: BoxFormat = "xyxy",
    images: torch.Tensor | None = None,
    and_threshold: float = 0.5,
    criterion: IouKind = "iou",
) -> tuple[torch.Tensor, torch.Tensor]: ...


def nms(
    boxes: Any,
    scores: Any,
    labels: Any = None,
    *,
    method: NmsMethod = "hard",
    iou_threshold: float = 0.5,
    score_threshold: float | None = None,
    soft_fn: SoftFunction = "gaussian",
    sigma: float = 0.5,
    max_det: int | None = None,
    agnostic: bool = False,
    box_format: BoxFormat = "xyxy",
    images: Any = None,
    and_threshold: float = 0.5,
    criterion: IouKind = "iou",
) -> tuple[Any, Any]:
    """NMS on numpy arrays or torch tensors (CPU or CUDA).

    Args:
        boxes (ndarray|Tensor[N, 4]): in ``box_format`` (default xyxy), pixels.
        scores (ndarray|Tensor[N]).
        labels (ndarray|Tensor[N], optional): classes; boxes of different classes never
            suppress each other unless ``agnostic``.
        images (ndarray|Tensor[N], optional): image of each box, for a batch of images.
        max_det: at most this many detections per image, highest final scores.
        criterion: the overlap compared with ``iou_threshold`` (and decaying soft scores):
            ``iou``, ``giou``, ``diou`` or ``ciou`` (see :func:`ptools.core.boxes.overlap`).

    Returns:
        ``(keep, scores)``: indices of kept boxes (int64) and their final scores (decayed for
        soft), by image then score descending, as the input's array type and device. For
        hard NMS on a CUDA tensor, torchvision's kernel runs on the GPU.

    Raises:
        BadInputError: an unknown method, soft function or box format; ``iou_threshold``
            outside [0, 1]; ``max_det`` below 1; ``sigma`` <= 0; boxes not [N, 4], scores
            (labels, images) not [N].
    """
    check_parameters(iou_threshold, max_det)
    _check_shapes(boxes, scores, labels, images)
    is_torch = type(boxes).__module__.startswith("torch")
    if is_torch:
        import torch

        device = boxes.device
        if (
            device.type == "cuda"
            and method_and_criterion(method, criterion) == ("hard", "iou")
            and box_format == "xyxy"
        ):
            return _torchvision_hard(boxes, scores, labels, images, iou_threshold, score_threshold, max_det, agnostic)
        to_numpy = lambda t: None if t is None else t.detach().cpu().numpy()  # noqa: E731
        boxes, scores, labels, images = map(to_numpy, (boxes, scores, labels, images))
    boxes = to_xyxy(np.asarray(boxes, dtype=np.float64).reshape(-1, 4), box_format)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    count = scores.size
    if boxes.shape[0] != count:
        raise BadInputError(f"{boxes.shape[0]} boxes but {count} scores")
    image_codes = _codes(images, count)
    label_codes = np.zeros(count, dtype=np.int64) if labels is None or agnostic else _codes(labels, count)
    groups = image_codes * (int(label_codes.max(initial=0)) + 1) + label_codes
    result = nms_groups(
        boxes,
        scores,
        groups,
        method=method,
        iou_threshold=iou_threshold,
        soft_fn=soft_fn,
        sigma=sigma,
        score_threshold=score_threshold,
        and_threshold=and_threshold,
        criterion=criterion,
    )
    positions = limit_per_image(image_codes, result.keep, result.scores, max_det)
    keep, final = result.keep[positions], result.scores[positions]
    if is_torch:
        return torch.as_tensor(keep, device=device), torch.as_tensor(final, device=device)
    return keep, final


def _check_shapes(boxes: Any, scores: Any, labels: Any, images: Any) -> None:
    """boxes [N, 4], scores [N], labels and images [N] when given, as torchvision's ops ask:
    a (2, 6) array is not three boxes, nor a flat array of 8 numbers two."""
    box_shape, score_shape = tuple(np.shape(boxes)), tuple(np.shape(scores))
    if len(box_shape) != 2 or box_shape[1] != 4:
        raise BadInputError(f"boxes must be [N, 4], not {list(box_shape)}")
    if score_shape != box_shape[:1]:
        raise BadInputError(f"scores must be [N] for boxes {list(box_shape)}, not {list(score_shape)}")
    for name, given in (("labels", labels), ("images", images)):
        if given is not None and tuple(np.shape(given)) != box_shape[:1]:
            raise BadInputError(f"{name} must be [N] for boxes {list(box_shape)}, not {list(np.shape(given))}")


def _codes(values: Any, count: int) -> np.ndarray:
    if values is None:
        return np.zeros(count, dtype=np.int64)
    values = np.asarray(values).reshape(-1)
    if values.size != count:
        raise BadInputError(f"{values.size} labels/images for {count} boxes")
    return np.unique(values, return_inverse=True)[1].reshape(-1).astype(np.int64)


def _torchvision_hard(
    boxes: Any,
    scores: Any,
    labels: Any,
    images: Any,
    iou_threshold: float,
    score_threshold: float | None,
    max_det: int | None,
    agnostic: bool,
) -> tuple[Any, Any]:
    """Hard NMS with torchvision's kernel on the tensors' device, same semantics."""
    import torch
    from torchvision.ops import batched_nms

    if not torch.cuda.is_available():
        raise RequirementNotMetError("CUDA is not available to torch")
    count = scores.numel()
    image_codes = (
        torch.zeros(count, dtype=torch.int64, device=boxes.device)
        if images is None
        else torch.unique(images, return_inverse=True)[1]
    )
    label_codes = (
        torch.zeros_like(image_codes) if labels is None or agnostic else torch.unique(labels, return_inverse=True)[1]
    )
    groups = image_codes * (int(label_codes.max()) + 1 if count else 1) + label_codes
    candidates = torch.arange(count, device=boxes.device)
    if score_threshold is not None:
        candidates = candidates[scores > score_threshold]
    keep = candidates[
        batched_nms(boxes[candidates].double(), scores[candidates].double(), groups[candidates], iou_threshold)
    ]
    positions = limit_per_image(
        image_codes.cpu().numpy(), keep.cpu().numpy(), scores[keep].double().cpu().numpy(), max_det
    )
    keep = keep[torch.as_tensor(positions, device=boxes.device)]
    return keep, scores[keep]
