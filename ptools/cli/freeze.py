"""``ptools freeze``: freeze layers (and BatchNorm) by name pattern, and report what changed."""

from __future__ import annotations

import json
import os
from typing import Annotated, Any

import typer

from ptools.cli import output
from ptools.cli.help_format import command_help
from ptools.cli.options import JsonOption, KwargsOption, StrictOption, TrustOption, WeightsOption
from ptools.core.choices import BatchNormMode
from ptools.errors import BadInputError

NAME = "freeze"
SHORT_HELP = "Freeze layers by glob on module names, BatchNorm included; report frozen vs trainable; save."
DETAILS = "Patterns are globs on dotted module names (backbone.*, layer1, *.bn*), matched on dotted boundaries (layer1 does not match layer10), with or without a module. wrapper prefix. A pattern that matches nothing is an error. --bn frozen (default) replaces BatchNorm in the frozen part with FrozenBatchNorm so a later model.train() cannot update its statistics."
EXAMPLES = [
    "ptools freeze resnet50 --layers conv1,bn1,layer1,layer2 --dry-run",
    "ptools freeze resnet50 --layers 'layer*' --except layer4 --trainable-out trainable.json",
    "ptools freeze models.py:Net --weights last.ckpt --layers 'backbone.*' --out frozen.pt",
]
HELP = command_help(SHORT_HELP, DETAILS, EXAMPLES)


def _check_outputs(model_spec: str, weights: str | None, outputs: dict[str, str | None], force: bool) -> None:
    """Before any work: an output is never an input (the weights, the model's .py file), never
    a folder, never the other output, and an existing file only with --force."""
    from ptools.core.files import is_one_of, path_kind

    module_file = model_spec.split(":", 1)[0]
    inputs = {os.path.realpath(p) for p in (weights, module_file if module_file.endswith(".py") else None) if p}
    given = {flag: path for flag, path in outputs.items() if path}
    if len(given) == 2 and os.path.realpath(given["--out"]) == os.path.realpath(given["--trainable-out"]):
        raise BadInputError("--out and --trainable-out name the same file", "give each its own path")
    for flag, path in given.items():
        if is_one_of(path, inputs):
            raise BadInputError(
                f"{flag} {path} is an input; ptools never overwrites its input", "write to another path"
            )
        if os.path.lexists(path) and path_kind(path) != "file":
            raise BadInputError(f"{flag} {path}: {path_kind(path)}; {flag} takes a file path")
        if os.path.lexists(path) and not force:
            raise BadInputError(f"{flag} {path} exists", "pass --force to replace it, or choose another path")


def command(
    model_spec: Annotated[
        str,
        typer.Argument(
            metavar="MODEL",
            show_default=False,
            help="A model spec: resnet50, torchvision:NAME, timm:NAME, package.module:factory, file.py:Class.",
        ),
    ],
    layers: Annotated[
        list[str],
        typer.Option("--layers", metavar="PATTERN", help="Modules to freeze (globs; repeatable or comma-separated)."),
    ],
    except_: Annotated[
        list[str] | None,
        typer.Option("--except", metavar="PATTERN", help="Modules to keep trainable inside the frozen part."),
    ] = None,
    bn: Annotated[
        BatchNormMode,
        typer.Option("--bn", help="frozen: replace with FrozenBatchNorm; eval: eval mode; none: leave them."),
    ] = "frozen",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Report only; change nothing.")] = False,
    out: Annotated[
        str | None,
        typer.Option(
            "--out",
            metavar="FILE",
            help="Save the frozen whole module (loading it needs torch.load(weights_only=False) or ptools --trust).",
        ),
    ] = None,
    trainable_out: Annotated[
        str | None,
        typer.Option(
            "--trainable-out", metavar="FILE.json", help="Write the trainable parameter names, for an optimizer config."
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Replace an existing --out / --trainable-out file (never an input).")
    ] = False,
    kwargs: KwargsOption = None,
    weights: WeightsOption = None,
    strict: StrictOption = False,
    trust: TrustOption = False,
    json_output: JsonOption = False,
) -> None:
    from ptools.core import models
    from ptools.core.files import write_atomically

    if dry_run and (out or trainable_out):
        raise BadInputError("--dry-run writes nothing; drop --out/--trainable-out or --dry-run")
    _check_outputs(model_spec, weights, {"--out": out, "--trainable-out": trainable_out}, force)
    model = models.load_model(model_spec, models.parse_kwargs(kwargs), trust=trust)
    # Refused before any work when the saved module could not be loaded back.
    folders = models.user_code_folders(model) if out else []
    weights_report = models.load_weights(model, weights, strict=strict, trust=trust) if weights else None
    report = models.freeze(model, models.iter_patterns(layers), models.iter_patterns(except_), bn=bn, dry_run=dry_run)
    data = report.to_dict()
    if weights_report is not None:
        data["weights"] = weights_report.to_dict()
    if out:
        import torch

        write_atomically(out, lambda handle: torch.save(model, handle))
        data["saved"] = {"file": out, "pythonpath": folders, "load": f"torch.load({out!r}, weights_only=False)"}
    if trainable_out:
        names = models.trainable_names(model)
        write_atomically(trainable_out, lambda handle: handle.write(json.dumps(names, indent=2).encode()))
    output.emit(data, json_output, render)
    if out and not json_output:
        where = (
            f" with {os.pathsep.join(folders)} on sys.path (e.g. PYTHONPATH={os.pathsep.join(folders)})"
            if folders
            else ""
        )
        output.info(
            f"saved {out}: the whole module, pickled; load it with torch.load({out!r}, "
            f"weights_only=False){where}, or ptools --trust. It needs ptools installed (FrozenBatchNorm)"
            if data["batchnorm_replaced"]
            else f"saved {out}: the whole module, pickled; load it with torch.load({out!r}, "
            f"weights_only=False){where}, or ptools --trust"
        )


def render(data: dict[str, Any]) -> list[Any]:
    """Rich renderables for a freeze report (the same data --json prints)."""
    rows = [
        (m["name"], m["type"], f"{m['parameters']:,}", f"{m['trainable_before']:,}", f"{m['trainable_after']:,}")
        for m in data["frozen_modules"]
    ]
    title = "Would freeze" if data["dry_run"] else "Frozen"
    renderables: list[Any] = [
        output.make_table(
            title,
            ["Module", "Type", ("Parameters", "right"), ("Trainable before", "right"), ("Trainable after", "right")],
            rows,
        )
    ]
    frozen = data["trainable_before"] - data["trainable_after"]
    renderables.append(
        f"trainable: {data['trainable_before']:,} → {data['trainable_after']:,} of {data['total']:,} parameters "
        f"({frozen:,} frozen); BatchNorm: {data['batchnorm']}"
        + (f", {len(data['batchnorm_replaced'])} replaced with FrozenBatchNorm" if data["batchnorm_replaced"] else "")
        + (f", {len(data['batchnorm_eval'])} set to eval" if data["batchnorm_eval"] else "")
    )
    renderables += output.weights_report_lines(data.get("weights"))
    return renderables
