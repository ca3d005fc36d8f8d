"""NMS over prediction shards spread across a Ray cluster: Ray Data reads the shards in
parallel, groups the records by image across all of them (a shuffle by image id), runs the same
NMS core on each image's records, and writes output shards and a manifest.

The result equals the single-machine run as a multiset of records: NMS never looks across
images, and each image's records meet in one group whatever shard they came from.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

from ptools.errors import BadInputError

MANIFEST = "manifest.json"
DETECTION_SUFFIXES = (".json", ".jsonl")


@dataclass
class RayNmsReport:
    """What ``nms_on_ray`` did: inputs, outputs (in the manifest), counts and per-stage seconds."""

    inputs: list[str]
    output: str
    shards: list[dict[str, Any]]
    records_in: int
    records_out: int
    images: int
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def expand_inputs(patterns: list[str]) -> list[str]:
    """Files named by paths, globs (``preds/*.jsonl``) and folders (their ``.json``/``.jsonl``
    files), sorted and without repeats.

    Raises:
        BadInputError: a pattern matches nothing.
    """
    files: list[str] = []
    for pattern in patterns:
        if os.path.isdir(pattern):
            found = sorted(
                os.path.join(pattern, name)
                for name in os.listdir(pattern)
                if name.endswith(DETECTION_SUFFIXES) and os.path.isfile(os.path.join(pattern, name))
            )
        else:
            found = sorted(p for p in glob.glob(pattern) if os.path.isfile(p))
        if not found:
            raise BadInputError(f"{pattern}: no detection files (.json, .jsonl) there")
        files.extend(found)
    unique = list(dict.fromkeys(os.path.abspath(f) for f in files))
    return unique


def _records_of_file(row: dict[str, Any], box_format: str, skip_invalid: bool) -> list[dict[str, Any]]:
    """One input shard, parsed and validated as the single-machine run does (the same
    messages), as rows keyed by image id, with each record's place in the concatenated input."""
    from ptools.core.detections import _json, parse_detections, validate
    from ptools.errors import PtoolsError

    orjson = _json()
    path, number = row["path"], int(row["number"])
    try:
        with open(path, "rb") as handle:
            records, _ = parse_detections(handle.read(), path)
        detections = validate(records, box_format=box_format, skip_invalid=skip_invalid)  # type: ignore[arg-type]
    except OSError as failure:
        raise _marked("BadInputError", f"{path}: {failure.strerror or failure}") from None
    except PtoolsError as failure:
        # Ray carries a task's error to the driver as text (the original exception's cause
        # chain does not survive); the mark lets the driver raise ptools' error again.
        text = str(failure) if path in str(failure) else f"{path}: {failure}"
        raise _marked(type(failure).__name__, text) from None
    return [
        {
            "key": orjson.dumps(records[i]["image_id"]).decode(),
            "order": (number << 40) + i,
            "record": orjson.dumps(records[i]),
        }
        for i in detections.index.tolist()
    ]


def _nms_group(batch: Any, options: dict[str, Any]) -> dict[str, list[bytes]]:
    """The records of one image (a Ray Data group), through the NMS core, in the order the
    concatenated inputs hold them: ties between equal scores resolve as on one machine."""
    import numpy as np

    from ptools.core.detections import _json, run_nms, validate

    orjson = _json()
    order = np.argsort(np.asarray(batch["order"]), kind="stable")
    records = [orjson.loads(batch["record"][i]) for i in order]
    detections = validate(records, box_format=options["box_format"])
    kept, _ = run_nms(detections, keep_input=False, **options)
    return {"record": [orjson.dumps(record) for record in kept]}


def _write_shard(batch: Any, folder: str) -> dict[str, list[Any]]:
    """One output shard of JSON Lines, written by the worker that holds the batch."""
    name = f"part-{uuid.uuid4().hex}.jsonl"
    path = os.path.join(folder, name)
    try:
        with open(path, "wb") as handle:
            for raw in batch["record"]:
                handle.write(bytes(raw) + b"\n")
    except OSError as failure:  # e.g. a folder this node cannot see: no shared file system
        raise _marked("BadInputError", f"cannot write {path} on a worker: {failure.strerror}") from None
    return {"file": [name], "records": [len(batch["record"])]}


def nms_on_ray(
    inputs: list[str],
    output: str,
    *,
    ray_address: str | None = None,
    shards: int | None = None,
    skip_invalid: bool = False,
    force: bool = False,
    **options: Any,
) -> RayNmsReport:
    """Run NMS over every record of ``inputs`` (paths, globs, folders) on a Ray cluster and
    write ``output/part-NNNNN.jsonl`` plus ``output/manifest.json``.

    The input files must be readable at the same paths from every node (a shared file
    system). ``options`` are :func:`ptools.core.detections.run_nms`'s (method, thresholds,
    ``box_format``…). ``shards``: output files (default: one per input shard).

    Nothing is half-written: the shards are written into a hidden folder inside ``output``
    and moved into place, the manifest last; on failure the hidden folder is removed.

    Raises:
        BadInputError: an input is invalid (the message of the single-machine run), or
            ``output`` is not a folder ptools may write.
        RequirementNotMetError: no Ray, or no cluster.
    """
    from ptools.core.cluster import connect

    started = time.perf_counter()
    files = expand_inputs(inputs)
    previous = _check_output(output, files, force)
    connect(ray_address)
    from ray import data as ray_data

    # The command's stderr is for its own lines: no progress bars or executor logs from Ray Data.
    context = ray_data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    for name in ("ray.data", "ray"):
        logging.getLogger(name).setLevel(logging.ERROR)

    seconds: dict[str, float] = {}
    created = not os.path.exists(output)
    os.makedirs(output, exist_ok=True)
    staging = os.path.join(os.path.abspath(output), f".ptools-{uuid.uuid4().hex}")  # workers have other cwds
    os.mkdir(staging)
    finished = False
    try:
        box_format = options.get("box_format", "xywh")
        options = {**options, "box_format": box_format}
        data = ray_data.from_items(
            [{"path": path, "number": number} for number, path in enumerate(files)], override_num_blocks=len(files)
        )
        # Each stage is materialized once: the counts below would otherwise run it again, and
        # the per-stage seconds say where a cluster's time goes.
        try:
            clock = time.perf_counter()
            rows = data.flat_map(partial(_records_of_file, box_format=box_format, skip_invalid=skip_invalid))
            rows = rows.materialize()
            records_in = int(rows.count())
            seconds["read"] = time.perf_counter() - clock
            clock = time.perf_counter()
            images = len(rows.unique("key"))
            kept = rows.groupby("key").map_groups(partial(_nms_group, options=options), batch_format="numpy")
            kept = kept.materialize()
            seconds["group_and_nms"] = time.perf_counter() - clock
            clock = time.perf_counter()
            kept = kept.repartition(shards or len(files))
            written = kept.map_batches(partial(_write_shard, folder=staging), batch_size=None, batch_format="numpy")
            results = written.take_all()
            seconds["write"] = time.perf_counter() - clock
        except Exception as failure:
            raise _unwrap(failure) from None
        shards_out: list[dict[str, Any]] = []
        for number, row in enumerate(sorted(results, key=lambda r: str(r["file"]))):
            final = f"part-{number:05d}.jsonl"
            os.replace(os.path.join(staging, str(row["file"])), os.path.join(output, final))
            shards_out.append({"file": final, "records": int(row["records"])})
        report = RayNmsReport(
            inputs=files,
            output=output,
            shards=shards_out,
            records_in=records_in,
            records_out=sum(s["records"] for s in shards_out),
            images=images,
            seconds=seconds,
        )
        for stale in previous - {s["file"] for s in shards_out} - {MANIFEST}:  # a previous run's extra shards
            os.remove(os.path.join(output, stale))
        report.seconds["total"] = time.perf_counter() - started
        manifest = {**report.to_dict(), "options": {k: v for k, v in options.items() if _plain(v)}}
        with open(os.path.join(staging, MANIFEST), "w", encoding="utf-8") as handle:
            json.dump(manifest, handle, indent=1)
        os.replace(os.path.join(staging, MANIFEST), os.path.join(output, MANIFEST))
        finished = True
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if not finished:
            for entry in set(os.listdir(output)) - previous:  # shards this run moved in before failing
                if entry.startswith("part-") and entry.endswith(".jsonl"):
                    os.remove(os.path.join(output, entry))
            if created:
                os.rmdir(output)
    return report


def _plain(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool, list))


_MARK = "PTOOLS-ERROR"
_MARKED = re.compile(_MARK + r"\[(\w+)\]: ([^\n]*)")


def _marked(kind: str, message: str) -> RuntimeError:
    """A worker's error as text :func:`_unwrap` turns back into ptools' ``kind`` on the driver."""
    return RuntimeError(f"{_MARK}[{kind}]: {message}")


def _unwrap(failure: BaseException) -> BaseException:
    """The ptools error a Ray task raised (marked by :func:`_records_of_file`), raised again
    here with its message; any other failure as it is."""
    from ptools import errors

    found = _MARKED.findall(str(failure))
    if not found:
        return failure
    name, message = found[-1]
    kind = getattr(errors, name, errors.BadInputError)
    return kind(message) if isinstance(kind, type) and issubclass(kind, errors.PtoolsError) else failure


def _previous_run(output: str) -> set[str]:
    """The files a previous ``nms --ray`` wrote into ``output``: its manifest and the shards
    that manifest lists; nothing when there is no such manifest."""
    try:
        with open(os.path.join(output, MANIFEST), encoding="utf-8") as handle:
            manifest = json.load(handle)
        shards = [shard["file"] for shard in manifest["shards"]]
    except (OSError, ValueError, KeyError, TypeError):
        return set()
    return {MANIFEST, *(name for name in shards if isinstance(name, str) and _SHARD.fullmatch(name))}


_SHARD = re.compile(r"part-\d{5}\.jsonl")


def _check_output(output: str, files: list[str], force: bool) -> set[str]:
    """``output`` must be a folder ptools may fill: new, empty, or (with ``force``) one that
    holds a previous run's manifest and exactly the shards it lists (ptools removes only what
    it wrote); never an input's folder. Returns what is there (removed only once the new run
    has succeeded)."""
    if os.path.lexists(output) and not os.path.isdir(output):
        raise BadInputError(f"`output` {output}: not a folder", "name a new folder, e.g. nms_out/")
    real = os.path.realpath(output)  # a symlink to an input's folder is that folder
    for path in files:
        if os.path.dirname(os.path.realpath(path)) == real:
            raise BadInputError(f"`output` {output} holds the input {path}", "write to another folder")
    if os.path.isdir(output):
        entries = os.listdir(output)
        ours = bool(entries) and set(entries) <= _previous_run(output)
        if entries and not (force and ours):
            raise BadInputError(
                f"`output` {output} is not empty",
                "pass `force=True` to replace a previous run's output" if ours else "name a new or empty folder",
            )
        return set(entries)
    return set()
