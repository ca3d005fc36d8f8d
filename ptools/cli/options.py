"""Options shared by several commands, defined once."""

from __future__ import annotations

from typing import Annotated

import typer

JsonOption = Annotated[
    bool, typer.Option("--json", help="Print one JSON document on stdout instead of tables.")
]

NdjsonOption = Annotated[
    bool, typer.Option("--ndjson", help="Print one JSON object per line (per tensor), for streaming into jq.")
]

TrustOption = Annotated[
    bool, typer.Option(
        "--trust",
        help="Allow pickled objects outside the safe allowlist. This RUNS CODE from the file: "
             "only for files you made or trust.")
]

KwargsOption = Annotated[
    str | None, typer.Option("--kwargs", metavar="JSON",
                             help="Keyword arguments for the model factory, e.g. '{\"num_classes\": 10}'.")
]

WeightsOption = Annotated[
    str | None, typer.Option(
        "--weights", metavar="CKPT",
        help="Load a checkpoint (any format inspect-state-dict reads; state dict and module./_orig_mod. "
             "prefix found automatically) and report missing, unexpected and shape-mismatched keys.")
]

StrictOption = Annotated[bool, typer.Option("--strict", help="With --weights: any mismatch is an error.")]

DepthOption = Annotated[int, typer.Option("--depth", min=0, metavar="N", help="Module levels to list.")]
