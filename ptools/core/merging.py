"""Non-maximum merging (NMM) as SAHI does it: boxes that overlap a better box are merged into
it (the smallest box enclosing both) instead of being dropped - for predictions of sliced
inference, where one object cut by a slice border comes back as two partial boxes.

The semantics are those of ``sahi.postprocess.combine`` (``GreedyNMMPostprocess``,
``NMMPostprocess``), step for step:

- **order**: score descending; equal scores by x1, y1, x2, y2 ascending (SAHI's lexsort), then
  input order.
- **match**: the metric (``iou``, or ``ios``: intersection over the smaller box's area) is
  **>= threshold** - SAHI's rule, where ptools' NMS suppresses on ``>``.
- ``greedy-nmm``: the best remaining box claims every remaining box that matches it; they
  leave the race (hard NMS's loop, claiming instead of suppressing).
- ``nmm`` (transitive): every box in turn, claimed or not, claims each unclaimed box that
  matches it and that it dominates (a lower score, or the same score and the same
  coordinates); what a claimed box claims joins its keeper's cluster.
- **merging**: a cluster's members, in the order they were claimed, are merged one at a time
  into the keeper's box; a member whose metric with the box merged so far is below the
  threshold is dropped (SAHI re-checks each pair before merging it).
- the merged box keeps its keeper's score, the highest of its cluster.

Claims are computed in float64, where SAHI casts boxes to float32 first; the re-check is
float64 in both. A pair whose metric is within float32 rounding of the threshold may go the
other way. Like ptools' NMS, groups (image × class) run in lockstep: one vectorised numpy
pass per step, not a Python loop per box.
"""

from __future__ import annotations

import numpy as np

from ptools.core.boxes import overlap
from ptools.core.nms import (
    NmsResult,
    Threshold,
    _at,
    _Boxes,
    _segments,
    check_parameters,
    map_parts,
    overlap_limits,
    per_box,
    split_large_groups,
)
from ptools.errors import BadInputError

MERGING_METHODS = ("nmm", "greedy-nmm")
MATCH_METRICS = ("iou", "ios")


def merge_groups(
    xyxy: np.ndarray,
    scores: np.ndarray,
    groups: np.ndarray,
    *,
    method: str = "greedy-nmm",
    metric: str = "iou",
    threshold: float = 0.5,
    score_threshold: float | None = None,
    thresholds: np.ndarray | None = None,
    score_thresholds: np.ndarray | None = None,
) -> NmsResult:
    """Merge overlapping boxes within each group of ``groups (ndarray[N], int)``.

    Args:
        xyxy (ndarray[N, 4]), scores (ndarray[N]): the boxes, xyxy.
        method: ``greedy-nmm`` or ``nmm`` (transitive), see the module's docstring.
        metric: ``iou`` or ``ios`` (intersection over the smaller area).
        threshold: boxes match when the metric >= this.
        score_threshold: boxes scoring <= this take no part (none by default).
        thresholds, score_thresholds (ndarray[N], optional): per box (per-class settings), in
            place of the single values; NaN where the single value applies.

    Returns:
        NmsResult: ``keep`` the keepers' indices, ``scores`` theirs, ``boxes`` merged (xyxy);
        unordered.

    Raises:
        BadInputError: an unknown method or metric, a threshold outside [0, 1].
    """
    if method not in MERGING_METHODS:
        raise BadInputError(f"unknown merging method {method!r}; choose one of: {', '.join(MERGING_METHODS)}")
    if metric not in MATCH_METRICS:
        raise BadInputError(f"merging matches boxes by {' or '.join(MATCH_METRICS)}, not {metric!r} (`metric`)")
    check_parameters(threshold)
    xyxy = np.asarray(xyxy, dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float64)
    limits = overlap_limits(threshold, thresholds)
    rows = np.flatnonzero(scores > per_box(-np.inf if score_threshold is None else score_threshold, score_thresholds))
    if rows.size == 0:
        return NmsResult(np.empty(0, dtype=np.int64), np.empty(0), np.empty((0, 4)))
    row_limits = _at(limits, rows)
    row_groups = np.asarray(groups, dtype=np.int64)[rows]
    # Boxes match only through a positive overlap when every threshold is above 0: parts of
    # a group that cannot overlap run apart (at 0 every pair matches).
    if np.all(np.asarray(row_limits) > 0):
        row_groups = split_large_groups(xyxy[rows], row_groups)

    def run(part: np.ndarray) -> NmsResult:
        subset = rows[part]
        result = _merge(xyxy[subset], scores[subset], row_groups[part], method, metric, _at(row_limits, part))
        return NmsResult(subset[result.keep], result.scores, result.boxes)

    results = map_parts(row_groups, run)
    return NmsResult(
        np.concatenate([r.keep for r in results]),
        np.concatenate([r.scores for r in results]),
        np.concatenate([r.boxes for r in results]),
    )


def _merge(
    xyxy: np.ndarray, scores: np.ndarray, groups: np.ndarray, method: str, metric: str, limits: Threshold
) -> NmsResult:
    boxes = _Boxes(xyxy)
    order = np.lexsort((np.arange(scores.size), boxes.y2, boxes.x2, boxes.y1, boxes.x1, -scores, groups))
    if method == "greedy-nmm":
        keepers, members, member_keepers = _greedy_claims(boxes, groups, order, metric, limits)
    else:
        keepers, members, member_keepers = _transitive_claims(boxes, scores, groups, order, metric, limits)
    merged = _merge_members(xyxy, keepers, members, member_keepers, metric, limits)
    return NmsResult(keepers, scores[keepers], merged)


def _matching(boxes: _Boxes, metric: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The metric of boxes ``a[i]`` and ``b[i]`` as SAHI's matrix holds it: 0, not NaN, where
    both are empty (two empty boxes never match, but every pair matches at threshold 0)."""
    value = boxes.criterion(metric, a, b)
    return np.where(value > 0, value, 0.0)


def _greedy_claims(
    boxes: _Boxes, groups: np.ndarray, order: np.ndarray, metric: str, limits: Threshold
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keepers, and the claimed boxes with their keepers, each keeper's claims in claim order."""
    remaining = order
    keepers, members, member_keepers = [], [], []
    while remaining.size:
        heads, segment = _segments(groups[remaining])
        head_index = remaining[heads]
        against = head_index[segment]
        claimed = _matching(boxes, metric, remaining, against) >= _at(limits, remaining)
        claimed &= ~heads
        keepers.append(head_index)
        members.append(remaining[claimed])
        member_keepers.append(against[claimed])
        claimed |= heads
        remaining = remaining[~claimed]
    return np.concatenate(keepers), np.concatenate(members), np.concatenate(member_keepers)


def _transitive_claims(
    boxes: _Boxes, scores: np.ndarray, groups: np.ndarray, order: np.ndarray, metric: str, limits: Threshold
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every box in order claims the unclaimed boxes it matches and dominates; a box nobody
    claimed before its turn keeps. Members come out by (claimer's turn, input index): the
    order SAHI appends them to their keeper's list."""
    size = scores.size
    heads, _ = _segments(groups[order])
    starts = np.flatnonzero(heads)
    lengths = np.diff(np.append(starts, size))
    rank = np.empty(size, dtype=np.int64)
    rank[order] = np.arange(size) - np.repeat(starts, lengths)
    group_number = np.empty(size, dtype=np.int64)
    group_number[order] = np.repeat(np.arange(starts.size), lengths)
    keeper_of = np.full(size, -1, dtype=np.int64)
    claimed_at = np.full(size, -1, dtype=np.int64)  # the claimer's turn
    pool = order  # unclaimed boxes whose turn has not come, by group then order
    for turn in range(int(lengths.max())):
        live = starts[lengths > turn]
        current = order[live + turn]  # each group's box whose turn it is
        fresh = keeper_of[current] < 0
        keeper_of[current[fresh]] = current[fresh]  # nobody claimed it: a keeper
        pool = pool[rank[pool] > turn]
        if not pool.size:
            break
        head_of_group = np.full(starts.size, -1, dtype=np.int64)
        head_of_group[group_number[current]] = current
        against = head_of_group[group_number[pool]]
        matched = _matching(boxes, metric, pool, against) >= _at(limits, pool)
        dominated = (scores[against] > scores[pool]) | (
            (boxes.x1[against] == boxes.x1[pool])
            & (boxes.y1[against] == boxes.y1[pool])
            & (boxes.x2[against] == boxes.x2[pool])
            & (boxes.y2[against] == boxes.y2[pool])
        )
        taken = matched & dominated
        keeper_of[pool[taken]] = keeper_of[against[taken]]
        claimed_at[pool[taken]] = turn
        pool = pool[~taken]
    members = np.flatnonzero(claimed_at >= 0)
    members = members[np.lexsort((members, claimed_at[members]))]
    keepers = order[keeper_of[order] == order]
    return keepers, members, keeper_of[members]


def _merge_members(
    xyxy: np.ndarray,
    keepers: np.ndarray,
    members: np.ndarray,
    member_keepers: np.ndarray,
    metric: str,
    limits: Threshold,
) -> np.ndarray:
    """Each keeper's box, grown member by member (claim order) to the enclosing box of those
    whose metric with the box merged so far still reaches the threshold. Lockstep: step k
    takes the k-th member of every cluster."""
    merged = xyxy[keepers].copy()
    if not members.size:
        return merged
    slot = np.empty(xyxy.shape[0], dtype=np.int64)
    slot[keepers] = np.arange(keepers.size)
    cluster = slot[member_keepers]
    # rank of each member within its cluster, keeping claim order
    by_cluster = np.argsort(cluster, kind="stable")
    sorted_clusters = cluster[by_cluster]
    firsts, _ = _segments(sorted_clusters)
    starts = np.flatnonzero(firsts)
    position = np.empty(members.size, dtype=np.int64)
    position[by_cluster] = np.arange(members.size) - np.repeat(starts, np.diff(np.append(starts, members.size)))
    by_step = np.argsort(position, kind="stable")
    bounds = np.searchsorted(position[by_step], np.arange(int(position.max()) + 2))
    for step in range(bounds.size - 1):
        chosen = by_step[bounds[step] : bounds[step + 1]]
        member, target = members[chosen], cluster[chosen]
        current = merged[target]
        # SAHI's re-check divides plainly: NaN for two empty boxes, which no threshold accepts
        value = overlap(tuple(current.T), tuple(xyxy[member].T), metric)
        accepted = value >= _at(limits, member)
        member, target, current = member[accepted], target[accepted], current[accepted]
        grown = np.concatenate(
            (np.minimum(current[:, :2], xyxy[member, :2]), np.maximum(current[:, 2:], xyxy[member, 2:])), axis=1
        )
        merged[target] = grown
    return merged
