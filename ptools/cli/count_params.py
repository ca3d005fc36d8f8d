"""``ptools count-params``: parameters of a model, or of a checkpoint without a model."""

from __future__ import annotations

import os
from typing import Annotated, Any

import typer

from ptools.cli import output
from ptools.cli.help_format import command_help
from ptools.cli.options import DepthOption, JsonOption, KwargsOption, TagOption, TrustOption, usage_check
from ptools.core.summary import parse_input_size
from ptools.core.units import format_bytes

NAME = "count-params"
SHORT_HELP = "Count parameters (total, trainable, frozen, buffers, by dtype, per module) of a model or a checkpoint."
DETAILS = "MODEL_OR_CHECKPOINT is a model spec (resnet50, torchvision:NAME, timm:NAME, package.module:factory, file.py:Class, a TorchScript or .pt2 file) or a checkpoint file: then nothing is built and no tensor data is read, and parameters vs buffers are inferred from names. Tied parameters count once."
EXAMPLES = [
    "ptools count-params resnet50",
    "ptools count-params vit_b_16 --depth 2 --json",
    "ptools count-params run/last.ckpt",
    "ptools count-params models.py:Net --kwargs '{\"width\": 64}'",
    "ptools count-params models.py:LazyNet --input-size 3,32,32",
]
HELP = command_help(SHORT_HELP, DETAILS, EXAMPLES)


def command(
    target: Annotated[
        str,
        typer.Argument(
            metavar="MODEL_OR_CHECKPOINT", show_default=False, help="A model spec or a checkpoint file/folder."
        ),
    ],
    depth: DepthOption = 1,
    key: Annotated[
        str, typer.Option("--key", metavar="KEY", help="Checkpoints: where the state dict is ('auto' finds it).")
    ] = "auto",
    kwargs: KwargsOption = None,
    input_size: Annotated[
        list[str] | None,
        typer.Option(
            "--input-size",
            metavar="C,H,W",
            callback=usage_check(parse_input_size),
            help="Models with lazy modules (nn.LazyLinear, nn.LazyConv2d, ...): one input's size without the batch dimension, to initialise them; repeatable.",
        ),
    ] = None,
    tag: TagOption = None,
    trust: TrustOption = False,
    json_output: JsonOption = False,
) -> None:
    from ptools.core import models

    checkpoint = None
    if os.path.lexists(target) and not target.endswith((".py", ".pt2")):
        from ptools.core.checkpoint import open_checkpoint
        from ptools.errors import UnsafeFileError

        try:  # opened once; with --trust a whole pickled model is read as its state dict
            checkpoint = open_checkpoint(target, trust=trust, tag=tag)
        except UnsafeFileError as failure:
            raise models.whole_model_refused(target, failure) from None
    if checkpoint is not None and checkpoint.format != "torchscript":
        result = models.count_checkpoint(checkpoint, key=key, depth=depth)
    else:
        # Library models are built on the meta device: exact counts, no memory, no init time.
        device = "meta" if models.is_library_model(target) else None
        model = models.load_model(target, models.parse_kwargs(kwargs), trust=trust, device=device)
        sizes = [parse_input_size(text) for text in input_size or []]
        result = models.count_model(model, depth=depth, input_sizes=sizes)
    data = result.to_dict()
    output.emit(data, json_output, render)
    if data["uninitialized"] and not json_output:
        shown = ", ".join(data["uninitialized"][:4]) + (" …" if len(data["uninitialized"]) > 4 else "")
        output.info(
            f"note: {len(data['uninitialized'])} tensor(s) of lazy modules are not initialised ({shown}): "
            "their sizes are unknown until the first input, and the counts leave them out; "
            "pass --input-size to initialise them"
        )
    if data["inferred_from_names"] and not json_output:
        output.info(
            "note: counted from a checkpoint: parameters vs buffers inferred from names "
            "(running_mean, running_var, num_batches_tracked are buffers)"
        )


def render(data: dict[str, Any]) -> list[Any]:
    """Rich renderables for a count (the same data --json prints)."""
    from ptools.core.models import human

    def number(value: int | None) -> str:
        if value is None:
            return "unknown (a state dict does not record requires_grad)"
        return f"{value:,}" + (f" ({human(value)})" if value >= 1000 else "")

    rows = [
        ("parameters", number(data["total"])),
        ("trainable", number(data["trainable"])),
        ("frozen", number(data["frozen"])),
        ("buffers", number(data["buffers"])),
        ("parameter memory", format_bytes(data["parameter_bytes"])),
        ("buffer memory", format_bytes(data["buffer_bytes"])),
    ]
    rows += [(f"parameters in {dtype}", number(count)) for dtype, count in data["by_dtype"].items()]
    renderables: list[Any] = [output.make_table(f"Parameters ({data['source']})", ["", "count"], rows)]
    if data["modules"]:
        renderables.append(
            output.make_table(
                "Per module",
                [
                    "Module",
                    "Type",
                    ("Parameters", "right"),
                    ("Trainable", "right"),
                    ("Buffers", "right"),
                    ("Share", "right"),
                ],
                [
                    (
                        "  " * (m["depth"] - 1) + m["name"],
                        m["type"],
                        f"{m['parameters']:,}",
                        None if m["trainable"] is None else f"{m['trainable']:,}",
                        f"{m['buffers']:,}",
                        f"{100 * m['parameters'] / data['total']:.1f}%" if data["total"] else "-",
                    )
                    for m in data["modules"]
                ],
                optional=("Share", "Type", "Buffers", "Trainable"),
            )
        )
    return renderables
