"""A pickle reader for checkpoints that never runs code from the file.

Every global a pickle names is resolved against an allowlist: tensors are rebuilt as
:class:`TensorInfo` descriptions (no torch import, no tensor data read), storages become
:class:`StorageRef`, and plain containers, numbers, strings and a few harmless classes are
built as usual. Any other global is recorded; after the pass the whole file is refused with
the list of what it needs, unless the caller trusts the file (then those globals are
imported and called, as ``torch.load(weights_only=False)`` would).
"""

from __future__ import annotations

import _compat_pickle
import argparse
import collections
import io
import pathlib
import pickle
from collections.abc import Callable
from typing import IO, Any

from ptools.core.checkpoint.tensors import (
    DTYPE_ALIASES,
    ITEMSIZE,
    STORAGE_CLASSES,
    StorageRef,
    TensorInfo,
)
from ptools.errors import BadInputError, UnsafeFileError

TRUST_HINT = "pass --trust only if you made this file or trust who did: it runs code"


class TorchDType:
    """A pickled ``torch.<dtype>`` global; prints like torch does."""

    def __init__(self, name: str) -> None:
        self.name = DTYPE_ALIASES.get(name, name)

    def __repr__(self) -> str:
        return f"torch.{self.name}"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TorchDType) and other.name == self.name

    def __hash__(self) -> int:
        return hash(self.name)


class TorchMarker:
    """A harmless named torch global (``torch.strided``, ``torch.Tensor``, …)."""

    def __init__(self, qualified_name: str) -> None:
        self.qualified_name = qualified_name

    def __repr__(self) -> str:
        return self.qualified_name


class _StorageType:
    def __init__(self, dtype: str | None) -> None:
        self.dtype = dtype  # None: untyped storage, sized in bytes


class Opaque:
    """Stand-in for an object of a class not on the allowlist; it only records its state.

    Never calls anything from the file: construction arguments and state are kept as data.
    """

    qualified_name = "?"
    # Class defaults: NEWOBJ builds instances with __new__ alone, skipping __init__.
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = {}
    state: Any = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args
        self.kwargs = kwargs
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<{self.qualified_name}>"


def _opaque_class(qualified_name: str) -> type[Opaque]:
    return type("Opaque", (Opaque,), {"qualified_name": qualified_name})


class TorchDevice(str):
    """A pickled ``torch.device``: the string ``cuda:1``, written back as a torch.device."""


class TorchSize(tuple):
    """A pickled ``torch.Size``: a tuple, written back as a torch.Size."""


def _device_string(kind: Any, index: Any = None) -> str:
    """``torch.device('cuda', 1)`` pickles as a call; keep it as the string ``cuda:1``."""
    text = str(kind)
    return text if index is None or ":" in text else f"{text}:{index}"


def _torch_device(kind: Any, index: Any = None) -> TorchDevice:
    return TorchDevice(_device_string(kind, index))


def _check_shape(name: str, value: Any) -> tuple[int, ...]:
    if not isinstance(value, tuple) or not all(isinstance(v, int) and v >= 0 for v in value):
        raise BadInputError(f"corrupt tensor record: {name} {value!r} is not a tuple of sizes")
    return value


def _check_stride(value: Any, ndim: int) -> tuple[int, ...]:
    if not isinstance(value, tuple) or len(value) != ndim or not all(isinstance(v, int) for v in value):
        raise BadInputError(f"corrupt tensor record: stride {value!r} does not fit the shape")
    return value


def _tensor(storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any,
            dtype: str | None) -> TensorInfo:
    if not isinstance(storage, _PickledStorage):
        raise BadInputError("corrupt tensor record: its storage is not a storage reference")
    if not isinstance(storage_offset, int) or storage_offset < 0:
        raise BadInputError(f"corrupt tensor record: storage offset {storage_offset!r}")
    shape = _check_shape("size", size)
    if dtype is None:
        raise BadInputError("corrupt tensor record: untyped storage without a dtype")
    return TensorInfo(dtype=dtype, shape=shape, stride=_check_stride(stride, len(shape)),
                      storage_offset=storage_offset, storage=storage.ref,
                      requires_grad=bool(requires_grad))


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any) -> TensorInfo:
    return _tensor(storage, storage_offset, size, stride, False, _storage_dtype(storage))


def _rebuild_tensor_v2(storage: Any, storage_offset: Any, size: Any, stride: Any,
                       requires_grad: Any = False, backward_hooks: Any = None,
                       metadata: Any = None) -> TensorInfo:
    return _tensor(storage, storage_offset, size, stride, requires_grad, _storage_dtype(storage))


def _rebuild_tensor_v3(storage: Any, storage_offset: Any, size: Any, stride: Any,
                       requires_grad: Any, backward_hooks: Any, dtype: Any,
                       metadata: Any = None) -> TensorInfo:
    if not isinstance(dtype, TorchDType) or dtype.name not in ITEMSIZE:
        raise BadInputError(f"corrupt tensor record: unknown dtype {dtype!r}")
    return _tensor(storage, storage_offset, size, stride, requires_grad, dtype.name)


def _rebuild_meta_tensor_no_storage(dtype: Any, size: Any, stride: Any,
                                    requires_grad: Any = False) -> TensorInfo:
    if not isinstance(dtype, TorchDType) or dtype.name not in ITEMSIZE:
        raise BadInputError(f"corrupt tensor record: unknown dtype {dtype!r}")
    shape = _check_shape("size", size)
    return TensorInfo(dtype=dtype.name, shape=shape, stride=_check_stride(stride, len(shape)),
                      requires_grad=bool(requires_grad))


class _PickledStorage:
    """What a persistent id resolves to: the storage's bytes, and the dtype its class implies."""

    def __init__(self, ref: StorageRef, dtype: str | None) -> None:
        self.ref = ref
        self.dtype = dtype


def _storage_dtype(storage: Any) -> str | None:
    return storage.dtype if isinstance(storage, _PickledStorage) else None


def _rebuild_parameter(data: Any, requires_grad: Any, backward_hooks: Any,
                       state: Any = None) -> TensorInfo:
    if not isinstance(data, TensorInfo):
        raise BadInputError("corrupt parameter record: its data is not a tensor")
    data.is_parameter = True
    data.requires_grad = bool(requires_grad)
    return data


_PARAMETER = TorchMarker("torch.nn.parameter.Parameter")


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    """Tensors with Python attributes, and Parameters, are pickled through this wrapper."""
    if func not in (_rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_tensor,
                    _rebuild_meta_tensor_no_storage, _rebuild_parameter):
        raise BadInputError("corrupt tensor record: unexpected rebuild function")
    if not isinstance(args, tuple):
        raise BadInputError("corrupt tensor record: rebuild arguments are not a tuple")
    tensor = func(*args)
    if new_type is _PARAMETER and isinstance(tensor, TensorInfo):
        tensor.is_parameter = True
    return tensor


def _codecs_encode(text: Any, encoding: str = "utf-8") -> bytes:
    """Protocol-2 pickles spell bytes as ``_codecs.encode(str, 'latin1')``."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
        raise BadInputError("corrupt pickle: unexpected bytes encoding")
    return text.encode(encoding)


def _numpy_global(name: str) -> Callable[..., Any]:
    def resolve(*args: Any) -> Any:
        import numpy

        if name == "scalar":
            dtype, data = args[0], args[1] if len(args) > 1 else None
            if not isinstance(dtype, numpy.dtype) or dtype.hasobject or not isinstance(data, bytes):
                raise BadInputError("corrupt numpy scalar in pickle")
            return numpy.frombuffer(data, dtype=dtype, count=1)[0]
        if name == "dtype":
            dtype = numpy.dtype(*args)
            if dtype.hasobject:
                raise BadInputError("numpy object arrays are not read without --trust")
            return dtype
        if name == "_reconstruct":
            return numpy.ndarray.__new__(*args)
        raise AssertionError(name)

    return resolve


def _numpy_ndarray() -> Any:
    import numpy

    return numpy.ndarray


_SAFE_GLOBALS: dict[str, Any] = {
    "torch._utils._rebuild_tensor": _rebuild_tensor,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
    "torch._utils._rebuild_tensor_v3": _rebuild_tensor_v3,
    "torch._utils._rebuild_meta_tensor_no_storage": _rebuild_meta_tensor_no_storage,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
    "torch.nn.parameter.Parameter": _PARAMETER,
    "torch.Size": TorchSize,
    "torch.device": _torch_device,
    "collections.OrderedDict": collections.OrderedDict,
    "builtins.set": set,
    "builtins.frozenset": frozenset,
    "builtins.complex": complex,
    "builtins.slice": slice,
    "builtins.bytearray": bytearray,
    "builtins.range": range,
    "_codecs.encode": _codecs_encode,
    "argparse.Namespace": argparse.Namespace,
    "torch.serialization._get_layout": lambda name: TorchMarker(str(name)),
    # Paths (e.g. DCP's checkpoint_id) are kept as their text; nothing touches the disk.
    "pathlib.PosixPath": lambda *parts: str(pathlib.PurePosixPath(*parts)),
    "pathlib.WindowsPath": lambda *parts: str(pathlib.PureWindowsPath(*parts)),
    "pathlib.PurePosixPath": lambda *parts: str(pathlib.PurePosixPath(*parts)),
    "pathlib.PureWindowsPath": lambda *parts: str(pathlib.PureWindowsPath(*parts)),
    "numpy.core.multiarray.scalar": _numpy_global("scalar"),
    "numpy._core.multiarray.scalar": _numpy_global("scalar"),
    "numpy.dtype": _numpy_global("dtype"),
    "numpy.core.multiarray._reconstruct": _numpy_global("_reconstruct"),
    "numpy._core.multiarray._reconstruct": _numpy_global("_reconstruct"),
}
_TORCH_MARKERS = {"Tensor", "strided", "sparse_coo", "sparse_csr", "contiguous_format",
                  "channels_last", "channels_last_3d", "preserve_format", "per_tensor_affine",
                  "per_channel_affine"}


class CheckpointUnpickler(pickle.Unpickler):
    """Unpickles checkpoint metadata into plain Python objects and TensorInfo leaves.

    Args:
        data: the pickle bytes, or a file positioned at the pickle.
        storage_ref: builds the StorageRef of a storage from (key, location, size in bytes).
        trust: resolve non-allowlisted globals by importing them (runs code from the file).
        extra_globals: more allowed globals for this kind of file (qualified name -> object).
    """

    def __init__(self, data: bytes | IO[bytes], storage_ref: Callable[[str, str, int], StorageRef],
                 trust: bool = False, extra_globals: dict[str, Any] | None = None) -> None:
        # A file is read in place (legacy checkpoints keep their data right after the pickle).
        super().__init__(io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data)
        self._storage_ref = storage_ref
        self._trust = trust
        self._extra = extra_globals if extra_globals is not None else {}
        self.unknown_globals: set[str] = set()

    def find_class(self, module: str, name: str) -> Any:
        # Protocol 2 (torch.save's) spells some globals the Python 2 way (__builtin__.set).
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        qualified = f"{module}.{name}"
        if qualified in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[qualified]
        if qualified in self._extra:
            return self._extra[qualified]
        if qualified == "numpy.ndarray":
            return _numpy_ndarray()
        if module == "numpy.dtypes" and name.endswith("DType"):
            return _numpy_global("dtype")
        if module == "torch":
            if name in ITEMSIZE or name in DTYPE_ALIASES:
                return TorchDType(name)
            if name in STORAGE_CLASSES:
                return _StorageType(STORAGE_CLASSES[name])
            if name in _TORCH_MARKERS:
                return TorchMarker(qualified)
        if qualified in ("torch.storage.UntypedStorage", "torch.UntypedStorage",
                         "torch.storage.TypedStorage"):
            return _StorageType(None)
        if self._trust:
            return super().find_class(module, name)
        self.unknown_globals.add(qualified)
        return _opaque_class(qualified)

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise BadInputError(f"corrupt pickle: unexpected persistent id {pid!r:.80}")
        storage_type, key, location, numel = pid[1:5]
        if not isinstance(storage_type, _StorageType) or not isinstance(numel, int) or numel < 0:
            raise BadInputError("corrupt pickle: malformed storage reference")
        dtype = storage_type.dtype
        size = numel * ITEMSIZE[dtype] if dtype is not None else numel
        return _PickledStorage(self._storage_ref(str(key), _device_string(location), size), dtype)


def unpickle(data: bytes | IO[bytes], storage_ref: Callable[[str, str, int], StorageRef], *, what: str,
             trust: bool = False, extra_globals: dict[str, Any] | None = None) -> Any:
    """Unpickle ``data`` safely; see :class:`CheckpointUnpickler`.

    Raises:
        UnsafeFileError: the pickle needs globals that are not allowed, and trust is off.
        BadInputError: the pickle is corrupt.
    """
    unpickler = CheckpointUnpickler(data, storage_ref, trust=trust, extra_globals=extra_globals)
    try:
        result = unpickler.load()
    except (BadInputError, UnsafeFileError):
        raise
    except RecursionError:
        raise BadInputError(f"{what}: the pickle nests too deeply to read") from None
    except Exception as failure:  # corrupt data can fail anywhere inside pickle; no code ran
        raise BadInputError(f"{what}: corrupt pickle ({type(failure).__name__}: {failure})"[:300]) from None
    if unpickler.unknown_globals:
        names = ", ".join(sorted(unpickler.unknown_globals))
        raise UnsafeFileError(f"{what} needs globals that are not known to be safe: {names}",
                              TRUST_HINT)
    return result
