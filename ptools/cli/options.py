"""Options shared by several commands, defined once."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

import typer

from ptools.core.choices import ZeroWeights
from ptools.errors import BadInputError


def usage_check(parse: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """A Typer callback running a core parser on an option's value at parse time, so a
    malformed value (a size, a device, JSON) is a usage error (exit 2) like an unknown choice.
    The value itself is passed on unchanged."""

    def callback(value: Any) -> Any:
        if value is None:
            return value
        try:
            for item in value if isinstance(value, list) else [value]:
                parse(item)
        except BadInputError as failure:
            from ptools.cli.wording import cli_words

            raise typer.BadParameter(cli_words(str(failure))) from None
        return value

    return callback


RayAddressOption = Annotated[
    str | None,
    typer.Option(
        "--ray-address",
        metavar="HOST:PORT",
        help="The Ray cluster to use (default: the one this machine belongs to, or RAY_ADDRESS); implies --ray.",
    ),
]

JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout instead of tables.")]

NdjsonOption = Annotated[
    bool, typer.Option("--ndjson", help="Print one JSON object per line (per tensor), for streaming into jq.")
]


def _trusting(value: bool) -> bool:
    """With --trust, classes a file names are imported as ``torch.load`` in ``python -c`` would
    find them: the current folder joins the end of ``sys.path`` (never ahead of installed
    packages)."""
    if value:
        import os
        import sys

        if os.getcwd() not in sys.path:
            sys.path.append(os.getcwd())
    return value


TrustOption = Annotated[
    bool,
    typer.Option(
        "--trust",
        callback=_trusting,
        help="Allow pickled objects outside the safe allowlist. This RUNS CODE from the file: "
        "only for files you made or trust.",
    ),
]


def _parse_kwargs(text: str) -> Any:
    from ptools.core.models import parse_kwargs

    return parse_kwargs(text)


KwargsOption = Annotated[
    str | None,
    typer.Option(
        "--kwargs",
        metavar="JSON",
        callback=usage_check(_parse_kwargs),
        help="Keyword arguments for the model factory, e.g. '{\"num_classes\": 10}'.",
    ),
]

WeightsOption = Annotated[
    str | None,
    typer.Option(
        "--weights",
        metavar="CKPT",
        help="Load a checkpoint (any format inspect-state-dict reads; state dict and module./_orig_mod. "
        "prefix found automatically) and report missing, unexpected and shape-mismatched keys.",
    ),
]

StrictOption = Annotated[bool, typer.Option("--strict", help="With --weights: any mismatch is an error.")]

DepthOption = Annotated[int, typer.Option("--depth", min=0, metavar="N", help="Module levels to list.")]

TagOption = Annotated[
    str | None,
    typer.Option(
        "--tag",
        metavar="STEP",
        help="DeepSpeed run folder: the step folder to read (e.g. global_step1000) instead of the one `latest` names.",
    ),
]

ZeroWeightsOption = Annotated[
    ZeroWeights,
    typer.Option(
        "--weights",
        help="DeepSpeed ZeRO folder: master = the fp32 master weights, assembled from the rank partitions; "
        "module = the module's own (16-bit) weights, ZeRO stages 1 and 2.",
    ),
]
