"""Averaging checkpoints (model soups, the last N checkpoints of a run) one tensor at a time.

:func:`open_average` returns a :class:`Checkpoint` whose tensors are the averages of the
inputs' model weights; every writer of convert-ckpt reads it like any other checkpoint, and
each averaged tensor is computed when the writer first asks for its bytes. Memory: one tensor
of each input and a float64 accumulator, never a whole model.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Mapping, Sequence
from typing import Any

from ptools.core.checkpoint.readers import Checkpoint, open_checkpoint
from ptools.core.checkpoint.structure import find_state_dict, iter_tensors
from ptools.core.checkpoint.tensors import (
    COMPLEX,
    FLOATING,
    StorageRef,
    TensorInfo,
    contiguous_stride,
    data_refs,
    storage_identity,
)
from ptools.core.checkpoint.values import read_tensor, tensors_equal
from ptools.core.limits import brief
from ptools.errors import BadInputError

AVERAGE_FILE = "<average>"  # the StorageRef.file of averaged tensors: computed, not stored


def _weights(checkpoint: Checkpoint, extract: str | None) -> Mapping[str, Any]:
    _, node, _ = find_state_dict(checkpoint.root, extract if extract is not None else "auto")
    if not isinstance(node, Mapping):
        raise BadInputError(f"{checkpoint.path}: the model weights are not a dict of tensors; pass `extract` KEY")
    return node


def open_average(
    sources: Sequence[str | os.PathLike[str]],
    *,
    extract: str | None = None,
    take_last: bool = False,
    trust: bool = False,
) -> Checkpoint:
    """The element-wise average of the model weights of ``sources`` (any formats, same keys).

    Floating (and complex) tensors are summed in float64 (complex128) in input order, divided
    by the count, and cast back to their dtype (via float32, rounding to nearest even, as
    torch's ``.to`` does). Integer and boolean tensors (``num_batches_tracked``, masks) must be
    equal in every input; with ``take_last`` the last input's are taken instead.

    Raises:
        BadInputError: fewer than two inputs, keys, shapes or dtypes that differ, integer
            tensors that differ without ``take_last``.
    """
    paths = [os.fspath(source) for source in sources]
    if len(paths) < 2:
        raise BadInputError("averaging needs at least two checkpoints")
    checkpoints = [open_checkpoint(path, trust=trust) for path in paths]
    states = [_weights(checkpoint, extract) for checkpoint in checkpoints]
    first = states[0]
    for path, state in zip(paths[1:], states[1:]):
        missing = [name for name in first if name not in state]
        extra = [name for name in state if name not in first]
        if missing or extra:
            name, where = (missing[0], f"{path} lacks it") if missing else (extra[0], f"only {path} has it")
            raise BadInputError(
                f"the checkpoints to average hold different keys: {brief(name)} ({where}; "
                f"{len(missing)} missing, {len(extra)} extra)"
            )
    averaged: collections.OrderedDict[str, Any] = collections.OrderedDict()
    sources_of: dict[str, list[tuple[Checkpoint, TensorInfo]]] = {}
    last_taken = 0
    tied: dict[tuple[Any, ...], TensorInfo] = {}
    for name, value in first.items():
        if not isinstance(value, TensorInfo):
            continue  # non-tensor entries of the weights (rare): not averaged, left out
        tensors = [state[name] for state in states]
        for path, tensor in zip(paths, tensors):
            if not isinstance(tensor, TensorInfo) or tensor.shape != value.shape or tensor.dtype != value.dtype:
                described = f"{tensor.dtype} {list(tensor.shape)}" if isinstance(tensor, TensorInfo) else "no tensor"
                raise BadInputError(
                    f"cannot average {brief(name)}: {paths[0]} has {value.dtype} {list(value.shape)}, "
                    f"{path} has {described}"
                )
            if not tensor.has_data:
                raise BadInputError(f"cannot average {brief(name)}: it is a meta tensor (no data) in {path}")
        if value.dtype in FLOATING or value.dtype in COMPLEX:
            # A name tied to an earlier one in every input (an LM head and its embedding) stays
            # tied: the same averaged tensor, written once.
            tie = tuple((storage_identity(t), t.storage_offset, t.shape, t.stride) for t in tensors)
            if tie in tied:
                averaged[name] = tied[tie]
                continue
            ref = StorageRef(file=AVERAGE_FILE, key=name, size_bytes=value.nbytes)
            averaged[name] = tied[tie] = TensorInfo(
                value.dtype, value.shape, contiguous_stride(value.shape), storage=ref
            )
            sources_of[name] = list(zip(checkpoints, tensors))
            continue
        equal = all(tensors_equal(checkpoints[0], value, c, t) for c, t in zip(checkpoints[1:], tensors[1:]))
        if not equal and not take_last:
            raise BadInputError(
                f"{brief(name)} is a {value.dtype} tensor that differs between the checkpoints; "
                "integers and booleans are not averaged",
                "pass `take_last=True` to take the last checkpoint's",
            )
        if not equal:
            last_taken += 1
        averaged[name] = tensors[-1] if not equal else value
    reader = _AverageReader(sources_of)
    # Data file -> the input it belongs to (integer tensors are read from their input).
    owner: dict[str, Checkpoint] = {}
    for source in checkpoints:
        for _, tensor in iter_tensors(source.root):
            for ref in data_refs(tensor):
                owner.setdefault(ref.file, source)

    def read_record(ref: StorageRef, start: int, length: int) -> bytes:
        if ref.file == AVERAGE_FILE:
            return reader.read(ref, start, length)
        return owner[ref.file].read(ref, start, length)

    checkpoint = Checkpoint(
        path=paths[0],
        format="average",
        root=averaged,
        size_bytes=sum(c.size_bytes for c in checkpoints),
        notes=[f"average of {len(paths)} checkpoints: floating tensors averaged in float64, one at a time"],
        sources=paths,
        locate=lambda ref: None,  # every read goes through read_record
        read_record=read_record,
    )
    if last_taken:
        checkpoint.notes.append(f"{last_taken} integer/boolean tensor(s) differ: the last checkpoint's taken")
    return checkpoint


class _AverageReader:
    """Bytes of averaged tensors, computed for the range a writer asks for: each input's
    tensor is read once (kept while the writer is on that tensor) and averaged a bounded
    range of elements at a time, so an expanded input is never materialised whole."""

    def __init__(self, sources_of: dict[str, list[tuple[Checkpoint, TensorInfo]]]) -> None:
        self.sources_of = sources_of
        self.inputs: tuple[str, list[Any]] | None = None

    def read(self, ref: StorageRef, start: int, length: int) -> bytes:
        from ptools.core.checkpoint.tensors import ITEMSIZE

        if self.inputs is None or self.inputs[0] != ref.key:
            self.inputs = None  # free the previous tensor's inputs before reading the next
            self.inputs = (ref.key, [read_tensor(c, t) for c, t in self.sources_of[ref.key]])
        itemsize = ITEMSIZE[self.sources_of[ref.key][0][1].dtype]
        first, stop = start // itemsize, -(-(start + length) // itemsize)
        skip = start - first * itemsize
        return self._average(ref.key, self.inputs[1], first, stop)[skip : skip + length]

    def _average(self, name: str, inputs: list[Any], start: int, stop: int) -> bytes:
        import numpy as np

        from ptools.core.checkpoint.values import flat_range
        from ptools.core.checkpoint.writers import encode_values

        dtype = self.sources_of[name][0][1].dtype
        wide = np.complex128 if dtype in COMPLEX else np.float64
        total: Any = None
        for values in inputs:
            part = flat_range(values, start, stop).astype(wide)
            total = part if total is None else np.add(total, part, out=total)
        mean = total / len(inputs)
        if dtype in ("float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"):
            mean = mean.astype(np.float32)  # torch casts float64 through float32
        elif dtype in ("complex64", "complex32"):
            mean = mean.astype(np.complex64)
        return bytes(encode_values(mean, dtype))
