"""Box fusion across models: Weighted Boxes Fusion (WBF) and non-maximum weighted (NMW).

The semantics are ensemble-boxes' ``weighted_boxes_fusion`` and ``non_maximum_weighted``,
step for step. The boxes WBF compares with are accumulated in float32 exactly as
ensemble-boxes does, so the clusters are the same; what is reported (fused coordinates and
scores) is computed in float64, so a score of 0.9 stays 0.9 where ensemble-boxes gives
0.8999999762 (differences below 1e-7 relative). ptools takes pixels and never clips, where
ensemble-boxes wants [0, 1] and clips to it.

Per group (image × class), boxes are visited by weighted score descending. WBF compares each
with the clusters' *current fused* boxes and joins the best one when IoU > threshold (else it
starts a cluster); the fused box is the score-weighted mean of the members. NMW compares with
each cluster's first box, and weights members by score × IoU with it. Like ptools' NMS, the
groups run in lockstep: step j visits the j-th box of every group at once, one vectorised
numpy pass per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ptools.core.boxes import overlap
from ptools.core.choices import ConfType, values
from ptools.core.nms import map_parts
from ptools.errors import BadInputError

CONF_TYPES = values(ConfType)
FUSION_METHODS = ("wbf", "nmw")
MAX_MODELS = 62  # models present in a cluster are kept as bits of an int64


@dataclass
class FusionResult:
    """One row per cluster: ``head`` (ndarray[K]) the input row of its first (best) box,
    ``boxes`` (ndarray[K, 4], xyxy) and ``scores`` (ndarray[K]) fused."""

    head: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray


def _visit_order(groups: np.ndarray, weighted: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``rows`` by group, then weighted score descending as ensemble-boxes orders them:
    ``argsort()[::-1]`` of each group's scores in input order. Without ties that is plain
    descending order; groups with ties are sorted by numpy exactly as ensemble-boxes sorts."""
    order = np.lexsort((-rows, -weighted[rows], groups[rows]))
    ordered = rows[order]
    same_group = groups[ordered][1:] == groups[ordered][:-1]
    tied = same_group & (weighted[ordered][1:] == weighted[ordered][:-1])
    if tied.any():
        bounds = np.flatnonzero(np.concatenate(([True], ~same_group, [True])))
        for position in np.unique(np.searchsorted(bounds, np.flatnonzero(tied), side="right") - 1):
            start, end = bounds[position], bounds[position + 1]
            members = np.sort(ordered[start:end])  # the group in input order
            ordered[start:end] = members[np.argsort(weighted[members])[::-1]]
    return ordered


def _pair_iou(a: tuple[np.ndarray, ...], b: tuple[np.ndarray, ...], zero_when_disjoint: bool) -> np.ndarray:
    """IoU of ``a`` (cluster boxes) and ``b`` (the visited boxes): ensemble-boxes' formula, which
    is :func:`ptools.core.boxes.overlap`'s; NMW's counts disjoint boxes as 0 outright."""
    iou = overlap(a, b, "iou")
    return np.where(iou > 0, iou, 0.0) if zero_when_disjoint else iou


def fuse_groups(
    xyxy: np.ndarray,
    scores: np.ndarray,
    groups: np.ndarray,
    models: np.ndarray,
    *,
    method: str = "wbf",
    model_weights: np.ndarray | None = None,
    iou_threshold: float = 0.55,
    skip_box_threshold: float = 0.0,
    conf_type: str = "avg",
    iou_thresholds: np.ndarray | None = None,
    model_count: int | None = None,
) -> FusionResult:
    """Fuse the boxes of several models within each group (image × class).

    Args:
        xyxy (ndarray[N, 4]), scores (ndarray[N]), groups (ndarray[N], int): the boxes.
        models (ndarray[N], int): which model (input) each box comes from, 0 to M-1.
        model_weights (ndarray[M]): each model's weight (default 1 each).
        iou_threshold: a box joins a cluster when IoU > this.
        skip_box_threshold: boxes scoring below this are left out.
        conf_type (WBF): ``avg``, ``max``, ``box_and_model_avg``, ``absent_model_aware_avg``.
        iou_thresholds (ndarray[N], optional): per box (per-class settings), in place of
            ``iou_threshold``; NaN where the single value applies.
        model_count: how many models there are (a model without boxes still counts, as in
            ensemble-boxes): ``len(model_weights)`` when weights are given, else the highest
            model index + 1.

    Raises:
        BadInputError: an unknown method or conf type, weights not matching the models.
    """
    if method not in FUSION_METHODS:
        raise BadInputError(f"unknown fusion method {method!r}; choose one of: {', '.join(FUSION_METHODS)}")
    if conf_type not in CONF_TYPES:
        raise BadInputError(f"unknown `conf_type` {conf_type!r}; choose one of: {', '.join(CONF_TYPES)}")
    if not 0 <= iou_threshold <= 1:
        raise BadInputError(f"`iou_threshold` must be between 0 and 1, not {iou_threshold}")
    xyxy = np.asarray(xyxy, dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float64)
    groups = np.asarray(groups, dtype=np.int64)
    models = np.asarray(models, dtype=np.int64)
    count = int(models.max(initial=-1)) + 1
    if model_count is not None:
        if model_count < max(count, 1):
            raise BadInputError(f"`model_count` {model_count} is below the {count} models the boxes come from")
        count = model_count
    weights = np.ones(max(count, 1)) if model_weights is None else np.asarray(model_weights, dtype=np.float64)
    if model_count is not None and model_weights is not None and weights.size != model_count:
        raise BadInputError(f"`model_weights` has {weights.size} weights for {model_count} models")
    if weights.size < count or (weights <= 0).any() or not np.isfinite(weights).all():
        raise BadInputError(f"`model_weights` needs a positive weight for each of the {count} inputs")
    if weights.size > MAX_MODELS:
        raise BadInputError(f"at most {MAX_MODELS} models can be fused at once, not {weights.size}")
    if method == "nmw":
        weights = weights / weights.max()
    limits = np.full(scores.size, float(iou_threshold))
    if iou_thresholds is not None:  # NaN: the single value applies to that box
        given = np.asarray(iou_thresholds, dtype=np.float64)
        limits = np.where(np.isnan(given), limits, given)
    if limits.shape != scores.shape or not ((limits >= 0) & (limits <= 1)).all():
        raise BadInputError("per-box IoU thresholds must be one per box, between 0 and 1")

    def run(part: np.ndarray) -> FusionResult:
        result = _fuse(
            xyxy[part], scores[part], groups[part], models[part], weights, method, limits[part],
            skip_box_threshold, conf_type,
        )  # fmt: skip
        return FusionResult(part[result.head], result.boxes, result.scores)

    results = map_parts(groups, run)
    return FusionResult(
        np.concatenate([r.head for r in results]),
        np.concatenate([r.boxes for r in results]),
        np.concatenate([r.scores for r in results]),
    )


def _fuse(
    xyxy: np.ndarray,
    scores: np.ndarray,
    groups: np.ndarray,
    models: np.ndarray,
    weights: np.ndarray,
    method: str,
    limits: np.ndarray,
    skip_box_threshold: float,
    conf_type: str,
) -> FusionResult:
    """:func:`fuse_groups` on checked arrays (``weights`` already normalised for NMW)."""
    weight_of = weights[models]
    weighted = scores * weight_of
    area = (xyxy[:, 2] - xyxy[:, 0]) * (xyxy[:, 3] - xyxy[:, 1])
    rows = np.flatnonzero(~(scores < skip_box_threshold) & (area != 0.0))  # ensemble-boxes' prefilter
    empty = FusionResult(np.empty(0, dtype=np.int64), np.empty((0, 4)), np.empty(0))
    if rows.size == 0:
        return empty
    ordered = _visit_order(groups, weighted, rows)
    group_of = groups[ordered]
    heads = np.flatnonzero(np.concatenate(([True], group_of[1:] != group_of[:-1])))
    sizes = np.diff(np.append(heads, ordered.size))
    by_size = np.argsort(-sizes, kind="stable")  # groups still active at step j: a prefix of this
    descending = -sizes[by_size]
    clusters = np.zeros(heads.size, dtype=np.int64)  # clusters per group so far

    # Per cluster slot (a group's clusters live in its own rows' slots, at heads[g] + k).
    total = ordered.size
    fused = np.zeros((4, total))  # the box a visited box is compared with (WBF: fused; NMW: first)
    accumulated = np.zeros((4, total), dtype=np.float32)  # WBF: ensemble-boxes' sums, for matching
    exact = np.zeros((4, total))  # the same sums in float64, for the reported boxes
    confidence = np.zeros(total)
    best_confidence = np.zeros(total)
    members = np.zeros(total, dtype=np.int64)
    weight_sum = np.zeros(total)
    present = np.zeros(total, dtype=np.int64)  # bit m: a box of model m is in the cluster
    head_row = np.zeros(total, dtype=np.int64)
    coordinates = tuple(xyxy[:, i] for i in range(4))

    for step in range(int(sizes.max())):
        active = by_size[: int(np.searchsorted(descending, -step, side="left"))]  # groups with > step boxes
        row = ordered[heads[active] + step]
        box = tuple(c[row] for c in coordinates)
        joined = np.full(active.size, -1, dtype=np.int64)
        with_clusters = np.flatnonzero(clusters[active] > 0)
        if with_clusters.size:
            counts = clusters[active[with_clusters]]
            owner = np.repeat(np.arange(with_clusters.size), counts)
            starts = np.cumsum(counts) - counts
            slots = heads[active[with_clusters]][owner] + (np.arange(owner.size) - starts[owner])
            iou = _pair_iou(
                tuple(fused[i, slots] for i in range(4)),
                tuple(b[with_clusters][owner] for b in box),
                zero_when_disjoint=method == "nmw",
            )
            best = np.maximum.reduceat(iou, starts)
            first = np.flatnonzero(iou == best[owner])
            first = first[np.concatenate(([True], owner[first][1:] != owner[first][:-1]))]  # first max
            matched = best > limits[row[with_clusters]]
            joined[with_clusters[matched]] = slots[first[matched]]
        join = joined >= 0
        new = ~join
        # A new cluster in the next free slot of its group.
        new_slots = heads[active[new]] + clusters[active[new]]
        clusters[active[new]] += 1
        new_rows = row[new]
        b1 = weighted[new_rows]
        for i in range(4):
            fused[i, new_slots] = coordinates[i][new_rows]
            exact[i, new_slots] = b1 * coordinates[i][new_rows]
            if method == "wbf":
                accumulated[i, new_slots] = exact[i, new_slots].astype(np.float32)
        confidence[new_slots] = b1
        best_confidence[new_slots] = b1
        members[new_slots] = 1
        weight_sum[new_slots] = weight_of[new_rows]
        present[new_slots] = np.left_shift(1, models[new_rows])
        head_row[new_slots] = new_rows
        # Joining boxes (at most one per group per step, so slots do not repeat).
        slots = joined[join]
        joining = row[join]
        b1 = weighted[joining]
        if method == "nmw":  # weighted by score x IoU with the cluster's first box
            b1 = b1 * _pair_iou(
                tuple(fused[i, slots] for i in range(4)),
                tuple(c[joining] for c in coordinates),
                zero_when_disjoint=True,
            )
        for i in range(4):
            exact[i, slots] += b1 * coordinates[i][joining]
        confidence[slots] += b1
        best_confidence[slots] = np.maximum(best_confidence[slots], b1)
        members[slots] += 1
        weight_sum[slots] += weight_of[joining]
        present[slots] |= np.left_shift(1, models[joining])
        if method == "wbf":  # ensemble-boxes' float32 sums; the cluster is now compared with their mean
            for i in range(4):
                term = b1 * coordinates[i][joining]
                accumulated[i, slots] = (accumulated[i, slots].astype(np.float64) + term).astype(np.float32)
                fused[i, slots] = (accumulated[i, slots].astype(np.float64) / confidence[slots]).astype(np.float32)

    owner = np.repeat(np.arange(heads.size), clusters)
    used = heads[owner] + (np.arange(owner.size) - np.repeat(np.cumsum(clusters) - clusters, clusters))
    single = members[used] == 1
    originals = np.stack([c[head_row[used]] for c in coordinates])
    boxes = np.where(single, originals, exact[:, used] / confidence[used]).T
    if method == "nmw":
        return FusionResult(head_row[used], boxes, weighted[head_row[used]])
    count_of = members[used].astype(np.float64)
    if conf_type == "max":
        final = best_confidence[used] / weights.max()
    else:
        score = confidence[used] / count_of
        weight_field = weight_sum[used]
        bits = present[used]
        if conf_type == "avg":
            final = score * np.minimum(weights.size, count_of) / weights.sum()
        elif conf_type == "box_and_model_avg":
            distinct = np.zeros(used.size)
            for model in range(weights.size):  # ascending model order, as np.unique gives them
                distinct = distinct + np.where(bits >> model & 1, weights[model], 0.0)
            final = score * count_of / weight_field * distinct / weights.sum()
        else:  # absent_model_aware_avg
            absent = np.zeros(used.size)
            for model in range(weights.size):
                absent = absent + np.where(bits >> model & 1, 0.0, weights[model])
            final = score * count_of / (weight_field + absent)
    return FusionResult(head_row[used], boxes, final)
