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
