"""Tensor descriptions read from checkpoint metadata, without torch.

A :class:`TensorInfo` says everything a listing needs (dtype, shape, stride, storage,
device tag) and where its bytes are (:class:`StorageRef`); values are read on demand by
:mod:`ptools.core.checkpoint.values`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from ptools.errors import BadInputError

# dtype name (as torch spells it) -> bytes per element.
ITEMSIZE: dict[str, int] = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "float8_e4m3fnuz": 1,
    "float8_e5m2fnuz": 1,
    "float8_e8m0fnu": 1,
    "complex128": 16,
    "complex64": 8,
    "complex32": 4,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint64": 8,
    "uint32": 4,
    "uint16": 2,
    "uint8": 1,
    "bool": 1,
    "qint8": 1,
    "quint8": 1,
    "qint32": 4,
    "quint4x2": 1,
    "quint2x4": 1,
}
FLOATING = {name for name in ITEMSIZE if name.startswith(("float", "bfloat"))}
COMPLEX = {"complex128", "complex64", "complex32"}

# torch's aliases for the same dtypes, as they can appear as pickled globals (torch.float).
DTYPE_ALIASES = {
    "float": "float32",
    "double": "float64",
    "half": "float16",
    "cfloat": "complex64",
    "cdouble": "complex128",
    "chalf": "complex32",
    "long": "int64",
    "int": "int32",
    "short": "int16",
}

# Legacy typed storage classes (torch.FloatStorage, …) -> dtype.
STORAGE_CLASSES: dict[str, str] = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "ComplexDoubleStorage": "complex128",
    "ComplexFloatStorage": "complex64",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "QInt8Storage": "qint8",
    "QUInt8Storage": "quint8",
    "QInt32Storage": "qint32",
    "QUInt4x2Storage": "quint4x2",
    "QUInt2x4Storage": "quint2x4",
}

# Names that are buffers by PyTorch convention; a bare state dict says nothing else.
BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


def is_buffer_name(name: str) -> bool:
    """Whether a state-dict key is a buffer by naming convention (BatchNorm statistics)."""
    return name.rsplit(".", 1)[-1] in BUFFER_SUFFIXES


@dataclass(frozen=True, slots=True)
class StorageRef:
    """A run of bytes holding one storage.

    ``file`` is the file holding the bytes; ``key`` names the storage inside it (a zip
    record, a legacy storage key, a tensor name); ``offset`` is the byte offset in
    ``file`` when known without reading (None for zip records, found on demand).
    ``location`` is the device tag the checkpoint carries (``cpu``, ``cuda:1``).
    """

    file: str
    key: str
    size_bytes: int
    location: str = "cpu"
    offset: int | None = None
    byteorder: str = "little"


Run = tuple[StorageRef, int, int]  # a storage, its first byte, a length in bytes


class DeferredRuns:
    """A parameter's byte runs, computed each time they are read.

    A ZeRO-3 parameter is cut across every rank, so a run of W ranks and P parameters has
    W × P runs; a listing holds P of these (and ``refs``, one tuple shared by all) instead.
    """

    __slots__ = ("_build", "refs", "count")

    def __init__(self, build: Callable[[], list[Run]], refs: tuple[StorageRef, ...], count: int) -> None:
        self._build = build
        self.refs = refs  # every storage a run may come from (the first one is where the data is)
        self.count = count

    def __iter__(self) -> Iterator[Run]:
        return iter(self._build())

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> Run:
        return self._build()[index]


@dataclass(slots=True)
class TensorInfo:
    """One tensor as the checkpoint describes it. ``storage`` is None for meta tensors."""

    dtype: str
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    storage_offset: int = 0
    storage: StorageRef | None = None
    requires_grad: bool = False
    is_parameter: bool = False
    # For DCP: the chunks (global offsets, sizes, storage) the tensor is assembled from.
    chunks: list[tuple[tuple[int, ...], tuple[int, ...], StorageRef]] = field(default_factory=list)
    # For DeepSpeed ZeRO: byte runs (storage, first byte, length) whose concatenation is the
    # tensor's dense bytes, in order (a parameter cut across rank partitions).
    pieces: list[Run] | DeferredRuns = field(default_factory=list)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return ITEMSIZE[self.dtype]

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    @property
    def has_data(self) -> bool:
        """False for a meta tensor (shape and dtype only)."""
        return self.storage is not None or bool(self.chunks) or bool(self.pieces)

    @property
    def device(self) -> str:
        if self.storage is not None:
            return self.storage.location
        if self.pieces:
            return _piece_refs(self.pieces)[0].location
        return self.chunks[0][2].location if self.chunks else "meta"

    @property
    def extent(self) -> int:
        """Elements of storage this tensor spans from ``storage_offset`` (0 when empty)."""
        if self.numel == 0:
            return 0
        return 1 + sum((size - 1) * stride for size, stride in zip(self.shape, self.stride))

    @property
    def is_contiguous(self) -> bool:
        if self.stride == contiguous_stride(self.shape):  # the common case, without the loop below
            return True
        expected = 1
        for size, stride in zip(reversed(self.shape), reversed(self.stride)):
            if size != 1 and stride != expected:
                return False
            expected *= size
        return True


def storage_identity(tensor: TensorInfo) -> tuple[str, str | int]:
    """What tensors sharing data have in common: their storage, or (assembled tensors, tied by
    being one object under several names) the object itself."""
    if tensor.storage is not None:
        return tensor.storage.file, tensor.storage.key
    return "", id(tensor)


def data_refs(tensor: TensorInfo) -> list[StorageRef]:
    """Every storage a tensor's bytes are read from: its own, its DCP chunks', its ZeRO pieces'."""
    refs = [tensor.storage] if tensor.storage is not None else []
    return refs + [ref for _, _, ref in tensor.chunks] + list(_piece_refs(tensor.pieces))


def _piece_refs(pieces: list[Run] | DeferredRuns) -> tuple[StorageRef, ...] | list[StorageRef]:
    return pieces.refs if isinstance(pieces, DeferredRuns) else [ref for ref, _, _ in pieces]


def contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Row-major strides, in elements, of a dense tensor of ``shape``."""
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


MAX_DIMS = 64  # torch's own bound on a tensor's dimensions
_INDEX_LIMIT = 1 << 62  # sizes, strides, offsets: what an int64 index can address
# Elements an array may hold, counting only its non-zero sizes: numpy and torch refuse a
# shape whose product of non-zero sizes times 16 bytes overflows int64, even when numel is 0.
_ELEMENT_LIMIT = 1 << 58


def whole_numbers(values: Any, length: int | None = None) -> bool:
    """A tuple of at most :data:`MAX_DIMS` non-negative ints (not bools) an int64 index can
    address, of ``length`` items when given: sizes, strides, offsets as a file states them."""
    return (
        isinstance(values, tuple)
        and len(values) <= MAX_DIMS
        and (length is None or len(values) == length)
        and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < _INDEX_LIMIT for v in values)
    )


def counts(values: Any, length: int) -> bool:
    """A tuple of ``length`` non-negative ints an int64 index can address (any length:
    a list per parameter, not a shape)."""
    return (
        isinstance(values, tuple)
        and len(values) == length
        and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < _INDEX_LIMIT for v in values)
    )


def is_shape(values: Any, length: int | None = None) -> bool:
    """Sizes of a tensor: :func:`whole_numbers` whose non-zero sizes multiply to at most
    :data:`_ELEMENT_LIMIT`, so that a size of 0 cannot hide 2^80 elements from every bound."""
    return whole_numbers(values, length) and math.prod(v for v in values if v) <= _ELEMENT_LIMIT


def check_geometry(shape: Any, stride: Any, storage_offset: Any, itemsize: int, storage_bytes: int | None) -> None:
    """Refuse a tensor whose geometry reads outside its storage, before anything reads it.

    Args:
        shape, stride, storage_offset: as the file states them, in elements.
        itemsize: bytes per element of the tensor's dtype.
        storage_bytes: bytes the storage holds, or None for a meta tensor (no data).

    Raises:
        BadInputError: sizes or strides that are not non-negative integers of the same
            length, an element past the end of the storage, or an expanded (stride-0)
            tensor claiming far more elements than are stored.
    """
    from ptools.core.limits import brief

    if not whole_numbers(shape):
        raise BadInputError(f"corrupt tensor record: shape {brief(shape)} is not a tuple of sizes")
    if not is_shape(shape):
        raise BadInputError(
            f"corrupt tensor record: shape {brief(shape)} has sizes no tensor can hold (their product past 2^58)"
        )
    if not whole_numbers(stride, len(shape)):
        raise BadInputError(f"corrupt tensor record: stride {brief(stride)} is not {len(shape)} non-negative integers")
    if not whole_numbers((storage_offset,)):
        raise BadInputError(f"corrupt tensor record: storage offset {brief(storage_offset)}")
    numel = math.prod(shape)
    if storage_bytes is None or numel == 0:
        return
    extent = 1 + sum((size - 1) * step for size, step in zip(shape, stride))
    end = (storage_offset + extent) * itemsize
    if end > storage_bytes:
        raise BadInputError(
            f"corrupt tensor record: shape {list(shape)} with stride {list(stride)} at "
            f"offset {storage_offset} reaches past the end of storage (byte {end:,} of {storage_bytes:,})"
        )
    check_expansion(shape, numel, extent)


def check_expansion(shape: Sequence[int], numel: int, extent: int) -> None:
    """Refuse a stride-0 (expanded) tensor that claims far more elements than it stores: a
    corrupt or hostile header, not a checkpoint. Checked when a record is read and again
    before values are made from one (a tensor may be built without the reader)."""
    from ptools.core import limits

    if numel > max(extent, 1) * limits.EXPANSION.value and numel > (1 << 27):
        raise limits.EXPANSION.exceeded(
            f"a tensor of shape {list(shape)} claims {numel:,} elements over {extent:,} stored"
        )
