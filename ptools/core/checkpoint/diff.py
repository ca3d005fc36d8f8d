"""Comparing two state dicts: keys, shapes, dtypes, and the bytes of every common tensor
(bit-exact, streamed); optionally the numeric differences.

A constant prefix on one side (``module.`` from DataParallel/DDP, ``_orig_mod.`` from
torch.compile, ``model.`` from wrappers) is detected and reported with its fix, and the
comparison goes on with names aligned, instead of listing every key as missing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ptools.core.checkpoint.listing import Listing, TensorRow
from ptools.core.checkpoint.readers import Checkpoint
from ptools.core.checkpoint.values import (
    max_abs_difference,
    max_relative_difference,
    read_tensor,
    tensors_equal,
)
from ptools.core.keys import WRAPPER_PREFIXES

# What a diff compares, from least to most work.
COMPARE_LEVELS = ("keys", "bytes", "numbers")

# The wrapper prefixes (both orders when stacked), and Lightning's "model." attribute.
KNOWN_PREFIXES = (
    *WRAPPER_PREFIXES,
    "model.",
    *(first + second for first in WRAPPER_PREFIXES for second in WRAPPER_PREFIXES if first != second),
)


@dataclass
class PrefixDifference:
    """Every key of ``side`` carries ``prefix``; stripping it aligns the two state dicts. The
    fix is to convert ``file`` with ``strip=prefix`` (see :func:`ptools.convert_checkpoint`)."""

    side: str
    prefix: str
    file: str

    def to_dict(self) -> dict[str, str]:
        return {"side": self.side, "prefix": self.prefix, "file": self.file}


@dataclass
class StateDictDiff:
    """The differences between state dicts ``a`` and ``b`` (names as aligned)."""

    a: dict[str, Any]
    b: dict[str, Any]
    prefix: PrefixDifference | None
    common: int
    only_in_a: list[str]
    only_in_b: list[str]
    shape_mismatches: list[dict[str, Any]]
    dtype_mismatches: list[dict[str, Any]]
    compared: str = "bytes"
    values: list[dict[str, Any]] | None = field(default=None)

    @property
    def identical_after_prefix(self) -> bool:
        """Same keys (after removing the prefix one side carries), shapes and dtypes, and -
        unless only keys were compared - equal values in every common tensor."""
        same = not (self.only_in_a or self.only_in_b or self.shape_mismatches or self.dtype_mismatches)
        return same and all(v["equal"] for v in self.values or ())

    @property
    def identical(self) -> bool:
        """:attr:`identical_after_prefix` with no prefix to remove: the same keys as written."""
        return self.prefix is None and self.identical_after_prefix

    @property
    def differing(self) -> int:
        """Common tensors whose values differ (0 when only keys were compared)."""
        return sum(1 for v in self.values or () if not v["equal"])

    def to_dict(self) -> dict[str, Any]:
        return {
            "a": self.a,
            "b": self.b,
            "prefix": self.prefix.to_dict() if self.prefix else None,
            "compared": self.compared,
            "common": self.common,
            "only_in_a": self.only_in_a,
            "only_in_b": self.only_in_b,
            "shape_mismatches": self.shape_mismatches,
            "dtype_mismatches": self.dtype_mismatches,
            "values": self.values,
            "values_differ": self.differing,
            "identical": self.identical,
            "identical_after_prefix": self.identical_after_prefix,
        }


def detect_prefix(
    names_a: list[str], names_b: list[str], file_a: str = "A", file_b: str = "B"
) -> PrefixDifference | None:
    """The prefix whose removal from every key of one side best aligns it with the other."""
    set_a, set_b = set(names_a), set(names_b)
    best: tuple[int, str, str] | None = None
    baseline = len(set_a & set_b)
    for side, these, others in (("a", set_a, set_b), ("b", set_b, set_a)):
        candidates = set(KNOWN_PREFIXES)
        heads = {name.split(".", 1)[0] for name in these}
        if len(heads) == 1 and all("." in name for name in these):
            candidates.add(next(iter(heads)) + ".")
        for prefix in candidates:
            if not these or not all(name.startswith(prefix) for name in these):
                continue
            overlap = len({name[len(prefix) :] for name in these} & others)
            if overlap > baseline and (best is None or overlap > best[0]):
                best = (overlap, side, prefix)
    if best is None:
        return None
    _, side, prefix = best
    return PrefixDifference(side=side, prefix=prefix, file=file_a if side == "a" else file_b)


def diff_state_dicts(
    listing_a: Listing,
    checkpoint_a: Checkpoint,
    listing_b: Listing,
    checkpoint_b: Checkpoint,
    *,
    compare: str = "bytes",
) -> StateDictDiff:
    """Compare two listings, one pair of tensors at a time.

    Args:
        compare: ``keys`` - names, shapes and dtypes only (no tensor data read); ``bytes``
            (default) - also whether each common tensor of equal shape and dtype holds the
            same bytes; ``numbers`` - also, for each common tensor of equal shape (dtypes may
            differ), the max absolute and relative differences.

    Raises:
        ValueError: an unknown ``compare`` level.
    """
    if compare not in COMPARE_LEVELS:
        raise ValueError(f"compare must be one of {', '.join(COMPARE_LEVELS)}, not {compare!r}")
    prefix = detect_prefix(
        [r.name for r in listing_a.rows], [r.name for r in listing_b.rows], listing_a.file, listing_b.file
    )

    def aligned(rows: list[TensorRow], side: str) -> dict[str, TensorRow]:
        strip = prefix.prefix if prefix is not None and prefix.side == side else ""
        return {row.name[len(strip) :]: row for row in rows}

    rows_a, rows_b = aligned(listing_a.rows, "a"), aligned(listing_b.rows, "b")
    common = [name for name in rows_a if name in rows_b]
    shapes, dtypes, compared = [], [], []
    for name in common:
        ta, tb = rows_a[name].tensor, rows_b[name].tensor
        if ta.shape != tb.shape:
            shapes.append({"name": name, "a": list(ta.shape), "b": list(tb.shape)})
        if ta.dtype != tb.dtype:
            dtypes.append({"name": name, "a": ta.dtype, "b": tb.dtype})
        if compare == "keys" or ta.shape != tb.shape:
            continue
        if compare == "bytes":
            if ta.dtype == tb.dtype:
                compared.append({"name": name, "equal": tensors_equal(checkpoint_a, ta, checkpoint_b, tb)})
            continue
        values_a, values_b = read_tensor(checkpoint_a, ta), read_tensor(checkpoint_b, tb)
        absolute = max_abs_difference(values_a, values_b)
        compared.append(
            {
                "name": name,
                "equal": ta.dtype == tb.dtype and tensors_equal(checkpoint_a, ta, checkpoint_b, tb),
                "max_abs_diff": absolute,
                "max_rel_diff": max_relative_difference(values_a, values_b),
            }
        )

    def describe(listing: Listing) -> dict[str, Any]:
        return {
            "file": listing.file,
            "format": listing.format,
            "state_dict_key": listing.state_dict_key,
            "tensors": len(listing.rows),
        }

    return StateDictDiff(
        a=describe(listing_a),
        b=describe(listing_b),
        prefix=prefix,
        common=len(common),
        only_in_a=[n for n in rows_a if n not in rows_b],
        only_in_b=[n for n in rows_b if n not in rows_a],
        shape_mismatches=shapes,
        dtype_mismatches=dtypes,
        compared=compare,
        values=None if compare == "keys" else compared,
    )
