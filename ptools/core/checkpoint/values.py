"""Reading tensor values from a checkpoint with numpy, one tensor at a time.

Memory stays near the largest tensor: only the bytes a tensor spans are read, and
statistics are accumulated over fixed-size chunks.
"""

from __future__ import annotations

import functools
import io
import math
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from ptools.core.checkpoint.tensors import COMPLEX, FLOATING, ITEMSIZE, StorageRef, TensorInfo, check_expansion
from ptools.errors import BadInputError

if TYPE_CHECKING:
    import numpy as np

    from ptools.core.checkpoint.readers import Checkpoint

_NUMPY_CODES = {
    "float64": "f8",
    "float32": "f4",
    "float16": "f2",
    "complex128": "c16",
    "complex64": "c8",
    "int64": "i8",
    "int32": "i4",
    "int16": "i2",
    "int8": "i1",
    "uint64": "u8",
    "uint32": "u4",
    "uint16": "u2",
    "uint8": "u1",
    "bool": "?",
    "qint8": "i1",
    "quint8": "u1",
    "qint32": "i4",
    "quint4x2": "u1",
    "quint2x4": "u1",
}
CHUNK_ELEMENTS = 1 << 22


def _float8_e4m3fn_table() -> np.ndarray:
    """All 256 float8_e4m3fn values: 1 sign, 4 exponent (bias 7), 3 mantissa bits, no inf."""
    import numpy as np

    table = np.empty(256, dtype=np.float32)
    for code in range(256):
        sign = -1.0 if code & 0x80 else 1.0
        exponent, mantissa = (code >> 3) & 0xF, code & 0x7
        if exponent == 0xF and mantissa == 0x7:
            table[code] = np.nan
        elif exponent == 0:
            table[code] = sign * mantissa / 8 * 2.0**-6
        else:
            table[code] = sign * (1 + mantissa / 8) * 2.0 ** (exponent - 7)
    return table


def decode(raw: bytes, dtype: str, byteorder: str = "little") -> np.ndarray:
    """Raw storage bytes as a 1-D numpy array; bfloat16 and float8 widen to float32.

    Raises:
        BadInputError: numpy cannot represent the dtype's values.
    """
    import numpy as np

    order: Literal["<", ">"] = "<" if byteorder == "little" else ">"
    if dtype == "bfloat16":
        return (np.frombuffer(raw, dtype=f"{order}u2").astype(np.uint32) << 16).view(np.float32)
    if dtype == "float8_e5m2":  # the top byte of a float16
        return (np.frombuffer(raw, dtype=np.uint8).astype(np.uint16) << 8).view(np.float16).astype(np.float32)
    if dtype == "float8_e4m3fn":
        return _float8_e4m3fn_table()[np.frombuffer(raw, dtype=np.uint8)]
    code = _NUMPY_CODES.get(dtype)
    if code is None:
        raise BadInputError(f"reading values of dtype {dtype} is not supported")
    return np.frombuffer(raw, dtype=np.dtype(code).newbyteorder(order) if code not in ("?", "i1", "u1") else code)


def read_tensor(checkpoint: Checkpoint, tensor: TensorInfo) -> np.ndarray:
    """The tensor's values as a numpy array of its shape (a view where possible).

    Raises:
        BadInputError: the data is missing, truncated, or the dtype unsupported; meta tensors.
    """
    import numpy as np

    if tensor.chunks:
        return _read_chunked(checkpoint, tensor)
    if tensor.pieces:
        parts = [
            decode(checkpoint.read(ref, start, length), tensor.dtype, ref.byteorder)
            for ref, start, length in tensor.pieces
        ]
        flat = parts[0] if len(parts) == 1 else np.concatenate(parts)
        if flat.size != tensor.numel:
            raise BadInputError(f"an assembled tensor of shape {list(tensor.shape)} has {flat.size:,} elements")
        return flat.reshape(tensor.shape)
    if tensor.storage is None:
        raise BadInputError("a meta tensor has no values")
    itemsize = ITEMSIZE[tensor.dtype]
    extent = tensor.extent
    check_expansion(tensor.shape, tensor.numel, extent)
    if tensor.numel > extent:
        _spend_expansion(checkpoint, tensor, expansion_claim(tensor))
    raw = checkpoint.read(tensor.storage, tensor.storage_offset * itemsize, extent * itemsize)
    flat = decode(raw, tensor.dtype, tensor.storage.byteorder)
    if tensor.numel == 0:
        return np.empty(tensor.shape, dtype=flat.dtype)
    if tensor.is_contiguous:
        return flat[: tensor.numel].reshape(tensor.shape)
    return np.lib.stride_tricks.as_strided(
        flat, shape=tensor.shape, strides=[s * flat.itemsize for s in tensor.stride], writeable=False
    )


def expansion_claim(tensor: TensorInfo) -> int:
    """Bytes an expanded (stride-0) tensor claims beyond the elements it spans in storage."""
    return max(0, tensor.numel - tensor.extent) * ITEMSIZE[tensor.dtype] if tensor.storage is not None else 0


def _spend_expansion(checkpoint: Checkpoint, tensor: TensorInfo, claimed: int, *, plan_only: bool = False) -> None:
    """Count what an expanded tensor claims beyond its storage against the command's budget:
    four allowed stride-0 tensors made a 3 GB DCP output out of a few bytes. ``plan_only``:
    check what a writer is about to materialise, without spending it."""
    from ptools.core import limits

    spent = checkpoint.expanded_bytes + claimed
    if not plan_only:
        checkpoint.expanded_bytes = spent
    if spent > limits.EXPANDED_BYTES.value:
        raise limits.EXPANDED_BYTES.exceeded(
            f"{checkpoint.path}: expanded tensors (the last of shape {list(tensor.shape)}) claim "
            f"{spent:,} bytes over what is stored"
        )


def check_expansion_budget(checkpoint: Checkpoint, tensors: list[TensorInfo]) -> None:
    """Refuse, before any is built, tensors whose expansions together exceed the budget (an
    output that holds them all in memory at once)."""
    total = 0
    for tensor in tensors:
        claim = expansion_claim(tensor)
        if claim:
            total += claim
            _spend_expansion(checkpoint, tensor, total, plan_only=True)


def flat_range(values: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Elements ``start:stop`` of ``values`` in row-major order, 1-D; memory of that range
    alone (``reshape(-1)`` of a strided or expanded view would copy all of it)."""
    import numpy as np

    if values.ndim <= 1 or values.flags.c_contiguous:
        return values.reshape(-1)[start:stop]
    row = values[0].size
    first, last = start // row, (stop - 1) // row
    if first == last:
        return flat_range(values[first], start - first * row, stop - first * row)
    parts = [flat_range(values[first], start - first * row, row)]
    if last > first + 1:
        parts.append(values[first + 1 : last].reshape(-1))
    parts.append(flat_range(values[last], 0, stop - last * row))
    return np.concatenate(parts)


def flat_chunks(values: np.ndarray, elements: int | None = None) -> Iterator[np.ndarray]:
    """``values`` in row-major order, in 1-D pieces of at most ``elements`` (CHUNK_ELEMENTS)."""
    step = elements or CHUNK_ELEMENTS
    for start in range(0, values.size, step):
        yield flat_range(values, start, min(start + step, values.size))


def _no_offset(ref: StorageRef) -> int | None:
    return None  # a record inside a chunk archive: read through zipfile


def _read_member(archive: zipfile.ZipFile, ref: StorageRef, start: int, length: int) -> bytes:
    return archive.read(ref.key)[start : start + length]


def _read_chunked(checkpoint: Checkpoint, tensor: TensorInfo) -> np.ndarray:
    """A DCP tensor: each chunk is a small torch.save archive inside a shard file."""
    import numpy as np

    from ptools.core.checkpoint.readers import ZIP_ERRORS, _check_inflation, _zip_member
    from ptools.core.checkpoint.readers import Checkpoint as _Checkpoint
    from ptools.core.checkpoint.unpickle import unpickle

    result: np.ndarray | None = None
    filled = 0
    for offsets, sizes, ref in tensor.chunks:
        blob = checkpoint.read(ref, 0, ref.size_bytes)
        try:
            archive = zipfile.ZipFile(io.BytesIO(blob))
            names = archive.namelist()
            pickle_name = next(n for n in names if n.endswith("data.pkl"))
        except (StopIteration, *ZIP_ERRORS) as failure:
            raise BadInputError(f"{ref.file}: corrupt DCP chunk at byte {ref.offset} ({failure})") from None
        prefix = pickle_name[: -len("data.pkl")]

        def storage_ref(key: str, location: str, size: int, _prefix: str = prefix, _file: str = ref.file) -> StorageRef:
            return StorageRef(file=_file, key=f"{_prefix}data/{key}", size_bytes=size, location=location)

        for info in archive.infolist():
            _check_inflation(ref.file, info)
        chunk_info = unpickle(_zip_member(archive, ref.file, pickle_name), storage_ref, what=f"{ref.file} chunk")
        if not isinstance(chunk_info, TensorInfo) or tuple(chunk_info.shape) != tuple(sizes):
            raise BadInputError(f"{ref.file}: DCP chunk does not hold a tensor of shape {list(sizes)}")
        inner = _Checkpoint(
            path=ref.file,
            format="torch-zip",
            root=chunk_info,
            size_bytes=len(blob),
            locate=_no_offset,
            read_record=functools.partial(_read_member, archive),
        )
        values = read_tensor(inner, chunk_info)
        if result is None:
            # Zeros, not np.empty: should chunks ever leave a gap, it holds no process memory.
            result = np.zeros(tensor.shape, dtype=values.dtype)
        result[tuple(slice(o, o + s) for o, s in zip(offsets, sizes))] = values
        filled += values.size
    if filled != tensor.numel:  # the metadata's tiling check makes this unreachable; kept as a guard
        raise BadInputError(f"a DCP tensor of shape {list(tensor.shape)} has {filled:,} elements in its chunks")
    if result is None:
        return np.zeros(tensor.shape, dtype=np.float32)
    return result


@dataclass
class TensorStats:
    """Statistics of one tensor's finite values (complex: of magnitudes).

    ``std`` is the sample standard deviation (``torch.std``'s default, correction 1).
    """

    min: float | None
    max: float | None
    mean: float | None
    std: float | None
    nan: int
    inf: int

    def to_dict(self) -> dict[str, float | int | None]:
        return {"min": self.min, "max": self.max, "mean": self.mean, "std": self.std, "nan": self.nan, "inf": self.inf}


def tensor_stats(values: np.ndarray, dtype: str) -> TensorStats:
    """Min, max, mean, std, NaN and Inf counts, accumulated over chunks (Chan et al. merge)."""
    import numpy as np

    count, mean, m2 = 0, 0.0, 0.0
    low, high = math.inf, -math.inf
    nan = inf = 0
    for chunk in flat_chunks(values):
        if dtype in COMPLEX:
            nan += int(np.isnan(chunk).sum())
            inf += int((np.isinf(chunk) & ~np.isnan(chunk)).sum())
            chunk = np.abs(chunk[np.isfinite(chunk)]).astype(np.float64)
        elif dtype in FLOATING:
            chunk = chunk.astype(np.float64)
            finite = np.isfinite(chunk)
            nan += int(np.isnan(chunk).sum())
            inf += int(np.isinf(chunk).sum())
            chunk = chunk[finite]
        else:
            chunk = chunk.astype(np.float64)
        if chunk.size == 0:
            continue
        low, high = min(low, float(chunk.min())), max(high, float(chunk.max()))
        chunk_mean = float(chunk.mean())
        chunk_m2 = float(((chunk - chunk_mean) ** 2).sum())
        total = count + chunk.size
        delta = chunk_mean - mean
        mean += delta * chunk.size / total
        m2 += chunk_m2 + delta * delta * count * chunk.size / total
        count = total
    if count == 0:
        return TensorStats(None, None, None, None, nan, inf)
    std = math.sqrt(m2 / (count - 1)) if count > 1 else None
    return TensorStats(low, high, mean, std, nan, inf)


def max_abs_difference(a: np.ndarray, b: np.ndarray) -> float | None:
    """Largest |a - b| over elements, chunked; NaN where either side is NaN; None when empty."""
    import numpy as np

    worst: float | None = None
    for left, right in zip(flat_chunks(a), flat_chunks(b)):
        kind = np.complex128 if np.iscomplexobj(left) or np.iscomplexobj(right) else np.float64
        difference = np.abs(left.astype(kind) - right.astype(kind))
        both_nan = np.isnan(left.astype(kind)) & np.isnan(right.astype(kind))
        difference = np.where(both_nan, 0.0, difference)
        # Equal infinities differ by nothing, although inf - inf is NaN.
        same = left.astype(kind) == right.astype(kind)
        difference = np.where(same, 0.0, difference)
        value = float(np.nan) if np.isnan(difference).any() else float(difference.max())
        worst = value if worst is None or math.isnan(value) or value > worst else worst
        if math.isnan(worst):
            break
    return worst


def max_relative_difference(a: np.ndarray, b: np.ndarray) -> float | None:
    """Largest ``|a - b| / max(|a|, |b|)`` over elements (0 where both are equal, NaN where
    either side is NaN and the other is not); None when empty. Chunked like
    :func:`max_abs_difference`."""
    import numpy as np

    worst: float | None = None
    kind = np.complex128 if np.iscomplexobj(a) or np.iscomplexobj(b) else np.float64
    for chunk_a, chunk_b in zip(flat_chunks(a), flat_chunks(b)):
        left, right = chunk_a.astype(kind), chunk_b.astype(kind)
        with np.errstate(invalid="ignore", divide="ignore"):
            relative = np.abs(left - right) / np.maximum(np.abs(left), np.abs(right))
        relative = np.where((left == right) | (np.isnan(left) & np.isnan(right)), 0.0, relative)
        value = float(np.nan) if np.isnan(relative).any() else float(relative.max())
        worst = value if worst is None or math.isnan(value) or value > worst else worst
        if math.isnan(worst):
            break
    return worst


_COMPARE_BYTES = 64 << 20


def tensors_equal(checkpoint_a: Checkpoint, a: TensorInfo, checkpoint_b: Checkpoint, b: TensorInfo) -> bool:
    """Whether two tensors of one shape and dtype hold the same bytes, element by element
    (bit-exact: -0.0 differs from 0.0, a NaN equals the same NaN). Dense tensors are compared
    by streaming their bytes in bounded pieces, without decoding them."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.numel == 0:
        return True
    ref_a, ref_b = a.storage, b.storage
    if (
        ref_a is not None
        and ref_b is not None
        and a.is_contiguous
        and b.is_contiguous
        and (ref_a.byteorder == ref_b.byteorder or ITEMSIZE[a.dtype] == 1)
    ):
        itemsize = ITEMSIZE[a.dtype]
        length = a.numel * itemsize
        start_a, start_b = a.storage_offset * itemsize, b.storage_offset * itemsize
        for done in range(0, length, _COMPARE_BYTES):
            size = min(_COMPARE_BYTES, length - done)
            if checkpoint_a.read(ref_a, start_a + done, size) != checkpoint_b.read(ref_b, start_b + done, size):
                return False
        return True
    import numpy as np

    values_a, values_b = read_tensor(checkpoint_a, a), read_tensor(checkpoint_b, b)
    # Same dtype on both sides, so the decoded arrays share a numpy dtype: compare their bits,
    # a bounded piece at a time (a strided or expanded view is never made dense whole).
    bits = np.dtype(f"u{values_a.dtype.itemsize}") if values_a.dtype.itemsize in (1, 2, 4, 8) else None
    for piece_a, piece_b in zip(flat_chunks(values_a), flat_chunks(values_b)):
        if bits is None:
            if not np.array_equal(piece_a, piece_b, equal_nan=True):
                return False
            continue
        left = np.ascontiguousarray(piece_a).view(bits)
        right = np.ascontiguousarray(piece_b).view(bits)
        if values_a.dtype.isnative != values_b.dtype.isnative:
            right = right.byteswap()
        if not np.array_equal(left, right):
            return False
    return True
