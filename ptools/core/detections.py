"""Detection files: COCO results JSON (an array of records) or JSON Lines, validated, run
through NMS per image, and written back with every other field of each record preserved.

Records: ``{"image_id", "category_id", "bbox": [4 numbers], "score", ...}``; image and
category ids are integers or strings. Output order: images by id ascending, then score
descending (equal scores keep input order).
"""

from __future__ import annotations

import bisect
import itertools
import math
import operator
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ptools.core import nms as nms_core
from ptools.core.choices import (
    BoxFormat,
    ConfType,
    DetectionsFormat,
    IouKind,
    NmsDevice,
    NmsMethod,
    SoftFunction,
    values,
)
from ptools.core.fusion import FUSION_METHODS, fuse_groups
from ptools.core.limits import brief, brief_text
from ptools.core.memory import gc_paused
from ptools.core.merging import MATCH_METRICS, MERGING_METHODS, merge_groups
from ptools.errors import BadInputError

REQUIRED = ("image_id", "category_id", "bbox", "score")
FORMATS = values(DetectionsFormat)


def _json() -> Any:
    import orjson

    return orjson


def parse_detections(data: bytes, source: str = "input") -> tuple[list[Any], str]:
    """Parse a JSON array or JSON Lines of records.

    Returns:
        ``(records, format)`` with format ``json`` or ``jsonl``.

    Raises:
        BadInputError: empty, not JSON, or not an array / lines of objects.
    """
    orjson = _json()
    text = data.lstrip()
    if not text:
        raise BadInputError(f"{source} is empty; expected a JSON array of detections or JSON Lines")
    if text[:1] == b"[":
        try:
            with gc_paused():
                records = orjson.loads(data)
        except orjson.JSONDecodeError as failure:
            raise BadInputError(f"{source} is not valid JSON ({failure})") from None
        return records, "json"
    if text[:1] == b"{":
        try:
            lines = parse_lines(data.splitlines(), source)
        except BadInputError:
            if not _parses(data):  # else one object over several lines, not JSON Lines: said below
                raise
        else:
            if len(lines) == 1 and is_ground_truth(lines[0]):
                raise _ground_truth_given(source)
            return lines, "jsonl"
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError as failure:
        raise BadInputError(f"{source} is not valid JSON ({brief_text(str(failure))})") from None
    if is_ground_truth(value):
        raise _ground_truth_given(source)
    raise BadInputError(
        f"{source} holds a JSON {_JSON_TYPES.get(type(value), type(value).__name__)}, not an "
        "array of detection records or JSON Lines",
        'COCO results are a list: [{"image_id": …, "category_id": …, "bbox": […], "score": …}]',
    )


def is_ground_truth(value: Any) -> bool:
    """Whether a JSON value is a COCO ground-truth document (an object of images and annotations)."""
    return isinstance(value, dict) and "annotations" in value and "images" in value


def _ground_truth_given(source: str) -> BadInputError:
    return BadInputError(
        f"{source} is a COCO ground-truth file (images, annotations), not detections",
        "give it as `ground_truth`; the detections to filter are a list of records with image_id, bbox and score",
    )


_JSON_TYPES = {type(None): "null", dict: "object", str: "string", int: "number", float: "number", bool: "boolean"}


def parse_lines(lines: list[bytes], source: str = "input", first_number: int = 1) -> list[Any]:
    """The records of JSON Lines (blank lines skipped); ``first_number`` numbers the first
    line in messages (a chunk of a larger file).

    Raises:
        BadInputError: a line that is not JSON, naming it.
    """
    orjson = _json()
    with gc_paused():
        try:  # no blank line: one pass (a blank one fails to parse, and the loop below skips it)
            return [orjson.loads(line) for line in lines]
        except orjson.JSONDecodeError:
            pass
        try:
            return [orjson.loads(line) for line in lines if line.strip()]
        except orjson.JSONDecodeError:
            pass
        for number, line in enumerate(lines, start=first_number):  # name the culprit
            if line.strip():
                try:
                    orjson.loads(line)
                except orjson.JSONDecodeError as failure:
                    raise BadInputError(
                        f"{source} line {number} is not valid JSON ({brief_text(str(failure))})"
                    ) from None
    raise AssertionError("unreachable: a line failed to parse once")


def _parses(data: bytes) -> bool:
    try:
        _json().loads(data)
    except ValueError:
        return False
    return True


def _shown(value: Any) -> str:
    """A field's value for a message: bounded, and an integer past 64 bits said as such
    (the JSON parser reads those as floats)."""
    if isinstance(value, float) and value.is_integer() and abs(value) >= 2**63:
        return "an integer too large for 64 bits"
    return brief(value)


def dump_detections(records: list[Any], output_format: str) -> bytes:
    """Records as a JSON array or as JSON Lines."""
    orjson = _json()
    if output_format == "jsonl":
        return b"".join(orjson.dumps(record) + b"\n" for record in records)
    return orjson.dumps(records)


def _record_problem(index: int, record: Any, box_format: str) -> str | None:
    """Why record ``index`` is invalid, naming the field; None when it is fine."""
    if not isinstance(record, dict):
        return f"record {index} is a {type(record).__name__}, not an object"
    for name in REQUIRED:
        if name not in record:
            return f"record {index}: missing field {name!r}"
    for name in ("image_id", "category_id"):
        value = record[name]
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            return f"record {index}: field {name!r} must be an integer or a string, got {_shown(value)}"
    score = record["score"]
    if isinstance(score, bool) or not isinstance(score, (int, float)):
        return f"record {index}: field 'score' must be a number, got {_shown(score)}"
    if not math.isfinite(score):
        return f"record {index}: field 'score' is {score!r}, not a finite number"
    box = record["bbox"]
    if not (
        isinstance(box, list)
        and len(box) == 4
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)
    ):
        return f"record {index}: field 'bbox' must be a list of 4 numbers, got {_shown(box)}"
    if not all(math.isfinite(v) for v in box):
        return f"record {index}: field 'bbox' holds NaN or infinite values: {_shown(box)}"
    if box_format == "xyxy":
        if box[2] < box[0] or box[3] < box[1]:
            return f"record {index}: field 'bbox' has x2 < x1 or y2 < y1 (xyxy {box!r})"
    elif box[2] < 0 or box[3] < 0:
        return f"record {index}: field 'bbox' has a negative width or height ({box_format} {box!r})"
    return None


@dataclass
class Detections:
    """Validated detections as arrays; ``index`` maps rows back to input records."""

    records: list[Any]
    index: np.ndarray
    images: np.ndarray  # image code per row (codes follow ascending image id)
    categories: np.ndarray  # category code per row
    category_ids: list[Any]  # code -> category_id
    image_count: int
    boxes: np.ndarray  # (N, 4) as given (box_format)
    scores: np.ndarray
    skipped: int = 0


def _fast_arrays(records: list[Any]) -> tuple[Any, ...] | None:
    """All four fields as arrays in a few C-speed passes; None when anything looks off."""
    try:
        images = [r["image_id"] for r in records]
        categories = [r["category_id"] for r in records]
        box_lists = [r["bbox"] for r in records]
        score_list = [r["score"] for r in records]
        boxes = np.array(box_lists)
        scores = np.array(score_list)
    except (KeyError, TypeError, ValueError):
        return None
    # numpy turns true/false into 1/0 beside numbers: a boolean anywhere sends us to the slow
    # path, which names the record. One C-speed pass over the types of each field.
    if (
        bool in set(map(type, images))
        or bool in set(map(type, categories))
        or bool in set(map(type, score_list))
        or (boxes.ndim == 2 and bool in set(map(type, itertools.chain.from_iterable(box_lists))))
    ):
        return None
    if (
        boxes.dtype.kind not in "iuf"
        or boxes.ndim != 2
        or boxes.shape[1] != 4
        or scores.dtype.kind not in "iuf"
        or scores.ndim != 1
    ):
        return None
    return images, categories, boxes.astype(np.float64, copy=False), scores.astype(np.float64, copy=False)


def _id_codes(values: list[Any]) -> tuple[np.ndarray, list[Any]] | None:
    """Codes of integer ids, or of all-string ids; None for anything else (slow path)."""
    try:
        array = np.array(values)
    except (ValueError, TypeError):  # lists or mixed shapes among the ids: the slow path names them
        return None
    if array.dtype.kind in "iu" or (array.dtype.kind == "U" and all(type(v) is str for v in values)):
        uniques, codes = np.unique(array, return_inverse=True)
        return codes.reshape(-1).astype(np.int64), uniques.tolist()
    return None


def validate(
    records: Any,
    box_format: BoxFormat = "xywh",
    skip_invalid: bool = False,
    offset: int = 0,
    sources: Sequence[tuple[str, int]] | None = None,
) -> Detections:
    """Check every record (fast path: vectorised; slow path only to name the culprit).
    ``offset``: the number of the first record in messages (a batch of a larger file).
    ``sources``: (file name, record count) of each input the records were concatenated
    from, in order, so that a message names the file and its own record number.

    Raises:
        BadInputError: the input is not a list, or a record is invalid (record index and
            field named) and ``skip_invalid`` is off.
    """
    if not isinstance(records, list):
        raise BadInputError(f"expected an array of detection records, got a JSON {type(records).__name__}")
    if box_format not in nms_core.BOX_FORMATS:
        raise BadInputError(f"unknown box format {box_format!r}; choose one of: {', '.join(nms_core.BOX_FORMATS)}")
    index = np.arange(len(records))
    fast = _fast_arrays(records) if records else None
    image_codes: tuple[np.ndarray, list[Any]] | None = None
    category_codes: tuple[np.ndarray, list[Any]] | None = None
    if fast is not None:
        images, categories, boxes, scores = fast
        image_codes = _id_codes(images)
        category_codes = _id_codes(categories)
        bad = ~np.isfinite(boxes).all(axis=1) | ~np.isfinite(scores)
        if box_format == "xyxy":
            bad |= (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
        else:
            bad |= (boxes[:, 2] < 0) | (boxes[:, 3] < 0)
        if bad.any() or image_codes is None or category_codes is None:
            fast = None
    skipped = 0
    if fast is None:
        valid = []
        where = _Origins(sources)
        for position, record in enumerate(records):
            problem = _record_problem(position + offset, record, box_format)
            if problem is not None and sources:
                name, number = where.of(position)
                problem = f"{name}: {_record_problem(number, record, box_format)}"
            if problem is None:
                valid.append(position)
            elif not skip_invalid:
                raise BadInputError(problem, "fix the record, or pass `skip_invalid=True` to drop such records")
        skipped = len(records) - len(valid)
        index = np.array(valid, dtype=np.int64)
        kept = [records[i] for i in valid]
        images = [r["image_id"] for r in kept]
        categories = [r["category_id"] for r in kept]
        boxes = np.array([r["bbox"] for r in kept], dtype=np.float64).reshape(-1, 4)
        scores = np.array([r["score"] for r in kept], dtype=np.float64)
        image_codes = _mixed_codes(images)
        category_codes = _mixed_codes(categories)
    assert image_codes is not None and category_codes is not None  # set by one path or the other
    return Detections(
        records=records,
        index=index,
        images=image_codes[0],
        categories=category_codes[0],
        category_ids=category_codes[1],
        image_count=len(image_codes[1]),
        boxes=boxes,
        scores=scores,
        skipped=skipped,
    )


class _Origins:
    """Record position in concatenated inputs -> (input name, record number in that input)."""

    def __init__(self, sources: Sequence[tuple[str, int]] | None) -> None:
        self.names = [name for name, _ in sources or ()]
        self.starts = list(itertools.accumulate((count for _, count in sources or ()), initial=0))

    def of(self, position: int) -> tuple[str, int]:
        which = bisect.bisect_right(self.starts, position) - 1
        return self.names[which], position - self.starts[which]


def _mixed_codes(values: list[Any]) -> tuple[np.ndarray, list[Any]]:
    """Codes for ids that may mix integers and strings: integers first, then strings, sorted."""
    uniques = sorted(set(values), key=lambda v: (isinstance(v, str), v))
    lookup = {value: code for code, value in enumerate(uniques)}
    return np.array([lookup[v] for v in values], dtype=np.int64), uniques


@dataclass
class NmsFileReport:
    """What ``ptools nms`` did, for the summary."""

    method: str
    iou_threshold: float
    rule: str  # what was applied, e.g. "IoU > 0.5" or "gaussian decay s *= exp(-IoU^2 / 0.5)"
    images: int
    detections_in: int
    detections_out: int
    skipped: int
    per_class: dict[str, list[int]] = field(default_factory=dict)  # category_id -> [in, out]
    seconds: float = 0.0
    evaluation: dict[str, dict[str, float]] | None = None
    streamed: str | None = None  # how a large JSON Lines input went: "grouped", "partitioned in N parts"

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


_CRITERION_NAMES = {"iou": "IoU", "giou": "GIoU", "diou": "DIoU", "ciou": "CIoU", "ios": "IoS"}


def _rule(method: str, kind: str, iou: float, soft_fn: str, sigma: float, score_threshold: float | None) -> str:
    """The suppression rule a method applied, in words: what --iou does (or not) for it."""
    overlap = _CRITERION_NAMES[kind]
    if method in MERGING_METHODS:
        how = "greedily" if method == "greedy-nmm" else "transitively"
        return f"{overlap} >= {iou:g}, merged {how} into the best box"
    if method == "soft":
        cut = nms_core.DEFAULT_SOFT_SCORE_THRESHOLD if score_threshold is None else score_threshold
        decay = (
            f"gaussian decay s *= exp(-{overlap}^2 / {sigma:g})"
            if soft_fn == "gaussian"
            else f"linear decay s *= 1 - {overlap} where {overlap} > {iou:g}"
        )
        return f"{decay}, kept while s > {cut:g}"
    return f"{overlap} > {iou:g}"


def run_nms(
    detections: Detections,
    *,
    method: NmsMethod = "hard",
    iou_threshold: float = 0.5,
    score_threshold: float | None = None,
    soft_fn: SoftFunction = "gaussian",
    sigma: float = 0.5,
    max_det: int | None = None,
    agnostic: bool = False,
    box_format: BoxFormat = "xywh",
    device: NmsDevice = "cpu",
    keep_input: bool = True,
    criterion: IouKind = "iou",
    models: np.ndarray | None = None,
    model_count: int | None = None,
    model_weights: Sequence[float] | None = None,
    skip_box_threshold: float = 0.0,
    conf_type: ConfType = "avg",
    class_iou: Mapping[Any, float] | None = None,
    class_score_threshold: Mapping[Any, float] | None = None,
) -> tuple[list[Any], NmsFileReport]:
    """NMS per image (and class unless ``agnostic``) over validated detections.

    Args:
        keep_input: True (default): the input records are never changed; soft, merge, nmm
            and greedy-nmm return new dicts. False: the caller gives its records up (a command
            that parsed them from a file), and they update the kept ones in place - a million
            dict copies saved.

        class_iou, class_score_threshold: per category id (as the records spell it), in place
            of ``iou_threshold`` / ``score_threshold`` for that class; other classes keep
            the single values (see :func:`resolve_class_table` for names and text keys).
        models: for ``wbf`` and ``nmw``: the input (model) each record comes from, 0 to M-1;
            ``model_weights`` their weights, ``model_count`` how many inputs there are (an
            input without records still counts), ``skip_box_threshold`` and ``conf_type`` as in
            :func:`ptools.core.fusion.fuse_groups`.

    Returns:
        ``(output records, report)``: the kept records, by image then score descending, with
        the decayed ``score`` (soft) or merged ``bbox`` (merge, nmm, greedy-nmm; ``criterion``
        iou or ios is their match metric, see :mod:`ptools.core.merging`); for wbf and nmw one new
        record per cluster: its best box's record with the fused ``bbox`` and ``score``.
    """
    started = time.perf_counter()
    check_method_options(
        method, score_threshold, criterion, model_weights, skip_box_threshold, conf_type, agnostic,
        bool(class_iou), bool(class_score_threshold),
    )  # fmt: skip
    iou_per_box = _per_box(detections, class_iou)
    if method in FUSION_METHODS:
        output, report = _run_fusion(
            detections,
            method=method,
            iou_threshold=iou_threshold,
            max_det=max_det,
            agnostic=agnostic,
            box_format=box_format,
            models=models,
            model_count=model_count,
            model_weights=model_weights,
            skip_box_threshold=skip_box_threshold,
            conf_type=conf_type,
            started=started,
            keep_input=keep_input,
            iou_per_box=iou_per_box,
        )
        report.rule += _per_class_rule(class_iou, None)
        return output, report
    merging = method in MERGING_METHODS
    name = method if merging else nms_core.canonical_method(method)
    kind = criterion if merging else nms_core.method_and_criterion(name, criterion)[1]
    nms_core.check_parameters(iou_threshold, max_det)
    xyxy = nms_core.to_xyxy(detections.boxes, box_format)
    categories = np.zeros_like(detections.categories) if agnostic else detections.categories
    groups = detections.images * (len(detections.category_ids) or 1) + categories
    if device == "cuda":
        if merging:
            raise BadInputError(f"`device` cuda runs `method` hard only; {name} runs on the CPU (the default)")
        if kind != "iou":
            raise BadInputError(f"`device` cuda compares IoU only; `criterion` {kind} runs on the CPU (the default)")
        result = _cuda_hard(name, xyxy, detections.scores, groups, iou_threshold, score_threshold)
    elif device != "cpu":
        raise BadInputError(f"unknown `device` {device!r}; choose one of: cpu, cuda")
    elif merging:
        result = merge_groups(
            xyxy,
            detections.scores,
            groups,
            method=name,
            metric=criterion,
            threshold=iou_threshold,
            score_threshold=score_threshold,
            thresholds=iou_per_box,
            score_thresholds=_per_box(detections, class_score_threshold),
        )
    else:
        result = nms_core.nms_groups(
            xyxy,
            detections.scores,
            groups,
            method=name,
            iou_threshold=iou_threshold,
            soft_fn=soft_fn,
            sigma=sigma,
            score_threshold=score_threshold,
            criterion=criterion,
            iou_thresholds=iou_per_box,
            score_thresholds=_per_box(detections, class_score_threshold),
        )
    positions = nms_core.limit_per_image(detections.images, result.keep, result.scores, max_det)
    kept_rows = result.keep[positions]
    records = detections.records
    rows = detections.index[kept_rows].tolist()
    output = list(operator.itemgetter(*rows)(records)) if len(rows) > 1 else [records[i] for i in rows]
    # soft and the merging methods change a field of what they keep: new records, the
    # caller's stay as read.
    if name in ("soft", "merge", *MERGING_METHODS):
        field = "score" if name == "soft" else "bbox"
        changed = (
            result.scores[positions] if name == "soft" else nms_core.from_xyxy(result.boxes[positions], box_format)
        ).tolist()
        if keep_input:
            output = [{**record, field: value} for record, value in zip(output, changed)]
        else:
            for record, value in zip(output, changed):
                record[field] = value
    rule = _rule(name, kind, iou_threshold, soft_fn, sigma, score_threshold) + _per_class_rule(
        class_iou, class_score_threshold
    )
    return output, _report(detections, name, iou_threshold, rule, kept_rows, started)


def check_method_options(
    method: str,
    score_threshold: float | None = None,
    criterion: str = "iou",
    model_weights: Sequence[float] | None = None,
    skip_box_threshold: float = 0.0,
    conf_type: str = "avg",
    agnostic: bool = False,
    per_class_iou: bool = False,
    per_class_score: bool = False,
) -> None:
    """Refuse options that the method would ignore (cheap: a command checks before reading).
    ``per_class_*``: whether per-class tables are given.

    Raises:
        BadInputError: fusion options with an NMS method, NMS options with wbf/nmw, per-class
            settings without classes.
    """
    fusing = method in FUSION_METHODS
    if not fusing and (model_weights is not None or skip_box_threshold or conf_type != "avg"):
        raise BadInputError("`model_weights`, `skip_box_threshold` and `conf_type` apply to `method` wbf and nmw")
    if fusing and score_threshold is not None:
        raise BadInputError(
            "`score_threshold` is NMS's cut-off; for wbf and nmw use `skip_box_threshold` (scores below it go)"
        )
    if fusing and criterion != "iou":
        raise BadInputError(f"wbf and nmw compare IoU; `criterion` {criterion} applies to the NMS methods")
    if method in MERGING_METHODS and criterion not in MATCH_METRICS:
        raise BadInputError(
            f"{method} matches boxes by {' or '.join(MATCH_METRICS)} (SAHI's match metrics), not {criterion}"
        )
    if fusing and per_class_score:
        raise BadInputError("wbf and nmw take `skip_box_threshold`, not per-class score thresholds")
    if (per_class_iou or per_class_score) and agnostic:
        raise BadInputError("per-class settings need classes; they cannot go with `agnostic`")


def _per_box(detections: Detections, table: Mapping[Any, float] | None) -> np.ndarray | None:
    """A per-class table as one value per record (NaN for classes it does not list); classes
    the input does not hold are ignored (a table may cover every class of a dataset)."""
    if not table:
        return None
    code_of = {category: code for code, category in enumerate(detections.category_ids)}
    per_class = np.full(len(detections.category_ids), np.nan)
    for category, value in table.items():
        if category in code_of:
            per_class[code_of[category]] = value
    per_box = per_class[detections.categories]
    return per_box


def resolve_class_table(
    table: Mapping[str, Any], category_ids: Sequence[Any], names: Mapping[str, Any] | None = None, what: str = "table"
) -> dict[Any, float]:
    """Keys of a per-class table (JSON keys are text) as the records spell their category ids:
    ``"3"`` -> 3 when the input's ids are numbers, a text id as it is, or a class name through
    ``names`` (name -> id, from COCO ground truth). Values must be numbers.

    Raises:
        BadInputError: a key that is neither an id of the input nor a known name (a typo would
            otherwise go unnoticed), or a value that is not a number.
    """
    resolved, unknown = resolve_class_keys(table, category_ids, names, what)
    for key in table:
        if key in unknown:
            hint = "a category id of the input" + (" or a category name of the ground truth" if names else "")
            raise BadInputError(f"{what}: class {key!r} is not {hint}")
    return resolved


def resolve_class_keys(
    table: Mapping[str, Any], category_ids: Sequence[Any], names: Mapping[str, Any] | None = None, what: str = "table"
) -> tuple[dict[Any, float], set[str]]:
    """:func:`resolve_class_table` without the verdict on unknown keys: ``(resolved, keys that
    are neither ids of ``category_ids`` nor names)``, for a caller that sees the ids in parts.

    Raises:
        BadInputError: a value that is not a number.
    """
    known = set(category_ids)
    resolved: dict[Any, float] = {}
    unknown: set[str] = set()
    for key, value in table.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise BadInputError(f"{what}: the value for class {key!r} must be a number, not {_shown(value)}")
        category: Any = key
        if isinstance(key, str) and key.lstrip("-").isdigit() and int(key) in known:
            category = int(key)
        elif key in known:
            category = key
        elif names is not None and key in names:
            category = names[key]
        elif isinstance(key, str) and key.lstrip("-").isdigit():
            category = int(key)  # an id this input happens not to hold: ignored
        else:
            unknown.add(key)
            continue
        resolved[category] = float(value)
    return resolved, unknown


def _per_class_rule(class_iou: Mapping[Any, float] | None, class_score: Mapping[Any, float] | None) -> str:
    parts = []
    if class_iou:
        parts.append(f"per-class IoU for {len(class_iou)} class(es)")
    if class_score:
        parts.append(f"per-class score cut-off for {len(class_score)} class(es)")
    return f"; {', '.join(parts)}" if parts else ""


def _report(
    detections: Detections, method: str, iou_threshold: float, rule: str, kept_rows: np.ndarray, started: float
) -> NmsFileReport:
    """The account of a run whose output holds one record per row of ``kept_rows``."""
    counts_in = np.bincount(detections.categories, minlength=len(detections.category_ids))
    counts_out = np.bincount(detections.categories[kept_rows], minlength=len(detections.category_ids))
    return NmsFileReport(
        method=method,
        iou_threshold=iou_threshold,
        rule=rule,
        images=detections.image_count,
        detections_in=len(detections.records),
        detections_out=int(kept_rows.size),
        skipped=detections.skipped,
        per_class={str(c): [int(a), int(b)] for c, a, b in zip(detections.category_ids, counts_in, counts_out)},
        seconds=time.perf_counter() - started,
    )


def _run_fusion(
    detections: Detections,
    *,
    method: str,
    iou_threshold: float,
    max_det: int | None,
    agnostic: bool,
    box_format: str,
    models: np.ndarray | None,
    model_count: int | None,
    model_weights: Sequence[float] | None,
    skip_box_threshold: float,
    conf_type: str,
    started: float,
    keep_input: bool,
    iou_per_box: np.ndarray | None,
) -> tuple[list[Any], NmsFileReport]:
    """WBF or NMW over the records of several models (see :mod:`ptools.core.fusion`)."""
    nms_core.check_parameters(iou_threshold, max_det)
    xyxy = nms_core.to_xyxy(detections.boxes, box_format)
    categories = np.zeros_like(detections.categories) if agnostic else detections.categories
    groups = detections.images * (len(detections.category_ids) or 1) + categories
    model_of = np.zeros(len(detections.scores), dtype=np.int64) if models is None else np.asarray(models)
    result = fuse_groups(
        xyxy,
        detections.scores,
        groups,
        model_of,
        method=method,
        model_weights=None if model_weights is None else np.asarray(model_weights, dtype=np.float64),
        iou_threshold=iou_threshold,
        skip_box_threshold=skip_box_threshold,
        conf_type=conf_type,
        iou_thresholds=iou_per_box,
        model_count=model_count,
    )
    positions = nms_core.limit_per_image(detections.images, result.head, result.scores, max_det)
    heads = result.head[positions]
    boxes = nms_core.from_xyxy(result.boxes[positions], box_format).tolist()
    scores = result.scores[positions].tolist()
    records = detections.records
    rows = detections.index[heads].tolist()
    if keep_input:
        output = [{**records[row], "bbox": box, "score": score} for row, box, score in zip(rows, boxes, scores)]
    else:  # the caller gave its records up: each cluster's head record becomes the fused one
        output = [records[row] for row in rows]
        for record, box, score in zip(output, boxes, scores):
            record["bbox"] = box
            record["score"] = score
    inputs = int(model_of.max(initial=0)) + 1
    rule = (
        f"clusters of IoU > {iou_threshold:g} with the fused box, conf {conf_type}, {inputs} input(s)"
        if method == "wbf"
        else f"clusters of IoU > {iou_threshold:g} with the best box, weights score x IoU, {inputs} input(s)"
    )
    return output, _report(detections, method, iou_threshold, rule, heads, started)


def _cuda_hard(
    method: str,
    xyxy: np.ndarray,
    scores: np.ndarray,
    groups: np.ndarray,
    iou_threshold: float,
    score_threshold: float | None,
) -> nms_core.NmsResult:
    """Hard NMS with torchvision's CUDA kernel (float64), same keep set as the CPU path."""
    if method != "hard":
        raise BadInputError(f"`device` cuda runs `method` hard only; {method} runs on the CPU (the default)")
    import torch

    if not torch.cuda.is_available():
        from ptools.errors import RequirementNotMetError

        raise RequirementNotMetError("`device` cuda: torch sees no CUDA device")
    on_gpu = [torch.as_tensor(a, device="cuda") for a in (xyxy, scores, groups)]
    keep, _ = nms_core.nms(*on_gpu, iou_threshold=iou_threshold, score_threshold=score_threshold)
    kept = keep.cpu().numpy()
    return nms_core.NmsResult(keep=kept, scores=scores[kept], boxes=xyxy[kept])


def _ground_truth_document(path: str) -> dict[str, Any]:
    """The COCO ground-truth object at ``path``, checked before pycocotools sees it (which
    answers a detections file with a 48-line assertion traceback)."""
    orjson = _json()
    try:
        with open(path, "rb") as handle:
            document = orjson.loads(handle.read())
    except OSError as failure:
        raise BadInputError(f"`ground_truth` {path}: {failure.strerror or failure}") from None
    except orjson.JSONDecodeError as failure:
        raise BadInputError(f"`ground_truth` {path} is not valid JSON ({brief_text(str(failure))})") from None
    if isinstance(document, list):
        raise BadInputError(
            f"`ground_truth` {path} is a list of records (detections?), not a COCO ground-truth file",
            "ground truth is an object with images, annotations and categories, like instances_val2017.json",
        )
    if not is_ground_truth(document) or not all(isinstance(document[key], list) for key in ("images", "annotations")):
        raise BadInputError(
            f"`ground_truth` {path}: not a COCO ground-truth file (no images and annotations lists)",
            "ground truth is an object with images, annotations and categories, like instances_val2017.json",
        )
    return document


def evaluate(ground_truth_path: str, *results: list[Any]) -> list[dict[str, float]]:
    """COCO bbox metrics (pycocotools) of each list of result records against ground truth.

    Returns:
        One dict per list: AP, AP50, AP75, AR@100.

    Raises:
        BadInputError: the ground truth is not COCO, or results name images it lacks.
    """
    import contextlib
    import io

    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        from ptools.errors import RequirementNotMetError

        raise RequirementNotMetError("`ground_truth` evaluation needs pycocotools: pip install pycocotools") from None
    chatter = io.StringIO()  # pycocotools prints progress to stdout, which carries our data
    metrics = []
    document = _ground_truth_document(ground_truth_path)
    with contextlib.redirect_stdout(chatter):
        ground_truth = COCO()
        ground_truth.dataset = document
        try:
            ground_truth.createIndex()
        except (ValueError, KeyError, TypeError, AssertionError) as failure:
            raise BadInputError(
                f"`ground_truth` {ground_truth_path}: not a COCO ground-truth file ({brief_text(str(failure))})"
            ) from None
        for records in results:
            copies = [
                {
                    "image_id": r["image_id"],
                    "category_id": r["category_id"],
                    "bbox": list(r["bbox"]),
                    "score": r["score"],
                }
                for r in records
            ]
            if not copies:
                metrics.append({"AP": 0.0, "AP50": 0.0, "AP75": 0.0, "AR@100": 0.0})
                continue
            try:
                predictions = ground_truth.loadRes(copies)
            except (AssertionError, KeyError, IndexError) as failure:
                raise BadInputError(
                    f"`ground_truth`: the detections do not match {ground_truth_path} "
                    f"(image ids missing from the ground truth?) {failure}"
                ) from None
            evaluator = COCOeval(ground_truth, predictions, "bbox")
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
            stats = evaluator.stats
            metrics.append(
                {"AP": float(stats[0]), "AP50": float(stats[1]), "AP75": float(stats[2]), "AR@100": float(stats[8])}
            )
    return metrics
