"""Help text that can be read and copied at 80 columns (the width when help is piped).

Click's plain formatter, not Rich panels: at 80 columns the panels leave 20 columns for an
option's text and cut long names with ``…``. Two changes to Click's wrapping: a hyphen never
ends a line (``--class-`` / ``iou`` cannot be copied), and examples are a block Click does not
rewrap, each line short enough to fit, long commands continued with `` \\`` as in a shell.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import typer
import typer.core

EXAMPLES_HEADING = "Examples:"
EXAMPLE_WIDTH = 76  # 80 columns less Click's indent of a command's help and ours
_KEEP_TOGETHER = "\u2011"  # a non-breaking hyphen: the same width, never a break point
_NO_REWRAP = "\b"  # Click's marker: the paragraph that follows is printed as written


# Typer's own Click (recent Typer vendors Click): subclass what its contexts use, never the
# `click` package, whose exceptions Typer would not catch.
_ClickHelpFormatter = typer.Context.formatter_class


class CopyableHelpFormatter(_ClickHelpFormatter):  # type: ignore[misc,valid-type]
    """Click's formatter, except that hyphenated words (flags, file names) never break."""

    def write(self, string: str) -> None:
        super().write(string.replace(_KEEP_TOGETHER, "-"))

    def write_text(self, text: str) -> None:
        super().write_text(text.replace("-", _KEEP_TOGETHER))

    def write_dl(self, rows: Iterable[tuple[str, str]], col_max: int = 30, col_spacing: int = 2) -> None:
        rows = [(_without_type_label(term), text.replace("-", _KEEP_TOGETHER)) for term, text in rows]
        super().write_dl(rows, col_max, col_spacing)


def _without_type_label(term: str) -> str:
    """``INPUT <list[str]>`` -> ``INPUT``: Typer adds a Python type to an argument's name,
    which says nothing its name and help do not (options carry a metavar instead)."""
    if term.startswith("-"):
        return term
    name, _, label = term.partition(" <")
    return name if label.rstrip(">") in _PYTHON_TYPES else term


_PYTHON_TYPES = {"str", "int", "float", "path", "list[str]", "list[path]", "list[int]"}


class _Context(typer.Context):
    formatter_class = CopyableHelpFormatter


class Command(typer.core.TyperCommand):
    context_class = _Context


class Group(typer.core.TyperGroup):
    context_class = _Context


def shell_lines(example: str, width: int = EXAMPLE_WIDTH) -> list[str]:
    """One example as lines of at most ``width`` characters, broken between words (never
    inside quotes, never between an option and its value) with a trailing `` \\`` so that
    pasting them into a shell runs the one command."""
    lines: list[str] = []
    current = ""
    for piece in _unbreakable_pieces(example):
        candidate = f"{current} {piece}" if current else piece
        if current and len(candidate) + len(" \\") > width:
            lines.append(current + " \\")
            current = "    " + piece
        else:
            current = candidate
    return [*lines, current]


def _unbreakable_pieces(example: str) -> list[str]:
    """Words, with a quoted string kept whole and ``--option value`` kept on one line."""
    words: list[str] = []
    quote = ""
    for word in example.split(" "):
        if quote:
            words[-1] += " " + word
        else:
            words.append(word)
        for character in word:
            if character in "'\"" and quote in ("", character):
                quote = "" if quote else character
    pieces: list[str] = []
    for word in words:
        previous = pieces[-1] if pieces else ""
        takes_value = previous.startswith("-") and " " not in previous and len(previous) > 1
        if takes_value and not word.startswith("-") and word not in _SHELL_OPERATORS:
            pieces[-1] += " " + word
        else:
            pieces.append(word)
    return pieces


_SHELL_OPERATORS = {">", ">>", "<", "|", "&&", "||", ";", "2>"}


def command_help(summary: str, details: str, examples: Sequence[str]) -> str:
    """A command's ``--help`` text: its one-line summary, details, then its examples."""
    block = "\n".join("  " + line for example in examples for line in shell_lines(example))
    return f"{summary}\n\n{details}\n\n{EXAMPLES_HEADING}\n\n{_NO_REWRAP}\n{block}\n"


def examples_in(help_text: str) -> list[str]:
    """The commands of a help text's examples (the raw text or the printed help), continued
    lines joined: what a user copies. The block ends at the next section's heading."""
    _, found, block = help_text.partition(EXAMPLES_HEADING)
    commands: list[str] = []
    pending = ""
    for line in block.splitlines():
        if line.strip() in ("", _NO_REWRAP):
            continue
        if not line[0].isspace():
            break
        line = line.strip()
        pending = f"{pending} {line}" if pending else line
        if pending.endswith(" \\"):
            pending = pending[:-2]
        else:
            commands.append(pending)
            pending = ""
    return commands if found else []
