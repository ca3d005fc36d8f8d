"""Parsing and formatting of byte sizes, shared by every command that takes one."""

from __future__ import annotations

import re
from decimal import Decimal

from ptools.errors import BadInputError

MAX_SIZE = 2**63 - 1  # what a file offset or a tensor's byte count can be

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
    # nvidia-smi and most ML tooling write "G" meaning GiB; follow that habit.
    "K": 2**10,
    "M": 2**20,
    "G": 2**30,
    "T": 2**40,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*$")


def parse_size(text: str) -> int:
    """Parse a byte size such as ``"20GiB"``, ``"8GB"``, ``"512M"`` or ``"1048576"``.

    Decimal units (KB, MB, GB, TB) are powers of 1000; binary units (KiB, MiB, GiB, TiB)
    and the single letters K, M, G, T are powers of 1024. Case is ignored.

    Returns:
        The size in bytes (rounded down).

    Raises:
        BadInputError: the text is not a size.
    """
    match = _SIZE_RE.match(text)
    unit = match.group(2).upper() if match else None
    if match is None or unit not in _UNITS:
        raise BadInputError(
            f"invalid size {text!r}",
            "write a number with an optional unit: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB",
        )
    # Decimal, not float: exact for any digits given, and no overflow to infinity.
    size = int(Decimal(match.group(1)) * _UNITS[unit])
    if size > MAX_SIZE:
        raise BadInputError(f"size {text.strip()!r} is larger than any machine's memory or disk (8 EiB)")
    return size


def format_bytes(size: int | None, binary: bool = True) -> str:
    """Format a byte count for people: ``format_bytes(3 * 2**30) == "3.0 GiB"``."""
    if size is None:
        return "-"
    base, names = (
        (1024, ["B", "KiB", "MiB", "GiB", "TiB", "PiB"]) if binary else (1000, ["B", "kB", "MB", "GB", "TB", "PB"])
    )
    value = float(size)
    for name in names:
        if abs(value) < base or name == names[-1]:
            return f"{int(value)} {name}" if name == "B" else f"{value:.1f} {name}"
        value /= base
    raise AssertionError("unreachable")


_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|min|h|d)?\s*$", re.IGNORECASE)
_DURATION_UNITS = {"ms": 0.001, "s": 1, "": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}
MAX_DURATION_S = 366 * 86400


def parse_duration(text: str) -> float:
    """Parse a duration such as ``"90"``, ``"90s"``, ``"10m"``, ``"2h"`` or ``"1d"`` into seconds.

    Raises:
        BadInputError: the text is not a duration, or is longer than a year.
    """
    match = _DURATION_RE.match(text)
    if match is None:
        raise BadInputError(f"invalid duration {text!r}", "write a number with an optional unit: s, m, h, d")
    seconds = float(Decimal(match.group(1)) * Decimal(str(_DURATION_UNITS[(match.group(2) or "").lower()])))
    if seconds > MAX_DURATION_S:
        raise BadInputError(f"duration {text.strip()!r} is longer than a year")
    return seconds
