"""Detection dumps larger than memory: JSON Lines run through NMS in batches of whole images.

Images never interact, so a batch of whole images gives exactly what the whole file gives
for them. Two ways, chosen by the data:

- **grouped**: the records of each image arrive together, images in ascending id order (a
  detector writing image after image): one pass; finished images are run and written in
  batches of about ``batch_bytes`` of JSON.
- **otherwise**: the first image out of order sends the run back to the start (the output so
  far is discarded), to partition the records by image into temporary files under
  ``tmp_dir``, each about ``batch_bytes``; each is run in memory, and the outputs are merged
  by image id.

Output: byte for byte what the in-memory path writes for the same input (images ascending,
then score descending; ties in input order). Memory: about 25 times ``batch_bytes``, or the
largest image if one image is larger. Errors name the record and line as the in-memory path
does, and come before anything is kept: the caller writes to a temporary file.
"""

from __future__ import annotations

import heapq
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np

from ptools.core import detections as core
from ptools.core.choices import BoxFormat
from ptools.core.memory import gc_paused
from ptools.errors import BadInputError

BATCH_BYTES = 16 << 20
CHUNK_BYTES = 4 << 20  # read and parsed at a time (at most; a quarter of a batch)

# (phase, bytes done, bytes in all, records, images): bytes and records count from 0 again in
# each pass over the data (a partitioned file is read twice)
Progress = Callable[[str, int, int, int, int], None]


def id_key(value: Any) -> tuple[bool, Any]:
    """Ids (of images, of categories) in the documented order: integers ascending, then strings."""
    return isinstance(value, str), value


@dataclass
class _Totals:
    """The run's report, summed over batches."""

    first: core.NmsFileReport | None = None
    images: int = 0
    detections_in: int = 0
    detections_out: int = 0
    skipped: int = 0
    per_class: dict[Any, list[int]] = field(default_factory=dict)

    def add(self, report: core.NmsFileReport, category_ids: list[Any]) -> None:
        self.first = self.first or report
        self.images += report.images
        self.detections_in += report.detections_in
        self.detections_out += report.detections_out
        for category, (count_in, count_out) in zip(category_ids, report.per_class.values()):
            counts = self.per_class.setdefault(category, [0, 0])
            counts[0] += count_in
            counts[1] += count_out

    def report(self, started: float) -> core.NmsFileReport:
        assert self.first is not None
        ordered = sorted(self.per_class.items(), key=lambda item: id_key(item[0]))
        return core.NmsFileReport(
            method=self.first.method,
            iou_threshold=self.first.iou_threshold,
            rule=self.first.rule,
            images=self.images,
            detections_in=self.detections_in,
            detections_out=self.detections_out,
            skipped=self.skipped,
            per_class={str(category): counts for category, counts in ordered},
            seconds=time.perf_counter() - started,
        )


class _Output:
    """Records written as the in-memory path writes them: JSON Lines, or one JSON array
    (``[`` + records joined by ``,`` + ``]``, which is what orjson makes of a list)."""

    def __init__(self, handle: IO[bytes], output_format: str) -> None:
        self.handle, self.array, self.count = handle, output_format == "json", 0
        self.start = handle.tell()
        if self.array:
            handle.write(b"[")

    def write_lines(self, lines: bytes, count: int) -> None:
        """``count`` records, each encoded and ended by a newline."""
        if not count:
            return
        if self.array:
            self.handle.write((b"," if self.count else b"") + lines[:-1].replace(b"\n", b","))
        else:
            self.handle.write(lines)
        self.count += count

    def restart(self) -> None:
        self.handle.seek(self.start)
        self.handle.truncate()
        self.count = 0
        if self.array:
            self.handle.write(b"[")

    def close(self) -> None:
        if self.array:
            self.handle.write(b"]")


def _encode(records: list[Any]) -> bytes:
    orjson = core._json()
    return b"".join(orjson.dumps(record) + b"\n" for record in records)


@dataclass
class _Run:
    """One streaming run's settings and state."""

    path: str
    source: str
    output: _Output
    options: dict[str, Any]
    tables: dict[str, Mapping[str, Any] | None]
    box_format: BoxFormat
    skip_invalid: bool
    batch_bytes: int
    tmp_dir: str | None
    progress: Progress | None
    totals: _Totals = field(default_factory=_Totals)
    unresolved: dict[str, set[str]] = field(default_factory=dict)
    size: int = 0
    records_read: int = 0
    bytes_done: int = 0
    images_done: int = 0

    def chunks(self, chunk_bytes: int) -> Iterator[tuple[int, int, list[bytes]]]:
        """``(first line number, bytes, lines)`` of the file, cut after newlines."""
        number, carry = 1, b""
        try:
            handle = open(self.path, "rb")  # noqa: SIM115
        except OSError as failure:
            raise BadInputError(f"cannot read {self.source}: {failure.strerror or failure}") from None
        with handle:
            while True:
                try:
                    block = handle.read(chunk_bytes)
                except OSError as failure:
                    raise BadInputError(f"cannot read {self.source}: {failure.strerror or failure}") from None
                data = carry + block
                cut = data.rfind(b"\n") + 1 if block else len(data)
                if cut == 0 and block:  # one line longer than a chunk: read on
                    carry = data
                    continue
                piece, carry = data[:cut], data[cut:]
                if piece:
                    lines = piece.splitlines()
                    yield number, len(piece), lines
                    number += len(lines)
                if not block:
                    return

    def records_of(self, first: int, size: int, lines: list[bytes]) -> list[Any]:
        records = core.parse_lines(lines, self.source, first)
        self.records_read += len(records)
        self.bytes_done += size
        return records

    def with_image_ids(
        self, records: list[Any], offset: int, before: list[Any] | None = None
    ) -> tuple[list[Any], list[Any]]:
        """The records that have an image id, and their ids. A record without one is refused,
        naming the first invalid record from ``offset`` on (``before``, the records just before
        them that are not checked yet, come first), or, with skip_invalid, left out and counted
        with the other invalid records of ``records``."""
        try:
            ids = [record["image_id"] for record in records]
        except (TypeError, KeyError):
            ids = None
        if ids is not None and set(map(type, ids)) <= {int, str}:
            return records, ids
        if before and not self.skip_invalid:
            core.validate(before, self.box_format, offset=offset - len(before))
        detections = core.validate(records, self.box_format, self.skip_invalid, offset=offset)
        self.totals.skipped += detections.skipped
        self.totals.detections_in += detections.skipped  # read, and left out: counted as the in-memory path does
        kept = [records[i] for i in detections.index.tolist()]
        return kept, [record["image_id"] for record in kept]

    def run_batch(self, records: list[Any], offset: int = 0) -> list[Any]:
        """NMS over whole images: their kept records, by image then score."""
        detections = core.validate(records, self.box_format, self.skip_invalid, offset=offset)
        self.totals.skipped += detections.skipped
        tables: dict[str, Any] = {}
        for option, table in self.tables.items():
            if table is None:
                continue
            resolved, unknown = core.resolve_class_keys(table, detections.category_ids, None, _NAMES[option])
            tables[option] = resolved
            # a key is a mistake only if no batch knows it
            self.unresolved[option] = unknown if option not in self.unresolved else self.unresolved[option] & unknown
        kept, report = core.run_nms(
            detections,
            keep_input=False,
            box_format=self.box_format,
            class_iou=tables.get("class_iou"),
            class_score_threshold=tables.get("class_score_threshold"),
            **self.options,
        )
        self.totals.add(report, detections.category_ids)
        self.images_done += report.images
        return kept

    def first_problem(self, found: BadInputError) -> BadInputError:
        """The error the in-memory path gives: the first invalid record in file order (the
        partitions see records out of order). ``found`` if the file shows no other."""
        offset = 0
        for first, _, lines in self.chunks(CHUNK_BYTES):
            records = core.parse_lines(lines, self.source, first)
            try:
                core.validate(records, self.box_format, offset=offset)
            except BadInputError as failure:
                return failure
            offset += len(records)
        return found

    def report_progress(self, phase: str) -> None:
        if self.progress is not None:
            self.progress(phase, self.bytes_done, self.size, self.records_read, self.images_done)


def stream_nms(
    path: str,
    handle: IO[bytes],
    *,
    source: str | None = None,
    output_format: str = "jsonl",
    box_format: BoxFormat = "xywh",
    skip_invalid: bool = False,
    class_iou: Mapping[str, Any] | None = None,
    class_score_threshold: Mapping[str, Any] | None = None,
    batch_bytes: int = BATCH_BYTES,
    tmp_dir: str | None = None,
    progress: Progress | None = None,
    **options: Any,
) -> core.NmsFileReport:
    """Run :func:`ptools.core.detections.run_nms` over the JSON Lines file ``path`` in bounded
    memory, writing what it keeps to ``handle`` (a regular file, which a restart rewinds).

    Args:
        class_iou, class_score_threshold: per-class tables as given (text keys by category
            id, resolved as :func:`~ptools.core.detections.resolve_class_table` does, batch by
            batch; a key no batch knows is an error at the end).
        batch_bytes: about how much JSON is run at once.
        tmp_dir: where the partitions of an ungrouped file go (default: the system's).
        progress: called with (phase, bytes done, bytes in all, records read, images done).
        options: :func:`~ptools.core.detections.run_nms`'s other keywords (method, thresholds...).

    Returns:
        The run's report; ``streamed`` says which way it went.

    Raises:
        BadInputError: as the in-memory path, naming the line or record.
    """
    started = time.perf_counter()
    core.check_method_options(
        options.get("method", "hard"), options.get("score_threshold"), options.get("criterion", "iou"),
        options.get("model_weights"), options.get("skip_box_threshold", 0.0), options.get("conf_type", "avg"),
        options.get("agnostic", False), bool(class_iou), bool(class_score_threshold),
    )  # fmt: skip
    try:
        size = os.path.getsize(path)
    except OSError as failure:
        raise BadInputError(f"cannot read {source or path}: {failure.strerror or failure}") from None
    run = _Run(
        path=path,
        source=source or path,
        output=_Output(handle, output_format),
        options=options,
        tables={"class_iou": class_iou, "class_score_threshold": class_score_threshold},
        box_format=box_format,
        skip_invalid=skip_invalid,
        batch_bytes=batch_bytes,
        tmp_dir=tmp_dir,
        progress=progress,
        size=size,
    )
    # The live records are a bounded, acyclic set: the cyclic collector would only walk them.
    with gc_paused():
        try:
            _grouped(run)
            streamed = "grouped"
        except _NotGrouped:
            run.output.restart()
            run.totals, run.unresolved = _Totals(), {}
            run.records_read = run.bytes_done = run.images_done = 0
            streamed = f"partitioned in {_partitioned(run)}"
        if run.totals.first is None:  # no record at all: the report of an empty run
            run.run_batch([])
    for option, unknown in run.unresolved.items():
        if unknown:
            table = class_iou if option == "class_iou" else class_score_threshold
            assert table is not None
            first = next(key for key in table if key in unknown)
            core.resolve_class_table({first: table[first]}, [], None, _NAMES[option])
    run.output.close()
    report = run.totals.report(started)
    report.streamed = streamed
    return report


_NAMES = {"class_iou": "`class_iou`", "class_score_threshold": "`class_score_threshold`"}


class _NotGrouped(Exception):
    """An image came out of order: the grouped pass gives way to partitioning."""


def _grouped(run: _Run) -> None:
    """One pass, for images that arrive whole and in order; raises _NotGrouped otherwise
    (within the first chunk for a shuffled file). Records gather until about batch_bytes,
    then the finished images among them run; the last image waits for the next chunk."""
    pending: list[Any] = []
    pending_bytes = 0.0
    current_start = 0  # where the last image of pending starts
    done = 0  # records run so far (for messages)
    last_key: tuple[bool, Any] | None = None
    for first, size, lines in run.chunks(max(1000, min(CHUNK_BYTES, run.batch_bytes // 4))):
        records, ids = run.with_image_ids(run.records_of(first, size, lines), done + len(pending), pending)
        if not records:
            continue
        starts = _image_starts(ids)
        continues = bool(pending) and _is(ids[0], pending[-1]["image_id"])
        for start in starts[1:] if continues else starts:
            key = id_key(ids[start])
            if last_key is not None and not key > last_key:
                raise _NotGrouped
            last_key = key
        if not (continues and starts.size == 1):
            current_start = len(pending) + int(starts[-1])
        pending.extend(records)
        pending_bytes += size
        if pending_bytes >= run.batch_bytes and current_start > 0:
            batch, pending = pending[:current_start], pending[current_start:]
            pending_bytes *= len(pending) / (len(pending) + len(batch))
            kept = run.run_batch(batch, done)
            done += len(batch)
            current_start = 0
            run.output.write_lines(_encode(kept), len(kept))
        run.report_progress("running")
    if pending:
        kept = run.run_batch(pending, done)
        run.output.write_lines(_encode(kept), len(kept))
        run.report_progress("running")


def _image_starts(ids: list[Any]) -> np.ndarray:
    """Positions where a new image id starts (0 included): equal ids of different types (1
    and "1") are different images."""
    kinds = set(map(type, ids))
    if len(kinds) == 1:
        values = np.array(ids)
        changed = values[1:] != values[:-1]
    else:
        values = np.array(ids, dtype=object)
        is_text = np.array([kind is str for kind in map(type, ids)])
        changed = (values[1:] != values[:-1]) | (is_text[1:] != is_text[:-1])
    return np.concatenate(([0], np.flatnonzero(changed) + 1))


def _partitioned(run: _Run) -> str:
    """Records by image into buckets of about batch_bytes, each run in memory; the outputs
    merged by image id through a small index of (image, records, bytes) per bucket.
    Returns how it went, for the report."""
    buckets = max(2, -(-run.size // run.batch_bytes))
    try:
        scratch = tempfile.TemporaryDirectory(prefix="ptools-nms-", dir=run.tmp_dir)
    except OSError as failure:
        raise _temporary_failure(run.tmp_dir, failure) from None
    with scratch as folder:
        try:
            _partition(run, folder, buckets)
            indexes = []
            for bucket in range(buckets):
                path = os.path.join(folder, f"part{bucket}.jsonl")
                with open(path, "rb") as handle:
                    data = handle.read()
                os.unlink(path)
                run.bytes_done += len(data)  # the bar goes round again, part by part
                records = core.parse_lines(data.splitlines(), run.source)
                run.records_read += len(records)
                del data
                kept = run.run_batch(records) if records else []
                del records
                indexes.append(_write_bucket_output(folder, bucket, kept))
                run.report_progress(f"running part {bucket + 1}/{buckets}")
        except BadInputError as failure:
            if run.skip_invalid:
                raise
            raise run.first_problem(failure) from None
        except OSError as failure:  # the temporary files: a full disk, most likely
            raise _temporary_failure(run.tmp_dir, failure) from None
        _merge_outputs(folder, indexes, run.output)  # its errors are the output's
    return f"{buckets} parts"


def _temporary_failure(tmp_dir: str | None, failure: OSError) -> BadInputError:
    return BadInputError(
        f"cannot write temporary files in {tmp_dir or tempfile.gettempdir()}: {failure.strerror or failure}",
        "free space there, or name another folder with `tmp_dir`",
    )


def _partition(run: _Run, folder: str, buckets: int) -> None:
    """Each record's line into the bucket of its image."""
    parts = [open(os.path.join(folder, f"part{n}.jsonl"), "wb") for n in range(buckets)]  # noqa: SIM115
    try:
        for first, size, lines in run.chunks(run.batch_bytes):
            records = run.records_of(first, size, lines)
            raw = lines if len(records) == len(lines) else [line for line in lines if line.strip()]
            usable, ids = run.with_image_ids(records, 0)
            if len(usable) != len(records):  # skip_invalid left some out: their lines go too
                kept = set(map(id, usable))
                raw = [line for line, record in zip(raw, records) if id(record) in kept]
            if usable:
                bucket_of, image_order = _buckets(ids, buckets)
                # by bucket, then image (then file order): each image's records lie together, which
                # keeps the second pass's walks over them in cache
                order = np.lexsort((image_order, bucket_of))
                bounds = np.searchsorted(bucket_of[order], np.arange(buckets + 1))
                for filled in np.flatnonzero(np.diff(bounds)):
                    members = order[bounds[filled] : bounds[filled + 1]]
                    parts[filled].write(b"\n".join([raw[i] for i in members]) + b"\n")
            run.report_progress("partitioning")
    finally:
        for part in parts:
            part.close()
    run.bytes_done = run.records_read = 0  # the second pass counts again


def _buckets(ids: list[Any], buckets: int) -> tuple[np.ndarray, np.ndarray]:
    """A bucket per record from its image id (the same for the same image), and a code per
    record that is the same for the same image."""
    if set(map(type, ids)) == {int}:
        values = np.array(ids)
        if values.dtype.kind == "i":
            # Fibonacci hashing: ids in strides (0, 10, 20...) spread over every bucket all the same
            with np.errstate(over="ignore"):
                mixed = (values.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(32)
            return (mixed % np.uint64(buckets)).astype(np.int64), values
    hashes = np.array([hash((type(v) is str, v)) for v in ids], dtype=np.int64)
    return np.mod(hashes, buckets), hashes


def _write_bucket_output(folder: str, bucket: int, kept: list[Any]) -> str:
    """Kept records as lines, and an index of (image id, records, bytes) per image."""
    orjson = core._json()
    lines = [orjson.dumps(record) + b"\n" for record in kept]
    index_path = os.path.join(folder, f"out{bucket}.index")
    with open(os.path.join(folder, f"out{bucket}.jsonl"), "wb") as out, open(index_path, "wb") as index:
        out.write(b"".join(lines))
        if lines:
            ids = [record["image_id"] for record in kept]
            starts = _image_starts(ids)
            ends = np.append(starts[1:], len(lines))
            offsets = np.concatenate(([0], np.cumsum(np.fromiter(map(len, lines), np.int64, len(lines))))).tolist()
            index.write(
                b"".join(
                    orjson.dumps([ids[start], end - start, offsets[end] - offsets[start]]) + b"\n"
                    for start, end in zip(starts.tolist(), ends.tolist())
                )
            )
    return index_path


def _is(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b


def _merge_outputs(folder: str, indexes: list[str], output: _Output) -> None:
    """Each image's kept records, copied from its bucket's output in image order."""
    orjson = core._json()

    def entries(bucket: int, index_path: str) -> Iterator[tuple[tuple[bool, Any], int, int, int]]:
        with open(index_path, "rb") as index:
            for line in index:
                image, count, size = orjson.loads(line)
                yield id_key(image), bucket, count, size

    outputs = [open(os.path.join(folder, f"out{n}.jsonl"), "rb") for n in range(len(indexes))]  # noqa: SIM115
    try:
        for _, bucket, count, size in heapq.merge(*(entries(n, p) for n, p in enumerate(indexes))):
            output.write_lines(outputs[bucket].read(size), count)
    finally:
        for handle in outputs:
            handle.close()
