"""``ptools summary``: a layer table with output shapes, parameters, MACs and FLOPs."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer

from ptools.cli import output
from ptools.cli.help_format import command_help
from ptools.cli.options import JsonOption, KwargsOption, StrictOption, TrustOption, WeightsOption, usage_check
from ptools.core.choices import SummaryDtype, SummaryFormat, SummaryMode, TrainOptimizer, TrainTarget
from ptools.core.summary import ForwardPassError, check_device, parse_input_size
from ptools.core.training import parse_fit, parse_sweep
from ptools.core.units import format_bytes
from ptools.errors import BadInputError

NAME = "summary"
META_FALLBACK_NOTE = (
    "note: the model does not run on the meta device (it needs values, e.g. for NMS): measured on the CPU instead"
)
SHORT_HELP = "Layer table of a model: output shapes, parameters, MACs and FLOPs from the real operations."
DETAILS = (
    "One forward pass in eval mode under no_grad (the model's modes and BatchNorm statistics are left as they were). MACs/FLOPs come from torch.utils.flop_counter (matmul, linear, convolution, attention): FLOPs = 2 x MACs. --device meta measures any model without memory or compute.\n\n"
    "--train: one training step (forward, loss, backward, optimizer step), traced on the meta device or run for real: memory by part at the peak (parameters, gradients, optimizer state, activations, temporaries) and the phase of the peak, backward FLOPs from the real backward ops, --sweep over batch or input sizes, --fit the largest batch for a memory budget."
)
EXAMPLES = [
    "ptools summary resnet50 --input-size 3,224,224",
    "ptools summary vit_b_16 --input-size 3,224,224 --depth 2 --json",
    "ptools summary vit_h_14 --input-size 3,518,518 --device meta --kwargs '{\"image_size\": 518}'",
    "ptools summary models.py:Tagger --input-spec @inputs.json",
    "ptools summary resnet18 --input-size 3,224,224 --format torchsummary",
    "ptools summary resnet50 --train --batch-size 32 --optimizer adamw --amp",
    "ptools summary vit_b_16 --train --sweep batch=1,8,32,128 --fit 24GiB",
]
HELP = command_help(SHORT_HELP, DETAILS, EXAMPLES)


def command(
    model_spec: Annotated[
        str,
        typer.Argument(
            metavar="MODEL",
            show_default=False,
            help="A model spec: resnet50, torchvision:NAME, timm:NAME, package.module:factory, file.py:Class.",
        ),
    ],
    input_size: Annotated[
        list[str] | None,
        typer.Option(
            "--input-size",
            metavar="C,H,W",
            callback=usage_check(parse_input_size),
            help="One input's size without the batch dimension; repeatable.",
        ),
    ] = None,
    batch_size: Annotated[
        int, typer.Option("--batch-size", metavar="N", min=1, help="Batch dimension added to --input-size.")
    ] = 1,
    input_spec: Annotated[
        str | None,
        typer.Option(
            "--input-spec",
            metavar="JSON",
            help='Inputs for forward(*args, **kwargs): {"args": [...], "kwargs": {...}}, tensors as '
            '{"shape": [...], "dtype": "int64", "fill": "randint", "high": N}; or @file.json.',
        ),
    ] = None,
    dtype: Annotated[SummaryDtype, typer.Option("--dtype", help="Parameter and input dtype.")] = "float32",
    device: Annotated[
        str,
        typer.Option(
            "--device",
            metavar="DEVICE",
            callback=usage_check(check_device),
            help="auto: meta for torchvision/timm models (every shape and count, no memory or compute; the CPU "
            "if the model cannot run there), else cpu; or cpu, cuda, cuda:N, meta.",
        ),
    ] = "auto",
    depth: Annotated[int, typer.Option("--depth", min=1, metavar="N", help="Module levels shown.")] = 3,
    mode: Annotated[SummaryMode, typer.Option("--mode", help="train: buffers restored after.")] = "eval",
    output_format: Annotated[
        SummaryFormat, typer.Option("--format", help="torchsummary: the classic layout, via the torchsummary package.")
    ] = "table",
    train: Annotated[
        bool,
        typer.Option(
            "--train",
            help="Cost of one training step (forward, loss, backward, optimizer step): memory by part at "
            "the peak, forward and backward FLOPs, saved activations per module.",
        ),
    ] = False,
    optimizer: Annotated[
        TrainOptimizer,
        typer.Option("--optimizer", help="With --train: adamw/adam (torch defaults), sgd (momentum 0.9)."),
    ] = "adamw",
    amp: Annotated[
        bool,
        typer.Option(
            "--amp", help="With --train: autocast to --dtype (bf16 unless fp16 is given); weights stay float32."
        ),
    ] = False,
    target: Annotated[
        TrainTarget | None,
        typer.Option(
            "--target",
            help="With --train on the meta device: the device modelled: cuda (default: allocator rounding, "
            "foreach optimizer kernels) or cpu.",
        ),
    ] = None,
    sweep: Annotated[
        str | None,
        typer.Option(
            "--sweep",
            metavar="batch=N,N|input=CxHxW,CxHxW",
            callback=usage_check(parse_sweep),
            help="With --train (implied): one row per batch size or input size.",
        ),
    ] = None,
    fit: Annotated[
        str | None,
        typer.Option(
            "--fit",
            metavar="SIZE|auto",
            callback=usage_check(parse_fit),
            help="With --train (implied): the largest batch size whose step fits SIZE (e.g. 24GiB), by "
            "bisection on the meta device; auto: the free memory of the GPU gpu-info --select 1 picks.",
        ),
    ] = None,
    kwargs: KwargsOption = None,
    weights: WeightsOption = None,
    strict: StrictOption = False,
    trust: TrustOption = False,
    json_output: JsonOption = False,
) -> None:
    from ptools.core import models

    sizes = [parse_input_size(text) for text in input_size or []]
    if train or sweep is not None or fit is not None:
        from ptools.cli import summary_train

        summary_train.run(
            summary_train.TrainRequest(
                model_spec=model_spec,
                factory_kwargs=models.parse_kwargs(kwargs),
                device=device,
                sizes=sizes,
                batch_size=batch_size,
                input_spec=input_spec,
                dtype=dtype,
                optimizer=optimizer,
                amp=amp,
                target=target,
                sweep=sweep,
                fit=fit,
                weights=weights,
                strict=strict,
                trust=trust,
            ),
            depth,
            json_output,
        )
        return
    if target is not None or amp or optimizer != "adamw":
        raise BadInputError("--optimizer, --amp and --target describe a training step: add --train")
    factory_kwargs = models.parse_kwargs(kwargs)
    chosen = device
    if device == "auto":
        # Library code on the meta device counts exactly what a CPU pass counts (tested on every
        # torchvision classifier), in a fraction of the time; user code runs where it was written to.
        real = weights is not None or output_format == "torchsummary" or not models.is_library_model(model_spec)
        chosen = "cpu" if real else "meta"

    def measure(on: str) -> dict[str, Any] | None:
        return _summarize(
            model_spec,
            factory_kwargs,
            on,
            sizes,
            batch_size,
            input_spec,
            dtype,
            mode,
            output_format,
            weights,
            strict,
            trust,
        )

    try:
        data = measure(chosen)
    except BadInputError as failure:
        if not (device == "auto" and chosen == "meta" and isinstance(failure, ForwardPassError)):
            raise
        # The note only when the meta device was the cause: a CPU pass that fails as well is
        # the model's (or the input's) error, reported alone.
        data = measure("cpu")
        output.info(META_FALLBACK_NOTE)
    if data is None:
        return
    output.emit(data, json_output, lambda shown: render(shown, depth))
    if not json_output:
        for note in data["notes"]:
            output.info(f"note: {note}")


def _summarize(
    model_spec: str,
    factory_kwargs: dict[str, Any],
    device: str,
    sizes: list[tuple[int, ...]],
    batch_size: int,
    input_spec: str | None,
    dtype: str,
    mode: SummaryMode,
    output_format: str,
    weights: str | None,
    strict: bool,
    trust: bool,
) -> dict[str, Any] | None:
    """Build the model on ``device``, feed it and measure it; None when the torchsummary layout
    was printed instead."""
    import torch

    from ptools.core import models
    from ptools.core import summary as core

    device = core.model_device(device)
    model = models.load_model(model_spec, factory_kwargs, trust=trust, device="meta" if device == "meta" else None)
    weights_report = models.load_weights(model, weights, strict=strict, trust=trust) if weights else None
    torch_dtype = core.torch_dtype(dtype)
    model = model.to(device=device, dtype=torch_dtype)  # ptools made this model: it may move it
    args: list[Any] | None = None
    call_kwargs: dict[str, Any] = {}
    if not sizes and input_spec is None:
        args, call_kwargs, where = _default_inputs(model_spec, model, batch_size, torch.device(device), torch_dtype)
        sizes = [tuple(a.shape[1:]) for a in args]
        output.info(f"input: {where} (--input-size or --input-spec to choose another)")
    if output_format == "torchsummary":
        if input_spec is not None or call_kwargs:
            raise BadInputError("--format torchsummary takes --input-size (it cannot feed kwargs or dicts)")
        sys.stdout.write(core.torchsummary_text(model, sizes, batch_size, device.split(":")[0]))
        return None
    if args is None:
        args, call_kwargs = core.make_inputs(sizes, batch_size, input_spec, torch.device(device), torch_dtype)
    data = core.summarize(model, args, call_kwargs, mode=mode, name=model_spec).to_dict()
    if weights_report is not None:
        data["weights"] = weights_report.to_dict()
    return data


def _default_inputs(
    spec: str, model: Any, batch_size: int, device: Any, dtype: Any
) -> tuple[list[Any], dict[str, Any], str]:
    """Inputs when none are given: an exported program's own example inputs, or the input size
    a library model's published weights were made for.

    Raises:
        BadInputError: nothing is known; the user must say.
    """
    import torch

    from ptools.core import models

    example = getattr(model, "ptools_example_inputs", None)
    if example is not None:
        args, kwargs = example

        def move(t: Any) -> Any:
            if not isinstance(t, torch.Tensor):
                return t
            return t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)

        return (
            [move(a) for a in args],
            {k: move(v) for k, v in kwargs.items()},
            "the example inputs stored in the exported program",
        )
    known = models.default_input_size(spec, model)
    if known is None:
        raise BadInputError(
            "give --input-size (e.g. 3,224,224) or --input-spec", "no input size is published for this model"
        )
    size, where = known
    return [torch.randn((batch_size, *size), device=device, dtype=dtype)], {}, f"{'x'.join(map(str, size))}, {where}"


def _count(value: int | None) -> str:
    from ptools.core.models import human

    if value is None:
        return "?"
    return f"{value:,}" if value < 1000 else f"{human(value)}"


def _shapes(row: dict[str, Any]) -> str:
    """Output shapes of a module: one shape, or each distinct one, with the number of calls."""
    from ptools.core.summary import SHAPES_KEPT, shape_text

    shapes = row["outputs"]
    if not shapes:
        return "-"
    text = " | ".join(shape_text(shape) for shape in shapes)
    if len(shapes) == SHAPES_KEPT:
        text += " | …"
    return text if row["calls"] <= 1 else f"{text} ({row['calls']} calls)"


def render(data: dict[str, Any], depth: int) -> list[Any]:
    """Rich renderables for a summary (the same data --json prints)."""
    from ptools.core.summary import shape_text

    totals = data["totals"]
    rows = []
    for row in data["rows"]:
        if not (0 < row["depth"] <= depth and (row["calls"] or row["parameters"])):
            continue
        share = f"{100 * row['macs'] / totals['macs']:.1f}%" if totals["macs"] and row["macs"] is not None else "-"
        rows.append(
            (
                "  " * (row["depth"] - 1) + row["name"],
                row["type"],
                _shapes(row),
                _count(row["parameters"]),
                _count(row["trainable"]),
                _count(row["macs"]),
                _count(row["flops"]),
                share,
            )
        )
    renderables: list[Any] = [
        output.make_table(
            f"{data['model']} ({data['mode']} mode, {data['device']}, {data['dtype']})",
            [
                "Module",
                "Type",
                "Output shape",
                ("Params", "right"),
                ("Trainable", "right"),
                ("MACs", "right"),
                ("FLOPs", "right"),
                ("MACs %", "right"),
            ],
            rows,
            optional=("FLOPs", "Trainable", "MACs %", "Type"),
        )
    ]
    summary_rows = [
        (
            "parameters",
            f"{totals['parameters']:,}"
            + (f" ({totals['tied_names']} tied name(s): each weight once)" if totals.get("tied_names") else ""),
        ),
        ("trainable / non-trainable", f"{totals['trainable']:,} / {totals['non_trainable']:,}"),
        ("buffers", f"{totals['buffers']:,}"),
        ("parameter memory", format_bytes(totals["parameter_bytes"])),
        (
            "activation memory (estimate)",
            "unknown" if totals["activation_bytes"] is None else format_bytes(totals["activation_bytes"]),
        ),
        ("input size", format_bytes(totals["input_bytes"])),
        ("MACs", f"{totals['macs']:,} ({totals['macs'] / 1e9:.3f} G)"),
        ("FLOPs (2 × MACs)", f"{totals['flops']:,} ({totals['flops'] / 1e9:.3f} G)"),
        ("output", shape_text(data["output"])),
    ]
    renderables.append(
        output.make_table("Totals (KiB, MiB, GiB = 2^10, 2^20, 2^30 bytes)", ["", "value"], summary_rows)
    )
    renderables += output.weights_report_lines(data.get("weights"))
    return renderables
