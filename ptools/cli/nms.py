"""``ptools nms``: offline NMS over detection JSON files."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from typing import Annotated, Any

import typer

from ptools.cli import output
from ptools.cli.help_format import command_help
from ptools.cli.options import RayAddressOption, usage_check
from ptools.core.choices import BoxFormat, ConfType, DetectionsFormat, IouKind, NmsDevice, NmsMethod, SoftFunction
from ptools.core.files import path_kind, require_regular_file
from ptools.errors import BadInputError

NAME = "nms"
SHORT_HELP = (
    "Offline NMS (hard, and, merge, diou, soft), box fusion of several models (wbf, nmw) and merging of "
    "sliced predictions (nmm, greedy-nmm) over COCO-style detection JSON or JSON Lines."
)
DETAILS = "Per image, and per class unless --agnostic. hard is exactly torchvision's batched_nms keep set; soft re-picks the best decayed score after every decay and returns the decayed scores. Every other field of a record is kept. Output: by image id, then score descending."
EXAMPLES = [
    "ptools nms preds.json --method soft > out.json",
    "ptools nms preds.json -o kept.json --iou 0.6 --score-thr 0.05 --max-det 100",
    "cat preds.jsonl | ptools nms - --method diou --agnostic > out.jsonl",
    "ptools nms examples/detections.json --method soft --eval examples/detections_gt.json -o out.json",
    "ptools nms model_a.json model_b.json model_c.jsonl --method wbf --model-weights 2,1,1 -o fused.json",
    "ptools nms sliced.json --method greedy-nmm --match-metric ios -o merged.json",
]
HELP = command_help(SHORT_HELP, DETAILS, EXAMPLES)


def _parse_batch(text: str) -> int:
    from ptools.core.units import parse_size

    size = parse_size(text)
    if size < 1000:
        raise BadInputError(f"--batch {text!r}: at least 1KB")
    return size


def _parse_weights(text: str) -> list[float]:
    """``2,1,1`` -> [2.0, 1.0, 1.0]: positive finite numbers."""
    import math

    try:
        weights = [float(part) for part in text.split(",")]
    except ValueError:
        raise BadInputError(f"--model-weights {text!r}: give numbers separated by commas, e.g. 2,1,1") from None
    if not all(math.isfinite(w) and w > 0 for w in weights):
        raise BadInputError(f"--model-weights {text!r}: every weight must be a positive number")
    return weights


def command(
    sources: Annotated[
        list[str],
        typer.Argument(
            metavar="INPUT",
            help="Detections (JSON array or JSON Lines); - for stdin. Several inputs: wbf/nmw fuse them as "
            "models; the other methods run over all their records together.",
            show_default=False,
        ),
    ],
    destination: Annotated[
        str, typer.Option("--output", "-o", metavar="FILE", help="Where to write the kept detections; - for stdout.")
    ] = "-",
    method: Annotated[
        NmsMethod,
        typer.Option(
            "--method",
            metavar="METHOD",
            case_sensitive=False,
            help="hard (aliases vision, vision_batch, batched, or), and, merge, diou, soft; wbf, nmw (fuse "
            "models); nmm, greedy-nmm (SAHI's merging of sliced predictions).",
        ),
    ] = "hard",
    iou: Annotated[
        float | None,
        typer.Option(
            "--iou",
            metavar="T",
            min=0.0,
            max=1.0,
            show_default=False,
            help="Suppress when the overlap (--criterion; DIoU for diou) > this; nmm/greedy-nmm merge when "
            "it is >= this (SAHI's rule); soft with --soft-fn linear decays above it; gaussian Soft-NMS has "
            "no threshold (use --sigma). Default 0.5; 0.55 for wbf/nmw.",
        ),
    ] = None,
    score_thr: Annotated[
        float | None,
        typer.Option(
            "--score-thr",
            metavar="S",
            help="Drop detections with score <= S before NMS; for soft also the cut-off after decay "
            "(default 0.001 for soft, none otherwise).",
        ),
    ] = None,
    max_det: Annotated[
        int | None,
        typer.Option("--max-det", min=1, metavar="N", help="Keep at most N detections per image, highest scores."),
    ] = None,
    agnostic: Annotated[
        bool, typer.Option("--agnostic", help="Ignore classes: any box may suppress any other in its image.")
    ] = False,
    criterion: Annotated[
        IouKind,
        typer.Option(
            "--criterion",
            "--match-metric",
            help="The overlap compared with --iou (and decaying soft scores): iou, giou (generalised), "
            "diou (distance), ciou (complete), ios (intersection over the smaller box). --method diou is "
            "hard with --criterion diou; nmm and greedy-nmm match by iou or ios (--match-metric, SAHI's name).",
        ),
    ] = "iou",
    class_iou: Annotated[
        str | None,
        typer.Option(
            "--class-iou",
            metavar="FILE|JSON",
            help='Per-class --iou, e.g. \'{"1": 0.6, "person": 0.4}\': keys are category ids, or names from '
            "the --eval ground truth; other classes use --iou.",
        ),
    ] = None,
    class_score_thr: Annotated[
        str | None,
        typer.Option(
            "--class-score-thr",
            metavar="FILE|JSON",
            help="Per-class --score-thr, keyed like --class-iou; other classes use --score-thr.",
        ),
    ] = None,
    model_weights: Annotated[
        str | None,
        typer.Option(
            "--model-weights",
            metavar="W1,W2,...",
            callback=usage_check(_parse_weights),
            help="wbf/nmw: one positive weight per input, in order (default 1 each).",
        ),
    ] = None,
    skip_box_thr: Annotated[
        float,
        typer.Option(
            "--skip-box-thr", min=0.0, metavar="S", help="wbf/nmw: leave out boxes scoring below S (ensemble-boxes')."
        ),
    ] = 0.0,
    conf_type: Annotated[
        ConfType, typer.Option("--conf-type", help="wbf: how a fused box's score is made (ensemble-boxes' conf_type).")
    ] = "avg",
    soft_fn: Annotated[SoftFunction, typer.Option("--soft-fn", help="Soft-NMS decay.")] = "gaussian",
    sigma: Annotated[
        float, typer.Option("--sigma", metavar="SIGMA", help="Gaussian Soft-NMS: s *= exp(-IoU^2 / sigma).")
    ] = 0.5,
    box_format: Annotated[BoxFormat, typer.Option("--box-format", help="bbox layout (xywh: COCO).")] = "xywh",
    output_format: Annotated[
        DetectionsFormat | None, typer.Option("--output-format", help="Default: the input's format.")
    ] = None,
    skip_invalid: Annotated[
        bool,
        typer.Option(
            "--skip-invalid", help="Drop invalid records (counted on stderr) instead of stopping at the first."
        ),
    ] = False,
    eval_path: Annotated[
        str | None,
        typer.Option(
            "--eval",
            metavar="GT.json",
            help="COCO ground truth: print AP, AP50, AP75, AR@100 of input and output (pycocotools) on stderr.",
        ),
    ] = None,
    device: Annotated[
        NmsDevice,
        typer.Option("--device", help="cpu (default, fastest here) or cuda (hard NMS with torchvision's kernel)."),
    ] = "cpu",
    ray: Annotated[
        bool,
        typer.Option(
            "--ray",
            help="Run on the Ray cluster this machine belongs to (or RAY_ADDRESS): INPUTs are shards (files, "
            "globs, folders) readable from every node; -o names a folder for output shards and a manifest.",
        ),
    ] = False,
    ray_address: RayAddressOption = None,
    shards: Annotated[
        int | None, typer.Option("--shards", min=1, metavar="N", help="With --ray: output files (default: as inputs).")
    ] = None,
    tmp_dir: Annotated[
        str | None,
        typer.Option(
            "--tmp-dir",
            metavar="DIR",
            help="Where a large JSON Lines input whose images are not grouped is partitioned (default: the "
            "system's temporary folder, $TMPDIR); removed when done, on error or Ctrl-C.",
        ),
    ] = None,
    batch: Annotated[
        str,
        typer.Option(
            "--batch",
            metavar="SIZE",
            callback=usage_check(_parse_batch),
            help="JSON Lines input larger than SIZE is run in batches of whole images of about SIZE of JSON: "
            "memory stays near 25 x SIZE whatever the file's size.",
        ),
    ] = "16MiB",
    force: Annotated[bool, typer.Option("--force", help="Replace the -o FILE if it exists (never the input).")] = False,
    json_output: Annotated[
        bool,
        typer.Option(
            "--json",
            help="Print the summary (counts per class, time, evaluation) as JSON on stdout; "
            "needs -o FILE for the detections.",
        ),
    ] = False,
) -> None:

    from ptools.core import detections as core

    started = time.perf_counter()
    if ray or ray_address is not None:
        _on_ray(
            sources, destination, ray_address, shards, force, skip_invalid, json_output,
            refused={"--eval": eval_path, "--class-iou": class_iou, "--class-score-thr": class_score_thr,
                     "--model-weights": model_weights, "--output-format": output_format, "--tmp-dir": tmp_dir},
            options=dict(method=method, iou_threshold=(0.55 if method in core.FUSION_METHODS else 0.5)
                         if iou is None else iou, score_threshold=score_thr, soft_fn=soft_fn, sigma=sigma,
                         max_det=max_det, agnostic=agnostic, box_format=box_format, device=device,
                         criterion=criterion, skip_box_threshold=skip_box_thr, conf_type=conf_type),
        )  # fmt: skip
        return
    if shards is not None:
        raise BadInputError("--shards sets the output files of a --ray run; add --ray")
    if iou is not None and method == "soft" and soft_fn == "gaussian":
        raise BadInputError(
            "--iou has no effect on gaussian Soft-NMS (every overlap decays the score by exp(-IoU^2 / sigma))",
            "tune --sigma, or use --soft-fn linear, which decays above --iou",
        )
    fusing = method in core.FUSION_METHODS
    weights = _parse_weights(model_weights) if model_weights is not None else None
    # Before any file is read: options the method would ignore are refused.
    core.check_method_options(
        method, score_thr, criterion, weights, skip_box_thr, conf_type, agnostic,
        class_iou is not None, class_score_thr is not None,
    )  # fmt: skip
    if weights is not None and len(weights) != len(sources):
        raise BadInputError(f"--model-weights has {len(weights)} weight(s) for {len(sources)} input(s)")
    if sources.count("-") > 1:
        raise BadInputError("stdin (-) can be only one of the inputs")
    if json_output and destination == "-":
        raise BadInputError("--json prints the summary on stdout; write the detections with -o FILE")
    for source in sources:
        if (
            destination != "-"
            and source != "-"
            and os.path.exists(destination)
            and os.path.exists(source)
            and os.path.samefile(source, destination)
        ):
            raise BadInputError(f"--output {destination} is the input file {source}", "write to another path")
    if destination != "-" and os.path.lexists(destination) and path_kind(destination) != "file":
        raise BadInputError(
            f"--output {destination}: {path_kind(destination)}; -o takes a file path",
            "name the output file, e.g. out.json",
        )
    if destination != "-" and os.path.lexists(destination) and not force:
        raise BadInputError(f"--output {destination} exists", "pass --force to replace it, or choose another path")
    if eval_path is not None:
        require_regular_file(eval_path, "ground-truth file")
    if tmp_dir is not None and path_kind(tmp_dir) != "folder":
        raise BadInputError(f"--tmp-dir {tmp_dir}: not a folder", "name an existing folder")
    # What every path passes to the core, whatever reads the records.
    options: dict[str, Any] = dict(
        method=method, iou_threshold=(0.55 if fusing else 0.5) if iou is None else iou, score_threshold=score_thr,
        soft_fn=soft_fn, sigma=sigma, max_det=max_det, agnostic=agnostic, box_format=box_format, device=device,
        criterion=criterion, model_weights=weights, skip_box_threshold=skip_box_thr, conf_type=conf_type,
    )  # fmt: skip
    batch_bytes = _parse_batch(batch)
    with contextlib.ExitStack() as stack:
        # One JSON Lines input larger than --batch runs in bounded memory (not with --eval,
        # whose evaluator holds every record anyway).
        stream_from, head = (
            _streaming_source(sources[0], batch_bytes, tmp_dir, stack)
            if len(sources) == 1 and eval_path is None
            else (None, None)
        )
        if stream_from is not None:
            tables = {option: None if text is None else _load_table(text, flag)
                      for option, text, flag in (("class_iou", class_iou, "--class-iou"),
                                                 ("class_score_threshold", class_score_thr, "--class-score-thr"))}  # fmt: skip
            report = _stream(
                stream_from, destination, stack, source="stdin" if sources[0] == "-" else sources[0],
                output_format=output_format or "jsonl", skip_invalid=skip_invalid, batch_bytes=batch_bytes,
                tmp_dir=tmp_dir, **tables, **options,
            )  # fmt: skip
        else:
            report = _in_memory(
                sources, head, destination, options, output_format, skip_invalid, class_iou, class_score_thr, eval_path
            )
    report.seconds = time.perf_counter() - started
    # The detections went to -o FILE or stdout; what remains is the account: JSON on stdout,
    # or lines for people on stderr.
    output.emit(report.to_dict(), json_output, lambda data: [])
    if not json_output:
        _summary(report.to_dict())


def _on_ray(
    sources: list[str],
    destination: str,
    ray_address: str | None,
    shards: int | None,
    force: bool,
    skip_invalid: bool,
    json_output: bool,
    refused: dict[str, Any],
    options: dict[str, Any],
) -> None:
    """``--ray``: the shards through Ray Data, the same NMS per image, output shards and a manifest."""
    from ptools.core.ray_nms import nms_on_ray

    given = [flag for flag, value in refused.items() if value is not None]
    if given:
        raise BadInputError(f"{', '.join(given)} do not work with --ray yet", "run on one machine for those")
    if "-" in sources:
        raise BadInputError("--ray reads shards from files every node can read; stdin (-) cannot be one")
    if destination == "-":
        raise BadInputError("--ray writes output shards: give -o FOLDER", "e.g. -o nms_out/")
    report = nms_on_ray(
        sources, destination, ray_address=ray_address, shards=shards, skip_invalid=skip_invalid, force=force, **options
    )
    data = report.to_dict()
    output.emit(data, json_output, lambda shown: [])
    if not json_output:
        output.info(
            f"nms on Ray: {data['records_in']:,} records of {data['images']:,} images from {len(data['inputs'])} "
            f"shard(s) -> {data['records_out']:,} kept in {len(data['shards'])} shard(s) + manifest.json in "
            f"{destination} ({data['seconds']['total']:.1f} s)"
        )


def _in_memory(
    sources: list[str],
    head: bytes | None,
    destination: str,
    options: dict[str, Any],
    output_format: str | None,
    skip_invalid: bool,
    class_iou: str | None,
    class_score_thr: str | None,
    eval_path: str | None,
) -> Any:
    """Every input read whole, run, evaluated (--eval) and written."""
    import numpy as np

    from ptools.core import detections as core

    records: list[Any] = []
    model_of: list[int] = []
    input_format = None
    origins: list[tuple[str, int]] = []
    for number, source in enumerate(sources):
        data = head if head is not None and number == 0 else _read(source)
        parsed, parsed_format = core.parse_detections(data, "stdin" if source == "-" else source)
        del data
        input_format = input_format or parsed_format
        records.extend(parsed)
        model_of.extend([number] * len(parsed))
        origins.append(("stdin" if source == "-" else source, len(parsed)))
    assert input_format is not None
    detections = core.validate(
        records,
        box_format=options["box_format"],
        skip_invalid=skip_invalid,
        sources=origins if len(sources) > 1 else None,
    )
    names = _category_names(eval_path) if eval_path is not None and (class_iou or class_score_thr) else None
    tables = [
        None
        if text is None
        else core.resolve_class_table(_load_table(text, flag), detections.category_ids, names, flag)
        for text, flag in ((class_iou, "--class-iou"), (class_score_thr, "--class-score-thr"))
    ]
    models = np.asarray(model_of, dtype=np.int64)[detections.index] if len(sources) > 1 else None
    kept, report = core.run_nms(
        detections,
        models=models,
        # Every input is a model, records or not: ensemble-boxes divides by the number of inputs.
        model_count=len(sources) if len(sources) > 1 else None,
        class_iou=tables[0],
        class_score_threshold=tables[1],
        # The records were parsed for this run: soft/merge may update them in place, unless
        # the evaluation still needs them as they were read.
        keep_input=eval_path is not None,
        **options,
    )
    if eval_path is not None:
        valid = detections.index.tolist()
        if len(sources) == 1:
            inputs = {"input": [records[i] for i in valid]}
        else:  # each input on its own, then the output: what fusing them bought
            number_of = np.asarray(model_of)
            inputs = {f"input {n + 1} ({source})": [records[i] for i in valid if number_of[i] == n]
                      for n, source in enumerate(sources)}  # fmt: skip
        metrics = core.evaluate(eval_path, *inputs.values(), kept)
        report.evaluation = {**dict(zip(inputs, metrics)), "output": metrics[-1]}
    payload = core.dump_detections(kept, output_format or input_format)
    if destination == "-":
        sys.stdout.buffer.write(payload)
        sys.stdout.buffer.flush()
    else:
        from ptools.core.files import write_atomically

        write_atomically(destination, lambda handle: handle.write(payload))
    return report


def _streaming_source(
    source: str, batch: int, tmp_dir: str | None, stack: contextlib.ExitStack
) -> tuple[str | None, bytes | None]:
    """``(path to stream from, None)`` for JSON Lines larger than ``batch`` (stdin spooled to a
    temporary file first), else ``(None, what was read of stdin already or None)``."""
    if source != "-":
        require_regular_file(source, "detections file")
        try:
            if os.path.getsize(source) <= batch:
                return None, None
            with open(source, "rb") as handle:
                start = handle.read(1 << 16).lstrip()
        except OSError as failure:
            raise BadInputError(f"cannot read {source}: {failure.strerror or failure}") from None
        return (source if start[:1] == b"{" else None), None
    head = sys.stdin.buffer.read(batch + 1)
    if len(head) <= batch or head.lstrip()[:1] != b"{":
        return None, head + sys.stdin.buffer.read()
    import shutil
    import tempfile

    try:
        folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="ptools-nms-", dir=tmp_dir))
        spool = os.path.join(folder, "stdin.jsonl")
        with open(spool, "wb") as handle:
            handle.write(head)
            del head
            shutil.copyfileobj(sys.stdin.buffer, handle, 1 << 22)
    except OSError as failure:
        raise BadInputError(
            f"cannot copy stdin to {tmp_dir or tempfile.gettempdir()}: {failure.strerror or failure}",
            "free space there, or name another folder with --tmp-dir",
        ) from None
    return spool, None


def _stream(path: str, destination: str, stack: contextlib.ExitStack, **settings: Any) -> Any:
    """:func:`ptools.core.streaming.stream_nms` into -o FILE (atomically) or, through a
    temporary file, stdout: an error on the last record leaves nothing half-written."""
    import shutil
    import tempfile

    from ptools.core.files import write_atomically
    from ptools.core.streaming import stream_nms

    with _progress() as progress:
        if destination != "-":
            reports: list[Any] = []
            write_atomically(
                destination, lambda handle: reports.append(stream_nms(path, handle, progress=progress, **settings))
            )
            return reports[0]
        try:
            folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="ptools-nms-", dir=settings["tmp_dir"]))
            handle = open(os.path.join(folder, "out"), "w+b")  # noqa: SIM115
        except OSError as failure:
            where = settings["tmp_dir"] or tempfile.gettempdir()
            raise BadInputError(f"cannot write temporary files in {where}: {failure.strerror or failure}") from None
        with handle:
            try:
                report = stream_nms(path, handle, progress=progress, **settings)
            except OSError as failure:  # writing the kept records
                raise BadInputError(f"cannot write the output in {folder}: {failure.strerror or failure}") from None
            handle.seek(0)
            shutil.copyfileobj(handle, sys.stdout.buffer, 1 << 22)
        sys.stdout.buffer.flush()
        return report


@contextlib.contextmanager
def _progress() -> Iterator[Any]:
    """A progress callback drawing a bar on stderr when it is a terminal (records/s, images
    done), None otherwise."""
    if not sys.stderr.isatty():
        yield None
        return
    from rich.progress import BarColumn, Progress, TextColumn

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        TextColumn("{task.fields[records]:,} records ({task.fields[rate]:,.0f}/s), {task.fields[images]:,} images"),
        console=output.stderr_console(),
        transient=True,
    ) as bar:
        task = bar.add_task("reading", total=None, records=0, rate=0.0, images=0)
        began = {"reading": time.perf_counter()}  # the pass under way, and when it began

        def update(phase: str, done: int, total: int, records: int, images: int) -> None:
            stage = phase.split()[0]  # "partitioning", then "running" (part N/M)
            if stage not in began:
                began.clear()
                began[stage] = time.perf_counter()
            rate = records / max(time.perf_counter() - began[stage], 1e-9)
            bar.update(task, description=phase, completed=done, total=total, records=records, rate=rate, images=images)

        yield update


def _load_table(text: str, flag: str) -> dict[str, Any]:
    """A per-class table given inline as JSON or as a JSON file."""
    import orjson

    raw = text.encode() if text.lstrip().startswith("{") else None
    if raw is None:
        require_regular_file(text, f"{flag} file", "give a JSON object inline or a JSON file")
        with open(text, "rb") as handle:
            raw = handle.read((1 << 20) + 1)
        if len(raw) > 1 << 20:
            raise BadInputError(f"{flag} {text}: larger than 1 MiB; a per-class table is a small JSON object")
    try:
        table = orjson.loads(raw)
    except orjson.JSONDecodeError as failure:
        raise BadInputError(f"{flag}: not valid JSON ({failure})") from None
    if not isinstance(table, dict):
        raise BadInputError(f"{flag}: expected a JSON object of class -> value")
    return table


def _category_names(ground_truth: str) -> dict[str, Any]:
    """Category name -> id from COCO ground truth, for per-class tables keyed by name."""
    import orjson

    try:
        with open(ground_truth, "rb") as handle:
            categories = orjson.loads(handle.read()).get("categories") or []
    except (OSError, orjson.JSONDecodeError, AttributeError):
        return {}
    return {c["name"]: c["id"] for c in categories if isinstance(c, dict) and "name" in c and "id" in c}


def _read(source: str) -> bytes:
    if source == "-":
        return sys.stdin.buffer.read()
    require_regular_file(source, "detections file")
    try:
        with open(source, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        raise BadInputError(f"{source}: no such file") from None
    except OSError as failure:
        raise BadInputError(f"cannot read {source}: {failure.strerror or failure}") from None


def _summary(data: dict[str, Any]) -> None:
    """One line always; a per-class table and the evaluation on a terminal or with --eval."""
    skipped = f" ({data['skipped']} invalid skipped)" if data["skipped"] else ""
    output.info(
        f"nms {data['method']} ({data['rule']}): {data['images']} images, "
        f"{data['detections_in']:,} → {data['detections_out']:,} detections{skipped}, "
        f"{data['seconds']:.2f} s" + (f", streamed ({data['streamed']})" if data.get("streamed") else "")
    )
    if sys.stderr.isatty() and data["per_class"]:
        output.stderr_console().print(
            output.make_table(
                "Detections per class",
                ["category_id", ("in", "right"), ("out", "right")],
                [(c, f"{a:,}", f"{b:,}") for c, (a, b) in data["per_class"].items()],
            )
        )
    elif data["per_class"]:
        output.info("per class (in→out): " + ", ".join(f"{c}: {a}→{b}" for c, (a, b) in data["per_class"].items()))
    evaluation = data["evaluation"]
    if evaluation:
        columns = [key for key in evaluation if key != "output"]
        rows = [
            (
                name,
                *(f"{evaluation[key][name]:.4f}" for key in columns),
                f"{evaluation['output'][name]:.4f}",
                f"{evaluation['output'][name] - max(evaluation[key][name] for key in columns):+.4f}",
            )
            for name in ("AP", "AP50", "AP75", "AR@100")
        ]
        change = "change" if len(columns) == 1 else "vs best input"
        output.stderr_console().print(
            output.make_table(
                "COCO bbox evaluation (pycocotools)",
                ["metric", *((key, "right") for key in columns), ("output", "right"), (change, "right")],
                rows,
            )
        )
