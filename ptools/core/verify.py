"""Checking a written checkpoint against its source before it replaces anything: every
tensor present, with its shape and dtype, and bit-exact values (exact after the requested
cast). Used by ``convert_checkpoint(..., verify=True)``."""

from __future__ import annotations

import collections
from collections.abc import Callable, Mapping
from typing import Any

from ptools.core.checkpoint.readers import Checkpoint, open_checkpoint
from ptools.core.checkpoint.structure import iter_tensors
from ptools.core.checkpoint.tensors import TensorInfo
from ptools.core.checkpoint.writers import SafetensorsEntry
from ptools.errors import BadInputError


def verify_file(path: str, root: Any, source: Checkpoint, dtype_for: Callable[[TensorInfo], str], nested: bool) -> None:
    """Re-read the file at ``path`` and compare every tensor of ``root`` (read from ``source``)
    with it. ``nested``: the output keeps ``root``'s structure (a torch file), else it is a flat
    name -> tensor map (safetensors).

    Raises:
        BadInputError: a tensor is missing, or differs in shape, dtype or values.
    """
    written = open_checkpoint(path)
    expected = collections.OrderedDict(iter_tensors(root))
    if nested:
        actual = collections.OrderedDict(iter_tensors(written.root))
    else:
        actual = collections.OrderedDict((k, v) for k, v in written.root.items())
    compare(expected, source, actual, written, dtype_for)


def verify_shards(index_path: str, groups: list[list[SafetensorsEntry]]) -> None:
    """Re-read a sharded output through its index and compare every entry with its source.

    Raises:
        BadInputError: as :func:`verify_file`.
    """
    if not any(groups):
        return  # nothing was written to compare
    written = open_checkpoint(index_path)
    expected = collections.OrderedDict((e.name, e.tensor) for g in groups for e in g)
    dtypes = {id(e.tensor): e.dtype for g in groups for e in g}
    actual = collections.OrderedDict((k, written.root[k]) for k in expected)
    compare(expected, groups[0][0].checkpoint, actual, written, lambda t: dtypes[id(t)])


def compare(
    expected: Mapping[str, TensorInfo],
    source: Checkpoint,
    actual: Mapping[str, Any],
    written: Checkpoint,
    dtype_for: Callable[[TensorInfo], str],
) -> None:
    """Every tensor of ``expected`` (in ``source``) against the same name in ``actual`` (in
    ``written``), one tensor in memory at a time.

    Raises:
        BadInputError: naming the first tensor that is missing or differs.
    """
    import numpy as np

    from ptools.core.checkpoint.values import decode, read_tensor
    from ptools.core.checkpoint.writers import cast_bytes

    missing = [name for name in expected if name not in actual]
    if missing:
        raise BadInputError(
            f"verification failed: {len(missing)} tensor(s) missing from the output, e.g. {missing[0]!r}"
        )
    for name, tensor in expected.items():
        out = actual[name]
        want_dtype = dtype_for(tensor)
        if not isinstance(out, TensorInfo) or out.shape != tensor.shape or out.dtype != want_dtype:
            raise BadInputError(f"verification failed: {name!r} has the wrong shape or dtype in the output")
        if not tensor.has_data:
            continue
        source_values = read_tensor(source, tensor)
        if want_dtype != tensor.dtype:
            # bfloat16 reads back widened to float32; cast from what was read.
            decoded = {"f8": "float64", "f4": "float32", "f2": "float16"}[source_values.dtype.str[1:]]
            raw = np.ascontiguousarray(source_values).astype(source_values.dtype.newbyteorder("<")).tobytes()
            source_values = decode(bytes(cast_bytes(raw, decoded, want_dtype)), want_dtype).reshape(tensor.shape)
        output_values = read_tensor(written, out)
        if not np.array_equal(source_values, output_values, equal_nan=True):
            raise BadInputError(f"verification failed: values of {name!r} differ from the input")
