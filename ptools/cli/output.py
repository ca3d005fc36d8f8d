"""The one output layer: data to stdout (Rich tables for people, JSON for programs),
messages to stderr. Colour only on a terminal and never with ``NO_COLOR``."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

# Off a terminal Rich would wrap tables at 80 columns; a file or pipe deserves whole rows.
_PIPE_WIDTH = 200


def _console(stream: Any) -> Console:
    from rich.console import Console

    terminal = stream.isatty()
    width = None if terminal or os.environ.get("COLUMNS") else _PIPE_WIDTH
    return Console(
        file=stream,
        width=width,
        no_color=bool(os.environ.get("NO_COLOR")) or None,
        highlight=False,
        soft_wrap=not terminal,
    )


def stdout_console() -> Console:
    """A console on stdout, for data meant for people."""
    return _console(sys.stdout)


def stderr_console() -> Console:
    """A console on stderr, for messages, warnings, progress and live views."""
    return _console(sys.stderr)


def emit(data: Any, json_output: bool, render: Callable[[Any], Iterable[Any]]) -> None:
    """The one way a command prints its result: ``--json`` prints ``data`` as JSON; otherwise
    ``render(data)`` gives the Rich renderables for people. Same data either way."""
    if json_output:
        print_json(data)
        return
    console = stdout_console()
    for renderable in render(data):
        console.print(renderable)


def print_json(data: Any) -> None:
    """Print ``data`` to stdout as one indented JSON document."""
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def _ndjson_line(row: Any) -> bytes:
    import orjson

    try:
        return orjson.dumps(row, option=orjson.OPT_NON_STR_KEYS | orjson.OPT_APPEND_NEWLINE)
    except TypeError:  # what orjson refuses (NaN stays NaN, ints past 64 bits): the stdlib's spelling
        return (json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n").encode()


def print_ndjson(rows: Iterable[Any]) -> None:
    """Print each row to stdout as one compact JSON object per line (written in batches, so
    a million rows cost one second, not twenty)."""
    sys.stdout.flush()
    out = sys.stdout.buffer
    batch: list[bytes] = []
    for row in rows:
        batch.append(_ndjson_line(row))
        if len(batch) >= 4096:
            out.write(b"".join(batch))
            batch.clear()
    out.write(b"".join(batch))
    out.flush()


def _message(prefix: str, text: str) -> None:
    sys.stderr.write(f"{prefix}{text}\n")
    sys.stderr.flush()


def info(text: str) -> None:
    """A message for people, on stderr."""
    _message("", text)


def warn(text: str) -> None:
    """A warning, on stderr."""
    _message("warning: ", text)


def error(text: str) -> None:
    """An error, on stderr (the caller decides the exit code)."""
    _message("error: ", text)


_FOLDED = 40  # a name longer than this folds onto more lines rather than push columns out


def make_table(
    title: str | None,
    columns: Sequence[str | tuple[str, str]],
    rows: Iterable[Sequence[Any]],
    optional: Sequence[str] = (),
) -> Table:
    """A Rich table; a column given as ``(name, "right")`` is right-aligned.

    Cells are shown with ``str``; None is shown as ``-``. Nothing is ever cut: a cell too long
    for its column folds onto more lines. When the table cannot fit the terminal even so, the
    ``optional`` columns are left out, in the order given, until it fits, and its caption says
    which.
    """
    from rich.table import Table

    specs = [column if isinstance(column, tuple) else (column, "left") for column in columns]
    cells = [["-" if cell is None else str(cell) for cell in row] for row in rows]
    shown = list(range(len(specs)))
    dropped: list[str] = []
    width = stdout_console().width
    if optional:
        # The width each column needs to show its longest word whole (Rich's own measure
        # assumes words may be folded), plus padding and borders; a word past _FOLDED is
        # folded anyway.
        needs = [
            max(
                [len(word) for word in name.split()]
                + [min(len(word), _FOLDED) for row in cells for word in row[index].split()]
                + [1]
            )
            + 3
            for index, (name, _) in enumerate(specs)
        ]
        for name in optional:
            if sum(needs[index] for index in shown) + 1 <= width:
                break
            if name in (spec[0] for spec in specs):
                shown = [index for index in shown if specs[index][0] != name]
                dropped.append(name)
    table = Table(title=title, title_justify="left", header_style="bold")
    for index in shown:
        name, justify = specs[index]
        table.add_column(name, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for row in cells:
        table.add_row(*(row[index] for index in shown))
    if dropped:
        table.caption = f"not shown at {width} columns: {', '.join(dropped)} (a wider terminal or --json shows them)"
        table.caption_justify = "left"
    return table


def progress(items: Iterable[Any], total: int, description: str) -> Iterable[Any]:
    """Iterate ``items`` with a progress bar on stderr when it is a terminal."""
    if not sys.stderr.isatty() or total < 2:
        return items
    from rich.progress import track

    return track(items, total=total, description=description, console=stderr_console(), transient=True)


def weights_report_lines(weights: dict[str, Any] | None, shown: int = 10) -> list[str]:
    """Human lines for a ``--weights`` report: counts, then the keys that did not fit."""
    if not weights:
        return []
    lines = [
        f"weights {weights['file']}: {weights['loaded']} loaded, {len(weights['missing'])} missing, "
        f"{len(weights['unexpected'])} unexpected, {len(weights['shape_mismatched'])} shape-mismatched"
        + (f" (prefix {weights['stripped_prefix']!r} stripped)" if weights["stripped_prefix"] else "")
    ]
    mismatched = [f"{m['name']} {m['checkpoint']} vs model {m['model']}" for m in weights["shape_mismatched"]]
    for label, names in (
        ("missing", weights["missing"]),
        ("unexpected", weights["unexpected"]),
        ("shape-mismatched", mismatched),
    ):
        if names:
            more = f" (+{len(names) - shown} more)" if len(names) > shown else ""
            lines.append(f"  {label}: {', '.join(names[:shown])}{more}")
    return lines
