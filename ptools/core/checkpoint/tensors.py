"""Tensor descriptions read from checkpoint metadata, without torch.

A :class:`TensorInfo` says everything a listing needs (dtype, shape, stride, storage,
device tag) and where its bytes are (:class:`StorageRef`); values are read on demand by
:mod:`ptools.core.checkpoint.values`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# dtype name (as torch spells it) -> bytes per element.
ITEMSIZE: dict[str, int] = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2,
    "float8_e4m3fn": 1, "float8_e5m2": 1, "float8_e4m3fnuz": 1, "float8_e5m2fnuz": 1,
    "float8_e8m0fnu": 1,
    "complex128": 16, "complex64": 8, "complex32": 4,
    "int64": 8, "int32": 4, "int16": 2, "int8": 1,
    "uint64": 8, "uint32": 4, "uint16": 2, "uint8": 1, "bool": 1,
    "qint8": 1, "quint8": 1, "qint32": 4, "quint4x2": 1, "quint2x4": 1,
}
FLOATING = {name for name in ITEMSIZE if name.startswith(("float", "bfloat"))}
COMPLEX = {"complex128", "complex64", "complex32"}

# torch's aliases for the same dtypes, as they can appear as pickled globals (torch.float).
DTYPE_ALIASES = {
    "float": "float32", "double": "float64", "half": "float16", "cfloat": "complex64",
    "cdouble": "complex128", "chalf": "complex32", "long": "int64", "int": "int32",
    "short": "int16",
}

# Legacy typed storage classes (torch.FloatStorage, …) -> dtype.
STORAGE_CLASSES: dict[str, str] = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "ComplexDoubleStorage": "complex128",
    "ComplexFloatStorage": "complex64", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8",
    "BoolStorage": "bool", "QInt8Storage": "qint8", "QUInt8Storage": "quint8",
    "QInt32Storage": "qint32", "QUInt4x2Storage": "quint4x2", "QUInt2x4Storage": "quint2x4",
}

# Names that are buffers by PyTorch convention; a bare state dict says nothing else.
BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


def is_buffer_name(name: str) -> bool:
    """Whether a state-dict key is a buffer by naming convention (BatchNorm statistics)."""
    return name.rsplit(".", 1)[-1] in BUFFER_SUFFIXES


@dataclass(frozen=True)
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


@dataclass
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
    def device(self) -> str:
        if self.storage is not None:
            return self.storage.location
        return self.chunks[0][2].location if self.chunks else "meta"

    @property
    def extent(self) -> int:
        """Elements of storage this tensor spans from ``storage_offset`` (0 when empty)."""
        if self.numel == 0:
            return 0
        return 1 + sum((size - 1) * stride for size, stride in zip(self.shape, self.stride))

    @property
    def is_contiguous(self) -> bool:
        expected = 1
        for size, stride in zip(reversed(self.shape), reversed(self.stride)):
            if size != 1 and stride != expected:
                return False
            expected *= size
        return True


def contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Row-major strides, in elements, of a dense tensor of ``shape``."""
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))
