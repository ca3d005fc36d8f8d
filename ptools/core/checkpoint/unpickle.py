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
import itertools
import math
import pathlib
import pickle
import re
import struct
from collections.abc import Callable, Iterator
from typing import IO, Any

from ptools.core import limits
from ptools.core.checkpoint.tensors import (
    COMPLEX,
    DTYPE_ALIASES,
    FLOATING,
    ITEMSIZE,
    STORAGE_CLASSES,
    StorageRef,
    TensorInfo,
    check_geometry,
    is_shape,
)
from ptools.core.limits import brief, brief_text
from ptools.errors import BadInputError, PtoolsError, UnsafeFileError

TRUST_HINT = "pass `trust=True` only if you made this file or trust who did: it runs code"


class _Frozen:
    """Objects whose fields the writer turns into globals: no pickle state may change them."""

    __slots__ = ()

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is read-only")


class TorchDType(_Frozen):
    """A pickled ``torch.<dtype>`` global; prints like torch does."""

    __slots__ = ("name",)
    name: str

    def __init__(self, name: str) -> None:
        object.__setattr__(self, "name", DTYPE_ALIASES.get(name, name))

    def __repr__(self) -> str:
        return f"torch.{self.name}"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TorchDType) and other.name == self.name

    def __hash__(self) -> int:
        return hash(self.name)


class TorchMarker(_Frozen):
    """A harmless named torch global (``torch.strided``, ``torch.Tensor``, …)."""

    __slots__ = ("qualified_name",)
    qualified_name: str

    def __init__(self, qualified_name: str) -> None:
        object.__setattr__(self, "qualified_name", qualified_name)

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


_GRAD_DTYPES = FLOATING | COMPLEX


def _tensor(
    storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any, dtype: str | None
) -> TensorInfo:
    if not isinstance(storage, _PickledStorage):
        raise BadInputError("corrupt tensor record: its storage is not a storage reference")
    if dtype is None:
        raise BadInputError("corrupt tensor record: untyped storage without a dtype")
    size = tuple(size) if isinstance(size, TorchSize) else size
    check_geometry(size, stride, storage_offset, ITEMSIZE[dtype], storage.ref.size_bytes)
    # Only floating and complex tensors can require gradients; torch refuses anything else.
    return TensorInfo(
        dtype=dtype,
        shape=size,
        stride=stride,
        storage_offset=storage_offset,
        storage=storage.ref,
        requires_grad=requires_grad is True and dtype in _GRAD_DTYPES,
    )


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any) -> TensorInfo:
    return _tensor(storage, storage_offset, size, stride, False, _storage_dtype(storage))


def _rebuild_tensor_v2(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any = False,
    backward_hooks: Any = None,
    metadata: Any = None,
) -> TensorInfo:
    return _tensor(storage, storage_offset, size, stride, requires_grad, _storage_dtype(storage))


def _rebuild_tensor_v3(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any,
    backward_hooks: Any,
    dtype: Any,
    metadata: Any = None,
) -> TensorInfo:
    if not isinstance(dtype, TorchDType) or dtype.name not in ITEMSIZE:
        raise BadInputError(f"corrupt tensor record: unknown dtype {brief(dtype)}")
    return _tensor(storage, storage_offset, size, stride, requires_grad, dtype.name)


def _rebuild_meta_tensor_no_storage(dtype: Any, size: Any, stride: Any, requires_grad: Any = False) -> TensorInfo:
    if not isinstance(dtype, TorchDType) or dtype.name not in ITEMSIZE:
        raise BadInputError(f"corrupt tensor record: unknown dtype {brief(dtype)}")
    size = tuple(size) if isinstance(size, TorchSize) else size
    check_geometry(size, stride, 0, ITEMSIZE[dtype.name], None)
    return TensorInfo(
        dtype=dtype.name, shape=size, stride=stride, requires_grad=requires_grad is True and dtype.name in _GRAD_DTYPES
    )


class _PickledStorage:
    """What a persistent id resolves to: the storage's bytes, and the dtype its class implies."""

    def __init__(self, ref: StorageRef, dtype: str | None) -> None:
        self.ref = ref
        self.dtype = dtype


def _storage_dtype(storage: Any) -> str | None:
    return storage.dtype if isinstance(storage, _PickledStorage) else None


def _rebuild_parameter(data: Any, requires_grad: Any, backward_hooks: Any, state: Any = None) -> TensorInfo:
    if not isinstance(data, TensorInfo):
        raise BadInputError("corrupt parameter record: its data is not a tensor")
    data.is_parameter = True
    data.requires_grad = requires_grad is True and data.dtype in _GRAD_DTYPES
    return data


_PARAMETER = TorchMarker("torch.nn.parameter.Parameter")


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    """Tensors with Python attributes, and Parameters, are pickled through this wrapper."""
    if func not in (
        _rebuild_tensor_v2,
        _rebuild_tensor_v3,
        _rebuild_tensor,
        _rebuild_meta_tensor_no_storage,
        _rebuild_parameter,
    ):
        raise BadInputError("corrupt tensor record: unexpected rebuild function")
    if not isinstance(args, tuple):
        raise BadInputError("corrupt tensor record: rebuild arguments are not a tuple")
    tensor = func(*args)
    if new_type is _PARAMETER and isinstance(tensor, TensorInfo):
        tensor.is_parameter = True
    return tensor


def _numpy() -> Any:
    import numpy

    return numpy


_NUMPY_KINDS = "biufcSU"  # numbers, booleans and fixed-width strings; never records or objects


class NumpyDType:
    """A numpy dtype named in a pickle: plain kinds only, built by ptools from its type code.

    numpy's own ``dtype.__setstate__`` is never given file-controlled state (a crafted one
    places fields outside the buffer); the byte order is the only state taken from the file.
    """

    def __init__(self, code: Any, *_flags: Any) -> None:
        numpy = _numpy()
        if not isinstance(code, str) or len(code) > 8:
            raise BadInputError(f"corrupt pickle: numpy dtype code {brief(code)}")
        try:
            dtype = numpy.dtype(code)
        except (TypeError, ValueError):
            raise BadInputError(f"corrupt pickle: numpy dtype code {brief(code)}") from None
        if dtype.kind not in _NUMPY_KINDS or dtype.fields is not None or dtype.subdtype is not None:
            raise UnsafeFileError(
                f"numpy dtype {code!r} (records, objects or sub-arrays) is not read without `trust=True`", TRUST_HINT
            )
        self.dtype = dtype

    def set_state(self, state: Any) -> None:
        if not (
            isinstance(state, tuple)
            and 3 <= len(state) <= 9
            and state[1] in ("<", ">", "|", "=")
            and all(part is None for part in state[2:5])
        ):
            raise UnsafeFileError(
                f"numpy dtype state {brief(state)} (fields, sub-arrays) is not read without `trust=True`", TRUST_HINT
            )
        if state[1] in ("<", ">") and self.dtype.itemsize > 1:
            self.dtype = self.dtype.newbyteorder(state[1])

    def __reduce__(self) -> Any:
        return self.dtype.__reduce__()

    def __repr__(self) -> str:
        return repr(self.dtype)


class NumpyArray:
    """A numpy array from a pickle, rebuilt by ptools from its shape, dtype and raw bytes."""

    def __init__(self) -> None:
        self.array: Any = None

    def set_state(self, state: Any) -> None:
        numpy = _numpy()
        if isinstance(state, tuple) and len(state) == 5:
            state = state[1:]  # (version, shape, dtype, is_fortran, data)
        if not (isinstance(state, tuple) and len(state) == 4):
            raise BadInputError("corrupt pickle: numpy array state")
        shape, dtype, fortran, data = state
        if not isinstance(dtype, NumpyDType):
            raise BadInputError("corrupt pickle: numpy array without a plain dtype")
        if not isinstance(data, (bytes, bytearray)):
            raise UnsafeFileError("numpy object arrays are not read without `trust=True`", TRUST_HINT)
        if not (is_shape(shape) and len(shape) <= 32):
            raise BadInputError(f"corrupt pickle: numpy array shape {brief(shape)}")
        if math.prod(shape) * dtype.dtype.itemsize != len(data):
            raise BadInputError(
                f"corrupt pickle: numpy array of shape {list(shape)} and dtype {dtype.dtype} "
                f"with {len(data)} bytes of data"
            )
        flat = numpy.frombuffer(bytes(data), dtype=dtype.dtype) if data else numpy.empty(0, dtype.dtype)
        self.array = flat.reshape(shape, order="F" if fortran else "C")

    def __reduce__(self) -> Any:
        if self.array is None:
            raise BadInputError("corrupt pickle: a numpy array without data")
        return self.array.__reduce__()

    def __repr__(self) -> str:
        return repr(self.array) if self.array is not None else "<numpy array>"


_NDARRAY = TorchMarker("numpy.ndarray")


def _numpy_scalar(dtype: Any, data: Any = None) -> Any:
    if not isinstance(dtype, NumpyDType) or not isinstance(data, bytes) or len(data) != dtype.dtype.itemsize:
        raise BadInputError("corrupt numpy scalar in pickle")
    return _numpy().frombuffer(data, dtype=dtype.dtype, count=1)[0]


def _numpy_reconstruct(subtype: Any, *_args: Any) -> NumpyArray:
    if subtype is not _NDARRAY:
        raise BadInputError("corrupt pickle: numpy array of an unexpected type")
    return NumpyArray()


def _layout(name: Any) -> TorchMarker:
    """``torch.serialization._get_layout('torch.strided')``: only torch's own layouts."""
    if name not in _LAYOUTS:
        raise BadInputError(f"corrupt pickle: unknown tensor layout {brief(name)}")
    return TorchMarker(name)


_LAYOUTS = {
    "torch.strided",
    "torch.sparse_coo",
    "torch.sparse_csr",
    "torch.sparse_csc",
    "torch.sparse_bsr",
    "torch.sparse_bsc",
    "torch._mkldnn",
    "torch.jagged",
}
_TORCH_MARKERS = {
    "Tensor",
    "strided",
    "sparse_coo",
    "sparse_csr",
    "contiguous_format",
    "channels_last",
    "channels_last_3d",
    "preserve_format",
    "per_tensor_affine",
    "per_channel_affine",
}


class _Budget:
    """Objects a pickle may make by copying (sets, sizes, byte arrays) beyond its own bytes."""

    def __init__(self, pickle_bytes: int) -> None:
        self.left = limits.OBJECTS.value + 4 * pickle_bytes

    def charge(self, count: int, what: str) -> None:
        self.left -= count
        if self.left < 0:
            raise limits.OBJECTS.exceeded(f"the pickle builds too much through {what}")


def _safe_globals(budget: _Budget) -> dict[str, Any]:
    """The allowlist: qualified name -> what ptools builds instead. Constructors that copy
    an iterable take materialised containers only, and charge what they copy to ``budget``."""

    def sized(value: Any, what: str) -> Any:
        if isinstance(value, range) or not isinstance(
            value, (list, tuple, set, frozenset, dict, str, bytes, bytearray)
        ):
            raise BadInputError(f"corrupt pickle: {what} of a {type(value).__name__}")
        budget.charge(len(value), what)
        return value

    def make_set(items: Any = ()) -> set[Any]:
        return set(sized(items, "set"))

    def make_frozenset(items: Any = ()) -> frozenset[Any]:
        return frozenset(sized(items, "frozenset"))

    def make_bytearray(source: Any = b"", encoding: Any = None) -> bytearray:
        if isinstance(source, str) and isinstance(encoding, str):
            return bytearray(_codecs_encode(sized(source, "bytearray"), encoding))
        return bytearray(sized(source, "bytearray"))

    def make_ordered_dict(items: Any = ()) -> collections.OrderedDict[Any, Any]:
        return collections.OrderedDict(sized(items, "OrderedDict"))

    def make_size(dims: Any = ()) -> TorchSize:
        return TorchSize(sized(dims, "torch.Size"))

    def make_range(*args: Any) -> range:
        if not all(isinstance(a, int) and not isinstance(a, bool) for a in args) or not 1 <= len(args) <= 3:
            raise BadInputError("corrupt pickle: range arguments")
        return range(*args)

    def encode(text: Any, encoding: str = "utf-8") -> bytes:
        return _codecs_encode(sized(text, "bytes"), encoding)

    def make_complex(real: Any = 0.0, imag: Any = 0.0) -> complex:
        if not all(isinstance(v, (int, float)) for v in (real, imag)):
            raise BadInputError("corrupt pickle: complex arguments")
        return complex(real, imag)

    def make_slice(*args: Any) -> slice:
        return slice(*args)

    def path(flavour: Any) -> Callable[..., str]:
        def make(*parts: Any) -> str:
            if not all(isinstance(p, str) for p in parts):
                raise BadInputError("corrupt pickle: path parts")
            return str(flavour(*sized(parts, "path")))

        return make

    return {
        "torch._utils._rebuild_tensor": _rebuild_tensor,
        "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
        "torch._utils._rebuild_tensor_v3": _rebuild_tensor_v3,
        "torch._utils._rebuild_meta_tensor_no_storage": _rebuild_meta_tensor_no_storage,
        "torch._utils._rebuild_parameter": _rebuild_parameter,
        "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
        "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
        "torch.nn.parameter.Parameter": _PARAMETER,
        "torch.Size": make_size,
        "torch.device": _torch_device,
        "collections.OrderedDict": make_ordered_dict,
        "builtins.set": make_set,
        "builtins.frozenset": make_frozenset,
        "builtins.complex": make_complex,
        "builtins.slice": make_slice,
        "builtins.bytearray": make_bytearray,
        "builtins.range": make_range,
        "_codecs.encode": encode,
        "argparse.Namespace": argparse.Namespace,
        "torch.serialization._get_layout": _layout,
        # Paths (e.g. DCP's checkpoint_id) are kept as their text; nothing touches the disk.
        "pathlib.PosixPath": path(pathlib.PurePosixPath),
        "pathlib.WindowsPath": path(pathlib.PureWindowsPath),
        "pathlib.PurePosixPath": path(pathlib.PurePosixPath),
        "pathlib.PureWindowsPath": path(pathlib.PureWindowsPath),
        "numpy.core.multiarray.scalar": _numpy_scalar,
        "numpy._core.multiarray.scalar": _numpy_scalar,
        "numpy.dtype": NumpyDType,
        "numpy.core.multiarray._reconstruct": _numpy_reconstruct,
        "numpy._core.multiarray._reconstruct": _numpy_reconstruct,
        "numpy.ndarray": _NDARRAY,
    }


def _codecs_encode(text: Any, encoding: str = "utf-8") -> bytes:
    """Protocol-2 pickles spell bytes as ``_codecs.encode(str, 'latin1')``."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
        raise BadInputError("corrupt pickle: unexpected bytes encoding")
    return text.encode(encoding)


# The pure-Python unpickler: its opcode handlers are ours to replace. Its internals (stack,
# read, dispatch, …) are not in typeshed, hence the Any.
_PythonUnpickler: Any = pickle._Unpickler


class CheckpointUnpickler(_PythonUnpickler):
    """Unpickles checkpoint metadata into plain Python objects and TensorInfo leaves.

    Built on the Python unpickler (not the C one) so that every opcode that could reach code
    or memory is ours to decide: its memo is a dict (a memo index of 10^8 costs nothing),
    BUILD never hands file state to a class's ``__setstate__``, and NEWOBJ makes only
    placeholder objects.

    Args:
        data: the pickle bytes, or a file positioned at the pickle.
        storage_ref: builds the StorageRef of a storage from (key, location, size in bytes).
        trust: resolve non-allowlisted globals by importing them (runs code from the file).
        extra_globals: more allowed globals for this kind of file (qualified name -> object).
        size: bytes of pickle (for a file), which scales what it may build.
    """

    dispatch = _PythonUnpickler.dispatch.copy()

    def __init__(
        self,
        data: bytes | IO[bytes],
        storage_ref: Callable[[str, str, int], StorageRef],
        trust: bool = False,
        extra_globals: dict[str, Any] | None = None,
        size: int | None = None,
    ) -> None:
        # A file is read in place (legacy checkpoints keep their data right after the pickle).
        if isinstance(data, (bytes, bytearray)):
            super().__init__(io.BytesIO(data))
            self.size = len(data)
        else:
            super().__init__(data)
            self.size = size or 0
        self._storage_ref = storage_ref
        self._trust = trust
        self._extra = extra_globals if extra_globals is not None else {}
        self._budget = _Budget(self.size)
        self._globals = _safe_globals(self._budget)
        self.unknown_globals: set[str] = set()

    def find_class(self, module: str, name: str) -> Any:
        if not (isinstance(module, str) and isinstance(name, str)):
            raise BadInputError("corrupt pickle: a global that is not named by text")
        # Protocol 2 (torch.save's) spells some globals the Python 2 way (__builtin__.set).
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        qualified = f"{module}.{name}"
        if qualified in self._globals:
            return self._globals[qualified]
        if qualified in self._extra:
            return self._extra[qualified]
        if module == "numpy.dtypes" and name.endswith("DType"):
            return NumpyDType
        if module == "torch":
            if name in ITEMSIZE or name in DTYPE_ALIASES:
                return TorchDType(name)
            if name in STORAGE_CLASSES:
                return _StorageType(STORAGE_CLASSES[name])
            if name in _TORCH_MARKERS:
                return TorchMarker(qualified)
        if qualified in ("torch.storage.UntypedStorage", "torch.UntypedStorage", "torch.storage.TypedStorage"):
            return _StorageType(None)
        if self._trust:
            try:
                return _PythonUnpickler.find_class(self, module, name)
            except (ImportError, AttributeError) as failure:
                raise BadInputError(
                    f"the file needs {brief_text(qualified)}, which Python cannot import here "
                    f"({type(failure).__name__}: {brief_text(str(failure))})",
                    "run ptools from the folder that holds the model's code, or add that folder to PYTHONPATH",
                ) from None
        self.unknown_globals.add(qualified[:200])
        return _opaque_class(qualified[:200])

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise BadInputError(f"corrupt pickle: unexpected persistent id {brief(pid)}")
        storage_type, key, location, numel = pid[1:5]
        if (
            not isinstance(storage_type, _StorageType)
            or not isinstance(numel, int)
            or isinstance(numel, bool)
            or numel < 0
            or not isinstance(key, (str, int))
            or not isinstance(location, str)
            or len(str(key)) > 256
            or not _DEVICE_TAG.match(location)
        ):
            raise BadInputError(f"corrupt pickle: malformed storage reference {brief(pid)}")
        dtype = storage_type.dtype
        size = numel * ITEMSIZE[dtype] if dtype is not None else numel
        return _PickledStorage(self._storage_ref(str(key), _device_string(location), size), dtype)

    def _load_build(self) -> None:
        state = self.stack.pop()
        target = self.stack[-1]
        if isinstance(target, Opaque):
            target.state = state
        elif isinstance(target, (NumpyDType, NumpyArray)):
            target.set_state(state)
        elif type(target) is collections.OrderedDict:
            # torch keeps a state dict's per-module versions as its _metadata attribute.
            if not (
                isinstance(state, dict) and set(state) <= {"_metadata"} and isinstance(state.get("_metadata", {}), dict)
            ):
                raise BadInputError(f"corrupt pickle: OrderedDict state {brief(state)}")
            target.__dict__.update(state)
        elif type(target) is argparse.Namespace:
            if not (isinstance(state, dict) and all(isinstance(k, str) and not k.startswith("__") for k in state)):
                raise BadInputError(f"corrupt pickle: Namespace state {brief(state)}")
            target.__dict__.update(state)
        elif self._trust and not isinstance(target, _OWN_TYPES):
            self.stack.append(state)
            _PythonUnpickler.load_build(self)
        else:
            raise BadInputError(f"corrupt pickle: state given to a {type(target).__name__}")

    def _load_newobj(self) -> None:
        args = self.stack.pop()
        cls = self.stack.pop()
        self.stack.append(self._new_object(cls, args, {}))

    def _load_newobj_ex(self) -> None:
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        self.stack.append(self._new_object(cls, args, kwargs))

    def _new_object(self, cls: Any, args: Any, kwargs: Any) -> Any:
        if not isinstance(args, tuple) or not isinstance(kwargs, dict):
            raise BadInputError("corrupt pickle: NEWOBJ arguments")
        if isinstance(cls, type) and issubclass(cls, Opaque):
            instance = cls.__new__(cls)
            instance.args, instance.kwargs = args, kwargs
            return instance
        if cls is argparse.Namespace:
            return argparse.Namespace()
        if self._trust and isinstance(cls, type) and not issubclass(cls, _OWN_TYPES):
            return cls.__new__(cls, *args, **kwargs)
        raise BadInputError(f"corrupt pickle: NEWOBJ of {brief(cls)}")

    def _length(self, size_format: str) -> int:
        """A length field, refused past the pickle's own size: the stock opcodes would allocate
        it (BYTEARRAY8 zero-fills it) before finding out the data is not there."""
        (length,) = struct.unpack(size_format, self.read(struct.calcsize(size_format)))
        if length > self.size:
            raise BadInputError(f"corrupt pickle: a value of {length:,} bytes in a pickle of {self.size:,}")
        return length

    def _load_bytearray8(self) -> None:
        buffer = bytearray(self._length("<Q"))
        self.readinto(buffer)
        self.append(buffer)

    def _load_bytes(self, size_format: str) -> None:
        self.append(self.read(self._length(size_format)))

    def _load_text(self, size_format: str) -> None:
        self.append(str(self.read(self._length(size_format)), "utf-8", "surrogatepass"))

    def _load_binstring(self) -> None:
        self.append(self._decode_string(self.read(self._length("<i"))))

    dispatch[pickle.BUILD[0]] = _load_build
    dispatch[pickle.NEWOBJ[0]] = _load_newobj
    dispatch[pickle.NEWOBJ_EX[0]] = _load_newobj_ex
    dispatch[pickle.BYTEARRAY8[0]] = _load_bytearray8
    dispatch[pickle.BINBYTES8[0]] = lambda self: self._load_bytes("<Q")
    dispatch[pickle.BINBYTES[0]] = lambda self: self._load_bytes("<I")
    dispatch[pickle.BINUNICODE8[0]] = lambda self: self._load_text("<Q")
    dispatch[pickle.BINUNICODE[0]] = lambda self: self._load_text("<I")
    dispatch[pickle.BINSTRING[0]] = _load_binstring


# torch's device tags: a lowercase type, an optional index (cpu, cuda:1, mps, xpu:0, meta).
_DEVICE_TAG = re.compile(r"[a-z_][a-z0-9_]{0,31}(:[0-9]{1,6})?\Z")
_OWN_TYPES = (TorchDType, TorchMarker, TensorInfo, _PickledStorage, _StorageType, NumpyDType, NumpyArray)
_END = object()


def _children(node: Any) -> Iterator[Any] | None:
    """What a container holds (for walking the object graph), or None for a leaf."""
    if isinstance(node, dict):
        extra = getattr(node, "_metadata", None)
        return itertools.chain(node.keys(), node.values(), (extra,) if extra is not None else ())
    if isinstance(node, (list, tuple, set, frozenset)):
        return iter(node)
    if isinstance(node, argparse.Namespace):
        return iter(vars(node).values())
    if isinstance(node, Opaque):
        return iter((node.args, node.kwargs, node.state))
    return None


def check_graph(root: Any, what: str, pickle_bytes: int = 0) -> None:
    """Refuse an object graph that later walks could not finish: one that contains itself,
    nests deeper than :data:`limits.DEPTH`, or unfolds (through shared references) into more
    than :data:`limits.OBJECTS` nodes. Iterative and linear in the distinct objects.

    Raises:
        BadInputError: naming the limit and how to raise it.
    """
    max_depth = limits.DEPTH.value
    max_nodes = limits.OBJECTS.value + 4 * pickle_bytes
    kids = _children(root)
    if kids is None:
        return
    finished: dict[int, tuple[int, int]] = {}  # id -> (nodes when unfolded, height)
    on_path = {id(root)}
    stack: list[list[Any]] = [[root, kids, 1, 0]]
    while stack:
        frame = stack[-1]
        child = next(frame[1], _END)
        if child is _END:
            stack.pop()
            on_path.discard(id(frame[0]))
            finished[id(frame[0])] = (frame[2], frame[3])
            if stack:
                stack[-1][2] += frame[2]
                stack[-1][3] = max(stack[-1][3], frame[3] + 1)
                if stack[-1][2] > max_nodes:
                    raise limits.OBJECTS.exceeded(f"{what}: shared references unfold")
            continue
        grandchildren = _children(child)
        if grandchildren is None:
            frame[2] += 1
            continue
        identity = id(child)
        if identity in on_path:
            raise BadInputError(f"{what}: a container in the pickle contains itself; not a checkpoint")
        if identity in finished:
            nodes, height = finished[identity]
            frame[2] += nodes
            frame[3] = max(frame[3], height + 1)
            if frame[2] > max_nodes:
                raise limits.OBJECTS.exceeded(f"{what}: shared references unfold")
            continue
        if len(stack) >= max_depth:
            raise limits.DEPTH.exceeded(f"{what}: the pickle nests containers")
        on_path.add(identity)
        stack.append([child, grandchildren, 1, 0])


def unpickle(
    data: bytes | IO[bytes],
    storage_ref: Callable[[str, str, int], StorageRef],
    *,
    what: str,
    trust: bool = False,
    extra_globals: dict[str, Any] | None = None,
    size: int | None = None,
) -> Any:
    """Unpickle ``data`` safely; see :class:`CheckpointUnpickler`.

    Raises:
        UnsafeFileError: the pickle needs globals that are not allowed, and trust is off
            (also when the pickle fails after naming one: a gadget is named, not its symptom).
        BadInputError: the pickle is corrupt, or past a limit; the message names ``what``.
    """
    unpickler = CheckpointUnpickler(data, storage_ref, trust=trust, extra_globals=extra_globals, size=size)
    failure: PtoolsError | None = None
    result = None
    try:
        result = unpickler.load()
    except (UnsafeFileError, BadInputError) as error:
        failure = error
    except RecursionError:
        failure = BadInputError("the pickle nests too deeply to read")
    except MemoryError:
        failure = BadInputError("the pickle asks for more memory than there is")
    except Exception as error:  # corrupt data can fail anywhere inside pickle; no code ran
        failure = BadInputError(f"corrupt pickle ({type(error).__name__}: {brief_text(str(error))})")
    if unpickler.unknown_globals and not trust:
        names = ", ".join(sorted(unpickler.unknown_globals)[:20])
        raise UnsafeFileError(f"{what} needs globals that are not known to be safe: {names}", TRUST_HINT)
    if failure is not None:
        message = failure.message if failure.message.startswith(what) else f"{what}: {failure.message}"
        raise type(failure)(message, failure.hint) from None
    check_graph(result, what, unpickler.size)
    return result
