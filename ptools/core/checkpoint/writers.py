"""Writing checkpoints without torch: PyTorch zip archives that ``torch.load`` reads (also with
``weights_only=True`` and ``mmap=True``), and safetensors files.

Tensor data is streamed storage by storage from the source checkpoint in bounded chunks, so
memory stays small whatever the file size; only the pickle (metadata) is built in memory.
"""

from __future__ import annotations

import collections
import io
import json
import pickle
import struct
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import IO, Any

from ptools.core.checkpoint.readers import SAFETENSORS_DTYPES, Checkpoint
from ptools.core.checkpoint.tensors import ITEMSIZE, STORAGE_CLASSES, StorageRef, TensorInfo, contiguous_stride
from ptools.core.checkpoint.unpickle import _LAYOUTS, _TORCH_MARKERS, TorchDevice, TorchDType, TorchMarker, TorchSize
from ptools.core.limits import brief
from ptools.errors import BadInputError

COPY_CHUNK_BYTES = 64 << 20
ALIGNMENT = 64  # torch aligns storage records so that mmap=True can map them in place
_STORAGE_CLASS_OF = {dtype: name for name, dtype in STORAGE_CLASSES.items()}
_SAFETENSORS_NAME_OF = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
CASTABLE = ("float64", "float32", "float16", "bfloat16")


# --------------------------------------------------------------------------- converting values


def _as_bytes(array: Any) -> memoryview:
    """A dense array's bytes without copying them (files and zip records take any buffer)."""
    import numpy as np

    array = np.ascontiguousarray(array)
    return memoryview(array.reshape(-1).view(np.uint8)) if array.size else memoryview(b"")


@dataclass
class CastTally:
    """What a cast did to one output tensor (or storage): values that were not zero and
    became zero (underflow), and finite values that became infinite (overflow). Rounding to
    the nearest representable value is what a cast is for, and is not counted."""

    names: list[str]
    source: str
    target: str
    numel: int = 0
    to_zero: int = 0
    to_inf: int = 0

    @property
    def lossy(self) -> bool:
        return bool(self.to_zero or self.to_inf)

    def add(self, before: Any, after_bits: Any, zero_mask: int, inf_bits: int, largest: float) -> None:
        """Count one chunk: ``before`` the source values, ``after_bits`` the encoded values as
        unsigned integers, where ``bits & zero_mask == 0`` is ±0 and ``== inf_bits`` is ±inf;
        ``largest`` the target's largest finite value. The common case - no new zeros, nothing
        near the range's end - costs two masked counts and a min/max, not a pass per test."""
        import numpy as np

        self.numel += before.size
        zeros_after = after_bits.size - np.count_nonzero(after_bits & after_bits.dtype.type(zero_mask))
        if zeros_after:
            bits_type = np.dtype(f"u{before.itemsize}")
            source_bits = np.ascontiguousarray(before).view(
                bits_type if before.dtype.isnative else bits_type.newbyteorder()
            )
            sign_cleared = source_bits.dtype.type((1 << (8 * before.itemsize - 1)) - 1)
            zeros_before = before.size - np.count_nonzero(source_bits & sign_cleared)
            self.to_zero += int(zeros_after - zeros_before)
        if before.size and not max(float(before.max()), -float(before.min())) <= largest:  # NaN: look closer
            infinite_after = np.count_nonzero((after_bits & after_bits.dtype.type(zero_mask)) == inf_bits)
            self.to_inf += int(infinite_after - np.count_nonzero(np.isinf(before)))

    def to_dict(self) -> dict[str, Any]:
        return {
            "names": self.names,
            "from": self.source,
            "to": self.target,
            "numel": self.numel,
            "to_zero": self.to_zero,
            "to_inf": self.to_inf,
        }


# Per target dtype: the unsigned view of its bits, the mask that clears the sign, and ±inf.
_TALLY_BITS = {
    "float16": ("<u2", 0x7FFF, 0x7C00, 65504.0),
    "bfloat16": ("<u2", 0x7FFF, 0x7F80, 3.3895313892515355e38),
    "float32": ("<u4", 0x7FFFFFFF, 0x7F800000, 3.4028234663852886e38),
}


def _encode(values: Any, dtype: str, tally: CastTally | None = None, original: Any = None) -> memoryview:
    """numpy values -> little-endian bytes of ``dtype`` (float32 source for bf16/fp16 casts);
    ``tally`` counts the ``original`` values (before any widening) lost to underflow or overflow."""
    import numpy as np

    if dtype == "bfloat16":
        values = np.ascontiguousarray(values, dtype=np.float32)
        bits = values.view(np.uint32)
        # Round to nearest even, as torch does; NaNs stay NaN (quiet bit kept).
        rounded = bits + ((bits >> np.uint32(16)) & np.uint32(1))
        rounded += np.uint32(0x7FFF)
        rounded >>= np.uint32(16)
        nan = np.isnan(values)
        if nan.any():
            rounded[nan] = (bits[nan] >> np.uint32(16)) | np.uint32(0x40)
        encoded = rounded.astype("<u2")
    else:
        codes = {"float64": "<f8", "float32": "<f4", "float16": "<f2"}
        with np.errstate(over="ignore"):  # out-of-range values become ±inf, as in torch
            encoded = np.asarray(values).astype(codes[dtype], copy=False)
    if tally is not None and dtype in _TALLY_BITS:
        view, zero_mask, inf_bits, largest = _TALLY_BITS[dtype]
        tally.add(
            np.asarray(values if original is None else original),
            np.ascontiguousarray(encoded).view(view),
            zero_mask,
            inf_bits,
            largest,
        )
    return _as_bytes(encoded)


def encode_values(values: Any, dtype: str, tally: CastTally | None = None) -> memoryview | bytes:
    """Values as read by :func:`~ptools.core.checkpoint.values.read_tensor` -> dense
    little-endian bytes of ``dtype`` (exact when the values came from that dtype)."""
    import numpy as np

    values = np.ascontiguousarray(values)
    if dtype in CASTABLE:
        return _encode(
            values.astype(np.float32, copy=False) if dtype in ("float16", "bfloat16") else values, dtype, tally, values
        )
    if dtype in ("float8_e4m3fn", "float8_e5m2", "complex32"):
        raise BadInputError(f"writing {dtype} values gathered from chunks or strided views is not supported")
    return values.astype(values.dtype.newbyteorder("<")).tobytes()


def cast_bytes(
    raw: bytes, source: str, target: str, byteorder: str = "little", tally: CastTally | None = None
) -> memoryview:
    """Cast raw storage bytes between floating dtypes the way torch's ``.to(dtype)`` does
    (via float32 for half-precision targets, rounding to nearest even)."""
    import numpy as np

    from ptools.core.checkpoint.values import decode

    original = decode(raw, source, byteorder)
    values = original.astype(np.float32, copy=False) if target in ("float16", "bfloat16") else original
    return _encode(values, target, tally, original)


def _little_endian(raw: bytes, dtype: str, byteorder: str) -> bytes:
    if byteorder == "little" or ITEMSIZE[dtype] == 1:
        return raw
    import numpy as np

    size = ITEMSIZE[dtype] if dtype not in ("complex64", "complex128", "complex32") else ITEMSIZE[dtype] // 2
    return np.frombuffer(raw, dtype=f">u{size}").byteswap().tobytes()


def byte_runs(
    checkpoint: Checkpoint,
    runs: Iterable[tuple[StorageRef, int, int]],
    source: str,
    dtype: str,
    tally: CastTally | None,
) -> Iterator[bytes | memoryview]:
    """The bytes of ``runs`` (storage, first byte, length) in order, in bounded pieces,
    little-endian and cast from ``source`` to ``dtype``: one read buffer in memory at a time."""
    itemsize = ITEMSIZE[source]
    step = max(itemsize, COPY_CHUNK_BYTES // itemsize * itemsize)
    for ref, begin, length in runs:
        for start in range(0, length, step):
            raw = checkpoint.read(ref, begin + start, min(step, length - start))
            if dtype != source:
                yield cast_bytes(raw, source, dtype, ref.byteorder, tally)
            else:
                yield _little_endian(raw, source, ref.byteorder)


@dataclass
class OutputStorage:
    """One storage of the output: where its bytes come from and what dtype they become."""

    key: str
    source_checkpoint: Checkpoint
    tensor: TensorInfo  # a tensor of this storage (all share dtype and storage)
    dtype: str  # output dtype
    location: str
    tally: CastTally | None = None  # filled while a cast storage is written

    @property
    def source_dtype(self) -> str:
        return self.tensor.dtype

    @property
    def numel(self) -> int:
        if self.tensor.storage is None:  # assembled (DCP): the tensor's own elements
            return self.tensor.numel
        return self.tensor.storage.size_bytes // ITEMSIZE[self.source_dtype]

    @property
    def nbytes(self) -> int:
        return self.numel * ITEMSIZE[self.dtype]

    def chunks(self) -> Iterator[bytes | memoryview]:
        """The output bytes in bounded pieces."""
        ref = self.tensor.storage
        runs: Iterable[tuple[StorageRef, int, int]]
        if ref is not None:
            runs = [(ref, 0, ref.size_bytes)]
        elif self.tensor.pieces:
            runs = self.tensor.pieces
        else:
            yield from self._assembled()
            return
        yield from byte_runs(self.source_checkpoint, runs, self.source_dtype, self.dtype, self.tally)

    def _assembled(self) -> Iterator[bytes | memoryview]:
        from ptools.core.checkpoint.values import read_tensor

        yield encode_values(read_tensor(self.source_checkpoint, self.tensor), self.dtype, self.tally)


def prefetched(pieces: Iterator[Any], depth: int = 2) -> Iterator[Any]:
    """Produce ``pieces`` in a worker thread, ``depth`` ahead, so that reading and casting
    the next chunk overlaps writing this one (numpy and file I/O release the GIL)."""
    import queue
    import threading

    channel: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(item: Any) -> None:
        while not stop.is_set():
            try:
                channel.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def work() -> None:
        try:
            for piece in pieces:
                if stop.is_set():
                    return
                put(piece)
        except BaseException as failure:  # handed to the consumer, which re-raises it
            put(_Failure(failure))
        finally:
            put(done)

    worker = threading.Thread(target=work, name="ptools-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            item = channel.get()
            if item is done:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()
        worker.join()


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


# --------------------------------------------------------------------------- the pickle


def _output_globals() -> frozenset[tuple[str, str]]:
    torch_names = {
        "device",
        "Size",
        *ITEMSIZE,
        *STORAGE_CLASSES,
        *_TORCH_MARKERS,
        *(layout.rpartition(".")[2] for layout in _LAYOUTS if layout.count(".") == 1),
    }
    return frozenset(
        {
            *(("torch", name) for name in torch_names),
            *(
                ("torch._utils", name)
                for name in (
                    "_rebuild_tensor_v2",
                    "_rebuild_tensor_v3",
                    "_rebuild_parameter",
                    "_rebuild_meta_tensor_no_storage",
                )
            ),
            ("torch.storage", "UntypedStorage"),
            ("collections", "OrderedDict"),
            ("argparse", "Namespace"),
            ("_codecs", "encode"),
            *(("builtins", name) for name in ("set", "frozenset", "complex", "slice", "bytearray", "range")),
            ("numpy", "dtype"),
            ("numpy", "ndarray"),
            *(
                (module, name)
                for module in ("numpy.core.multiarray", "numpy._core.multiarray")
                for name in ("_reconstruct", "scalar")
            ),
        }
    )


# Every global the writer may put in an output pickle. Nothing read from an input becomes a
# global unless its (module, name) is here, so a loader of our output with
# ``weights_only=False`` can only ever reach these.
OUTPUT_GLOBALS = _output_globals()


def check_output_global(module: str, name: str) -> None:
    """Refuse a global that is not in :data:`OUTPUT_GLOBALS`.

    Raises:
        BadInputError: naming the global, which came from the input.
    """
    if (module, name) not in OUTPUT_GLOBALS:
        raise BadInputError(
            f"the output would have to name the global {brief(f'{module}.{name}')} taken from "
            "the input; ptools writes only tensors and plain data",
            "pass `extract='auto'` to write the model weights alone, or `drop` the entry",
        )


class GlobalRef:
    """A reference to a global (``torch._utils._rebuild_tensor_v2``) written without importing it."""

    def __init__(self, module: str, name: str) -> None:
        check_output_global(module, name)
        self.module, self.name = module, name

    def __call__(self, *args: Any) -> Any:  # pickle wants a callable; it is never called here
        raise TypeError(f"{self.module}.{self.name} is only a reference")


_REBUILD_V2 = GlobalRef("torch._utils", "_rebuild_tensor_v2")
_REBUILD_V3 = GlobalRef("torch._utils", "_rebuild_tensor_v3")
_REBUILD_PARAMETER = GlobalRef("torch._utils", "_rebuild_parameter")
_REBUILD_META = GlobalRef("torch._utils", "_rebuild_meta_tensor_no_storage")
_UNTYPED = GlobalRef("torch.storage", "UntypedStorage")


class _StorageId:
    def __init__(self, storage: OutputStorage) -> None:
        self.storage = storage


class _PlainTensor:
    """The tensor inside a Parameter: pickled as a tensor, not again as a Parameter."""

    def __init__(self, tensor: TensorInfo) -> None:
        self.tensor = tensor


# The pure-Python pickler: its dispatch table is extensible. Its internals (write, memoize,
# whichmodule, …) are not in typeshed, hence the Any.
_PythonPickler: Any = pickle._Pickler
_whichmodule: Any = pickle.whichmodule  # type: ignore[attr-defined]


class _CheckpointPickler(_PythonPickler):
    dispatch = _PythonPickler.dispatch.copy()

    def __init__(
        self,
        file: IO[bytes],
        storage_for: Callable[[TensorInfo], OutputStorage | None],
        dtype_for: Callable[[TensorInfo], str],
    ) -> None:
        super().__init__(file, protocol=2)
        self._storage_for = storage_for
        self._dtype_for = dtype_for

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, _StorageId):
            storage = obj.storage
            if storage.dtype in _STORAGE_CLASS_OF:
                return (
                    "storage",
                    GlobalRef("torch", _STORAGE_CLASS_OF[storage.dtype]),
                    storage.key,
                    storage.location,
                    storage.numel,
                )
            return ("storage", _UNTYPED, storage.key, storage.location, storage.nbytes)
        return None

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, TensorInfo):
            if obj.is_parameter:
                return _REBUILD_PARAMETER, (_PlainTensor(obj), obj.requires_grad, collections.OrderedDict())
            return self._tensor_reduce(obj)
        if isinstance(obj, _PlainTensor):
            return self._tensor_reduce(obj.tensor)
        if isinstance(obj, TorchDevice):
            return GlobalRef("torch", "device"), (str(obj),)
        if isinstance(obj, TorchSize):
            return GlobalRef("torch", "Size"), (tuple(obj),)
        return NotImplemented

    def _tensor_reduce(self, tensor: TensorInfo) -> Any:
        dtype = self._dtype_for(tensor)
        storage = self._storage_for(tensor)
        if storage is None:
            return _REBUILD_META, (TorchDType(dtype), tuple(tensor.shape), tuple(tensor.stride), tensor.requires_grad)
        offset = tensor.storage_offset if tensor.storage is not None else 0
        stride = tensor.stride if tensor.storage is not None else contiguous_stride(tensor.shape)
        args: tuple[Any, ...] = (
            _StorageId(storage),
            offset,
            tuple(tensor.shape),
            tuple(stride),
            tensor.requires_grad,
            collections.OrderedDict(),
        )
        if dtype in _STORAGE_CLASS_OF:
            return _REBUILD_V2, args
        return _REBUILD_V3, (*args, TorchDType(dtype))

    def save_global(self, obj: Any, name: str | None = None) -> None:
        name = name if name is not None else getattr(obj, "__qualname__", None)
        check_output_global(_whichmodule(obj, name), str(name))
        super().save_global(obj, name)

    def _save_global_ref(self, obj: GlobalRef) -> None:
        check_output_global(obj.module, obj.name)
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
        self.memoize(obj)

    def _save_dtype(self, obj: TorchDType) -> None:
        self._save_global_ref(GlobalRef("torch", obj.name))

    def _save_marker(self, obj: TorchMarker) -> None:
        module, _, name = obj.qualified_name.rpartition(".")
        self._save_global_ref(GlobalRef(module, name))

    dispatch[GlobalRef] = _save_global_ref
    dispatch[TorchDType] = _save_dtype
    dispatch[TorchMarker] = _save_marker


def build_torch_pickle(
    root: Any, storage_for: Callable[[TensorInfo], OutputStorage | None], dtype_for: Callable[[TensorInfo], str]
) -> bytes:
    """Pickle ``root`` (plain objects and TensorInfo leaves) the way ``torch.save`` does."""
    buffer = io.BytesIO()
    _CheckpointPickler(buffer, storage_for, dtype_for).dump(root)
    return buffer.getvalue()


# --------------------------------------------------------------------------- zip writing


def _aligned_info(archive: zipfile.ZipFile, name: str, size: int) -> zipfile.ZipInfo:
    """A stored record whose data starts on a 64-byte boundary (torch's padding: an 'FB' field)."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    info.file_size = size
    zip64 = size > zipfile.ZIP64_LIMIT
    assert archive.fp is not None  # an archive open for writing
    offset = archive.fp.tell()
    header = 30 + len(name.encode()) + 4 + (20 if zip64 else 0)
    padding = (-(offset + header)) % ALIGNMENT
    info.extra = b"FB" + struct.pack("<H", padding) + b"Z" * padding
    return info


def write_torch_zip(
    handle: IO[bytes],
    archive_name: str,
    pickle_bytes: bytes,
    storages: list[OutputStorage],
    on_bytes: Callable[[int], None] | None = None,
) -> None:
    """Write a torch.save-compatible archive to ``handle`` (an open, writable binary file)."""
    with zipfile.ZipFile(handle, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:

        def record(name: str, pieces: Iterator[bytes | memoryview] | list[bytes], size: int) -> None:
            info = _aligned_info(archive, f"{archive_name}/{name}", size)
            with archive.open(info, "w", force_zip64=size > zipfile.ZIP64_LIMIT) as out:
                written = 0
                for piece in prefetched(iter(pieces)):
                    out.write(piece)
                    written += len(piece)
                    if on_bytes is not None:
                        on_bytes(len(piece))
            if written != size:
                raise BadInputError(f"storage {name}: wrote {written} bytes, expected {size}")

        record("data.pkl", [pickle_bytes], len(pickle_bytes))
        record(".format_version", [b"1"], 1)
        record(".storage_alignment", [str(ALIGNMENT).encode()], len(str(ALIGNMENT)))
        record("byteorder", [b"little"], 6)
        for storage in storages:
            record(f"data/{storage.key}", storage.chunks(), storage.nbytes)
        record("version", [b"3\n"], 2)


# --------------------------------------------------------------------------- safetensors writing


@dataclass
class SafetensorsEntry:
    """One tensor of a safetensors output: its data come from ``tensor`` in ``checkpoint``."""

    name: str
    checkpoint: Checkpoint
    tensor: TensorInfo
    dtype: str
    tally: CastTally | None = None  # filled while a cast tensor is written

    @property
    def nbytes(self) -> int:
        return self.tensor.numel * ITEMSIZE[self.dtype]

    def chunks(self) -> Iterator[bytes | memoryview]:
        """The tensor's own elements, dense and little-endian (a view's base is not copied)."""
        tensor = self.tensor
        if tensor.numel == 0:
            return
        source = tensor.dtype
        ref = tensor.storage
        if ref is not None and tensor.is_contiguous:
            itemsize = ITEMSIZE[source]
            runs = [(ref, tensor.storage_offset * itemsize, tensor.numel * itemsize)]
            yield from byte_runs(self.checkpoint, runs, source, self.dtype, self.tally)
            return
        if tensor.pieces:
            yield from byte_runs(self.checkpoint, tensor.pieces, source, self.dtype, self.tally)
            return
        from ptools.core.checkpoint.values import flat_chunks, read_tensor

        # A strided or expanded view: gathered and encoded densely, a bounded piece at a time.
        for piece in flat_chunks(read_tensor(self.checkpoint, tensor)):
            yield encode_values(piece, self.dtype, self.tally)


def safetensors_header(entries: list[SafetensorsEntry], metadata: dict[str, str]) -> bytes:
    """The 8-byte length and the JSON header (padded with spaces to 8 bytes, as the reference)."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for entry in entries:
        if entry.dtype not in _SAFETENSORS_NAME_OF:
            raise BadInputError(f"{entry.name}: safetensors has no dtype {entry.dtype}")
        header[entry.name] = {
            "dtype": _SAFETENSORS_NAME_OF[entry.dtype],
            "shape": list(entry.tensor.shape),
            "data_offsets": [offset, offset + entry.nbytes],
        }
        offset += entry.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((-len(raw)) % 8)
    return struct.pack("<Q", len(raw)) + raw


def write_safetensors(
    handle: IO[bytes],
    entries: list[SafetensorsEntry],
    metadata: dict[str, str],
    on_bytes: Callable[[int], None] | None = None,
) -> None:
    handle.write(safetensors_header(entries, metadata))
    for entry in entries:
        written = 0
        for piece in prefetched(entry.chunks()):
            handle.write(piece)
            written += len(piece)
            if on_bytes is not None:
                on_bytes(len(piece))
        if written != entry.nbytes:
            raise BadInputError(f"{entry.name}: wrote {written} bytes, expected {entry.nbytes}")
