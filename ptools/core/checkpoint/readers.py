"""Opening checkpoints by content: PyTorch zip and legacy pickle, TorchScript, safetensors
(single and sharded through ``*.index.json``), and torch.distributed.checkpoint folders.

Only metadata is read here; the cost does not grow with the size of the tensor data.
"""

from __future__ import annotations

import bisect
import collections
import math
import os
import re
import stat
import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ptools.core import limits
from ptools.core.checkpoint.tensors import ITEMSIZE, StorageRef, TensorInfo, contiguous_stride, is_shape, whole_numbers
from ptools.core.checkpoint.unpickle import Opaque, TorchDType, unpickle
from ptools.core.choices import ZeroWeights
from ptools.core.files import is_within, path_kind, require_regular_file, size_on_disk
from ptools.core.limits import brief, brief_text
from ptools.errors import BadInputError

LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19."
ZIP_MAGIC = b"PK\x03\x04"
EMPTY_ZIP_MAGIC = b"PK\x05\x06"
LFS_MAGIC = b"version https://git-lfs"
SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "C64": "complex64",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U64": "uint64",
    "U32": "uint32",
    "U16": "uint16",
    "U8": "uint8",
    "BOOL": "bool",
}
# What zipfile raises on damaged archives (it has no single error type for them).
ZIP_ERRORS = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    OSError,
    ValueError,
    EOFError,
    RuntimeError,
    NotImplementedError,
    struct.error,
    KeyError,
    IndexError,
    OverflowError,
)
FORMATS = ("torch-zip", "torch-legacy", "torchscript", "safetensors", "sharded", "dcp", "deepspeed", "average")


@dataclass
class Checkpoint:
    """An opened checkpoint: its structure with :class:`TensorInfo` leaves, and where data is.

    Attributes:
        path: what the user named (file or folder).
        format: one of :data:`FORMATS`.
        root: the unpickled object (dicts, lists, numbers, TensorInfo, Opaque…).
        size_bytes: bytes on disk (all shards / files of a folder).
        metadata: safetensors ``__metadata__`` (merged over shards), else empty.
        parameter_names: names known to be parameters (TorchScript), else None.
        notes: facts about how the file was read, for the user.
        details: what the format says about the run that wrote it (DeepSpeed: ZeRO stage,
            world size, step, training dtype), for ``--json``.
    """

    path: str
    format: str
    root: Any
    size_bytes: int
    metadata: dict[str, str] = field(default_factory=dict)
    parameter_names: set[str] | None = None
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)  # the inputs of a derived checkpoint (an average)
    # Byte offset of a storage's first byte in ``ref.file``; None for a compressed zip record,
    # which ``read_record`` then reads through zipfile.
    locate: Callable[[StorageRef], int | None] = lambda ref: ref.offset
    read_record: Callable[[StorageRef, int, int], bytes] | None = None
    # Bytes that expanded (stride-0) tensors have claimed beyond their storage so far: the
    # budget :data:`limits.EXPANDED_BYTES` bounds, over a whole command.
    expanded_bytes: int = 0

    def read(self, ref: StorageRef, start: int, length: int) -> bytes:
        """``length`` bytes of a storage from byte ``start``; one tensor's worth, never more."""
        if start < 0 or start + length > ref.size_bytes:
            raise BadInputError(f"{self.path}: a tensor reaches past the end of storage {ref.key}")
        offset = self.locate(ref)
        if offset is None:
            if self.read_record is None:
                raise BadInputError(f"{self.path}: no data location for storage {ref.key}")
            data = self.read_record(ref, start, length)
        else:
            try:
                with open(ref.file, "rb") as handle:
                    handle.seek(offset + start)
                    data = handle.read(length)
            except OSError as failure:
                raise BadInputError(f"cannot read {ref.file}: {failure.strerror or failure}") from None
        if len(data) != length:
            raise BadInputError(f"{ref.file}: truncated: storage {ref.key} ends early")
        return data


def open_checkpoint(
    path: str | os.PathLike[str], *, trust: bool = False, tag: str | None = None, weights: ZeroWeights = "master"
) -> Checkpoint:
    """Open a checkpoint of any supported format, reading metadata only.

    Args:
        path: a file, a ``*.index.json``, a folder holding one, a DCP folder, or a DeepSpeed
            ZeRO run folder (or one of its step folders).
        trust: allow pickled globals outside the allowlist (runs code from the file).
        tag: DeepSpeed only: the step folder to read instead of the one ``latest`` names.
        weights: DeepSpeed only: ``master`` (fp32, assembled from the rank partitions) or
            ``module`` (the module's own weights; ZeRO stages 1 and 2).

    Raises:
        BadInputError: unreadable, unknown, corrupt or inconsistent input.
        UnsafeFileError: the file needs code to be read and ``trust`` is off.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        checkpoint = _open_folder(path, trust, tag, weights)
        if checkpoint.format != "deepspeed":
            _refuse_zero_options(path, tag, weights)
        return checkpoint
    _refuse_zero_options(path, tag, weights)
    require_regular_file(path, "checkpoint file", "name a checkpoint file or folder")
    head = _read_head(path, 64)
    if not head:
        raise BadInputError(f"{path}: empty file, not a checkpoint")
    if head.startswith(LFS_MAGIC):
        raise BadInputError(
            f"{path}: this is a Git LFS pointer, not the checkpoint itself",
            "run `git lfs pull` to download the real file",
        )
    if head.startswith(ZIP_MAGIC) or head.startswith(EMPTY_ZIP_MAGIC):
        return _open_zip(path, trust)
    if head.startswith(LEGACY_MAGIC):
        return _open_legacy(path, trust)
    if head.lstrip()[:1] == b"{" and path.endswith(".json"):
        return _open_index(path, trust)
    if len(head) >= 9 and head[8:9] == b"{":
        return _open_safetensors(path)
    raise BadInputError(
        f"{path}: unknown format: not a PyTorch (zip or legacy), TorchScript, safetensors, index.json or DCP checkpoint"
    )


def _read_head(path: str, count: int) -> bytes:
    try:
        # O_NONBLOCK: should the path have become a FIFO since it was checked, do not hang.
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(descriptor, "rb") as handle:
            if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                raise BadInputError(f"{path}: not a regular file")
            return handle.read(count)
    except FileNotFoundError:
        raise BadInputError(f"{path}: no such file") from None
    except OSError as failure:
        raise BadInputError(f"cannot read {path}: {failure.strerror or failure}") from None


def _zip_member(zip_file: zipfile.ZipFile, path: str, name: str, limit: int | None = None) -> bytes:
    """A metadata member (a pickle, a small record), refused before inflating when it claims
    more than ``limit`` bytes or inflates more than :data:`limits.INFLATION` times."""
    try:
        info = zip_file.getinfo(name)
    except ZIP_ERRORS as failure:
        raise BadInputError(f"{path}: corrupt zip archive ({failure})") from None
    limit = limits.PICKLE_BYTES.value if limit is None else limit
    if info.file_size > limit:
        if limit < 1024:
            raise BadInputError(
                f"{path}: corrupt checkpoint: record {name} has {info.file_size:,} bytes, expected at most {limit}"
            )
        raise limits.PICKLE_BYTES.exceeded(f"{path}: record {name} has {info.file_size:,} bytes")
    _check_inflation(path, info)
    return _zip_read(zip_file, path, name)


def _check_inflation(path: str, info: zipfile.ZipInfo) -> None:
    if (
        info.compress_type != zipfile.ZIP_STORED
        and info.file_size > (1 << 20)
        and info.file_size > limits.INFLATION.value * max(info.compress_size, 1)
    ):
        raise limits.INFLATION.exceeded(
            f"{path}: record {info.filename} inflates from {info.compress_size:,} to {info.file_size:,} bytes"
        )


def _refuse_zero_options(path: str, tag: str | None, weights: str) -> None:
    if tag is not None or weights != "master":
        option = "`tag`" if tag is not None else "`weights`"
        raise BadInputError(f"{path}: {option} applies to DeepSpeed ZeRO checkpoint folders only")


def _open_folder(path: str, trust: bool, tag: str | None, weights: ZeroWeights) -> Checkpoint:
    from ptools.core.checkpoint import zero

    if os.path.exists(os.path.join(path, ".metadata")):
        return _open_dcp(path)
    indexes = sorted(name for name in os.listdir(path) if name.endswith(".index.json"))
    if indexes:
        # Prefer safetensors when a folder ships both (it needs no pickle).
        indexes.sort(key=lambda name: "safetensors" not in name)
        return _open_index(os.path.join(path, indexes[0]), trust)
    if zero.is_deepspeed_folder(path):
        return zero.open_zero(path, trust=trust, tag=tag, weights=weights)
    raise BadInputError(
        f"{path}: folder is not a checkpoint: no DCP .metadata, no *.index.json of a sharded "
        "checkpoint, no DeepSpeed ZeRO files"
    )


# --------------------------------------------------------------------------- PyTorch zip


def _zip_locator(path: str, zip_file: zipfile.ZipFile, records: dict[str, str]) -> Callable[[StorageRef], int | None]:
    """Byte offset of each stored (uncompressed) record, read from its local header on demand."""
    cache: dict[str, int | None] = {}

    def locate(ref: StorageRef) -> int | None:
        name = records[ref.key]
        if name not in cache:
            try:
                info = zip_file.getinfo(name)
            except ZIP_ERRORS as failure:
                raise BadInputError(f"{path}: corrupt zip archive ({failure})") from None
            if info.compress_type != zipfile.ZIP_STORED:
                cache[name] = None
            else:
                with open(path, "rb") as handle:
                    handle.seek(info.header_offset)
                    header = handle.read(30)
                if len(header) < 30 or header[:4] != ZIP_MAGIC:
                    raise BadInputError(f"{path}: corrupt zip: bad local header for {name}")
                name_length, extra_length = struct.unpack("<HH", header[26:30])
                cache[name] = info.header_offset + 30 + name_length + extra_length
        return cache[name]

    return locate


def _open_zip(path: str, trust: bool, extra_globals: dict[str, Any] | None = None) -> Checkpoint:
    try:
        zip_file = zipfile.ZipFile(path)
        names = zip_file.namelist()
    except ZIP_ERRORS as failure:
        raise BadInputError(f"{path}: corrupt or truncated zip archive ({failure})") from None
    pickles = sorted((n for n in names if n == "data.pkl" or n.endswith("/data.pkl")), key=lambda n: n.count("/"))
    if not pickles:
        raise BadInputError(f"{path}: a zip archive without data.pkl, not a PyTorch checkpoint")
    prefix = pickles[0][: -len("data.pkl")]
    is_script = f"{prefix}constants.pkl" in names or any(n.startswith(f"{prefix}code/") for n in names)
    byteorder = "little"
    if f"{prefix}byteorder" in names:
        byteorder = _zip_member(zip_file, path, f"{prefix}byteorder", 16).decode(errors="replace").strip()
        if byteorder not in ("little", "big"):
            raise BadInputError(f"{path}: corrupt checkpoint: byteorder record says {brief(byteorder)}")
    records: dict[str, str] = {}
    sizes = {info.filename: info.file_size for info in zip_file.infolist()}

    def storage_ref(key: str, location: str, size: int) -> StorageRef:
        record = f"{prefix}data/{key}"
        if record not in sizes:
            raise BadInputError(f"{path}: corrupt checkpoint: storage record {record} is missing")
        if sizes[record] < size:
            raise BadInputError(
                f"{path}: corrupt checkpoint: storage {key} holds {sizes[record]} bytes, its tensors need {size}"
            )
        records[key] = record
        return StorageRef(file=path, key=key, size_bytes=size, location=location, byteorder=byteorder)

    data = _zip_member(zip_file, path, pickles[0])
    extra = _torchscript_globals() if is_script else extra_globals
    root = unpickle(data, storage_ref, what=path, trust=trust, extra_globals=extra)

    inflated = _Inflated(path)

    def read_record(ref: StorageRef, start: int, length: int) -> bytes:
        try:
            info = zip_file.getinfo(records[ref.key])
            _check_inflation(path, info)
            return inflated.read(zip_file, info, start, length)
        except ZIP_ERRORS as failure:
            raise BadInputError(f"{path}: corrupt zip record for storage {ref.key} ({failure})") from None

    checkpoint = Checkpoint(
        path=path,
        format="torchscript" if is_script else "torch-zip",
        root=root,
        size_bytes=os.path.getsize(path),
        locate=_zip_locator(path, zip_file, records),
        read_record=read_record,
    )
    if trust and not is_script:
        _expand_trusted_modules(checkpoint)
    if is_script:
        checkpoint.root, checkpoint.parameter_names, left_out = _flatten_script_module(
            root, _script_parameter_lists(zip_file, path, prefix)
        )
        checkpoint.notes.append(
            "TorchScript archive: parameters and buffers of the scripted "
            "module, read from its data without running its code"
        )
        if left_out:
            shown = ", ".join(left_out[:5]) + (f" and {len(left_out) - 5} more" if len(left_out) > 5 else "")
            checkpoint.notes.append(
                f"{len(left_out)} tensor attribute(s) that are neither parameters nor buffers "
                f"(not in the module's state_dict) left out: {shown}"
            )
    return checkpoint


class _Inflated:
    """Compressed zip records (torch never writes them; a hand-made file may), inflated at most
    once per command: the last one is kept whole when it is small enough, so 30,000 tensors of
    one deflated record do not inflate it from its start 30,000 times. What is inflated in
    all is counted against :data:`limits.INFLATED_BYTES`."""

    _KEEP_BYTES = 256 << 20

    def __init__(self, path: str) -> None:
        self.path = path
        self.kept: tuple[str, bytes] | None = None
        self.total = 0

    def _spend(self, count: int, name: str) -> None:
        self.total += count
        if self.total > limits.INFLATED_BYTES.value:
            raise limits.INFLATED_BYTES.exceeded(f"{self.path}: inflating record {name} again")

    def read(self, zip_file: zipfile.ZipFile, info: zipfile.ZipInfo, start: int, length: int) -> bytes:
        if self.kept is not None and self.kept[0] == info.filename:
            return self.kept[1][start : start + length]
        if info.file_size <= self._KEEP_BYTES:
            self.kept = None
            self._spend(info.file_size, info.filename)
            self.kept = (info.filename, zip_file.read(info))
            return self.kept[1][start : start + length]
        self._spend(start + length, info.filename)
        with zip_file.open(info) as record:
            record.seek(start)  # inflates and discards in bounded pieces
            return record.read(length)


def _zip_read(zip_file: zipfile.ZipFile, path: str, name: str) -> bytes:
    try:
        return zip_file.read(name)
    except ZIP_ERRORS as failure:
        raise BadInputError(f"{path}: corrupt or truncated zip archive ({failure})") from None


class ScriptObject(Opaque):
    """A TorchScript module object (``__torch__.…`` class): its attributes, kept as data."""


def _script_class(qualified: str) -> type[ScriptObject]:
    return type("ScriptObject", (ScriptObject,), {"qualified_name": qualified})


class _ScriptGlobals(dict):
    """Allowed globals of TorchScript pickles: module classes as data, list builders."""

    _IDENTITY = {f"torch.jit._pickle.build_{kind}list" for kind in ("int", "float", "bool", "tensor", "double")}

    def __contains__(self, qualified: object) -> bool:
        return isinstance(qualified, str) and (
            qualified.startswith("__torch__.")
            or qualified in self._IDENTITY
            or qualified == "torch.jit._pickle.restore_type_tag"
        )

    def __getitem__(self, qualified: str) -> Any:
        if qualified.startswith("__torch__."):
            return _script_class(qualified)
        if qualified == "torch.jit._pickle.restore_type_tag":
            return lambda value, _type_name=None: value
        return lambda value: value


def _torchscript_globals() -> dict[str, Any]:
    return _ScriptGlobals()


_PARAMS_RE = re.compile(r"__parameters__\s*=\s*\[([^\]]*)\]")
_BUFFERS_RE = re.compile(r"__buffers__\s*=\s*\[([^\]]*)\]")
_CLASS_RE = re.compile(r"^class\s+(\w+)\(", re.MULTILINE)


def _script_parameter_lists(zip_file: zipfile.ZipFile, path: str, prefix: str) -> dict[str, tuple[set[str], set[str]]]:
    """Class name -> its ``(__parameters__, __buffers__)``, from the archive's generated code
    (read as text, never run)."""
    found: dict[str, tuple[set[str], set[str]]] = {}
    for name in zip_file.namelist():
        if not (name.startswith(f"{prefix}code/") and name.endswith(".py")):
            continue
        text = _zip_member(zip_file, path, name).decode(errors="replace")
        classes = list(_CLASS_RE.finditer(text))
        for index, match in enumerate(classes):
            end = classes[index + 1].start() if index + 1 < len(classes) else len(text)
            body = text[match.end() : end]
            params = _PARAMS_RE.search(body)
            buffers = _BUFFERS_RE.search(body)
            if params:
                found[match.group(1)] = (
                    set(re.findall(r'"([^"]+)"', params.group(1))),
                    set(re.findall(r'"([^"]+)"', buffers.group(1))) if buffers else set(),
                )
    return found


def _flatten_script_module(
    root: Any, declared: dict[str, tuple[set[str], set[str]]]
) -> tuple[Any, set[str] | None, list[str]]:
    """Flatten a scripted module's attribute tree into ``{dotted name: TensorInfo}`` holding
    what its ``state_dict()`` holds: the tensors each class declares as parameters or buffers.
    Other tensor attributes (e.g. a recurrent state kept as ``self._state``) are left out and
    their names returned; a class whose declarations are not found keeps every tensor."""
    flat: collections.OrderedDict[str, Any] = collections.OrderedDict()
    parameters: set[str] = set()
    left_out: list[str] = []
    known = True

    def walk(obj: Any, prefix: str) -> None:
        nonlocal known
        state = obj.state if isinstance(obj, ScriptObject) else None
        if not isinstance(state, dict):
            return
        class_name = obj.qualified_name.rsplit(".", 1)[-1]
        lists = declared.get(class_name)
        if lists is None:
            known = False
        for key, value in state.items():
            name = f"{prefix}{key}"
            if isinstance(value, TensorInfo):
                if lists is not None and key not in lists[0] and key not in lists[1]:
                    left_out.append(name)
                    continue
                flat[name] = value
                if lists is not None and key in lists[0]:
                    parameters.add(name)
            elif isinstance(value, ScriptObject):
                walk(value, f"{name}.")

    walk(root, "")
    if not isinstance(root, ScriptObject):
        return root, None, []
    return flat, parameters if known and declared else None, left_out


# --------------------------------------------------------------------------- legacy pickle


def _open_legacy(path: str, trust: bool) -> Checkpoint:
    keys_seen: dict[str, tuple[str, int]] = {}

    def storage_ref(key: str, location: str, size: int) -> StorageRef:
        keys_seen[key] = (location, size)
        return StorageRef(file=path, key=key, size_bytes=size, location=location)

    try:
        handle = open(path, "rb")
    except OSError as failure:
        raise BadInputError(f"cannot read {path}: {failure.strerror or failure}") from None
    with handle:
        size = os.fstat(handle.fileno()).st_size
        for what in ("magic number", "protocol version", "system info"):
            unpickle(handle, storage_ref, what=f"{path} ({what})", size=size)
        root = unpickle(handle, storage_ref, what=path, trust=trust, size=size)
        storage_keys = unpickle(handle, storage_ref, what=f"{path} (storage keys)", size=size)
        if not isinstance(storage_keys, list) or not all(isinstance(k, str) for k in storage_keys):
            raise BadInputError(f"{path}: corrupt legacy checkpoint: storage key list")
        offsets = _walk_legacy_storages(handle, path, storage_keys, keys_seen)
    checkpoint = Checkpoint(
        path=path,
        format="torch-legacy",
        root=root,
        size_bytes=os.path.getsize(path),
        locate=lambda ref: offsets[ref.key],
    )
    if trust:
        _expand_trusted_modules(checkpoint)
    return checkpoint


def _expand_trusted_modules(checkpoint: Checkpoint) -> None:
    """A whole pickled model (``torch.save(model)``), read with trust: list its state dict."""
    from ptools.core.checkpoint.structure import expand_modules

    checkpoint.root, checkpoint.parameter_names, replaced = expand_modules(checkpoint.root)
    if replaced:
        checkpoint.notes.append(
            f"{replaced} whole pickled module(s) (read with `trust=True`): each is shown as its "
            "state_dict() - parameters and persistent buffers"
        )


def _walk_legacy_storages(
    handle: Any, path: str, storage_keys: list[str], keys_seen: dict[str, tuple[str, int]]
) -> dict[str, int]:
    """Each storage is an int64 element count then its bytes; skip over them, noting offsets."""
    file_size = os.fstat(handle.fileno()).st_size
    offsets: dict[str, int] = {}
    position = handle.tell()
    # The keys are torch's in-memory storage ids (addresses at save time): meaningless to a
    # user, so messages count storages instead.
    truncated = "the file is cut short (an interrupted download or copy?)"
    for number, key in enumerate(storage_keys, start=1):
        if key not in keys_seen:
            raise BadInputError(f"{path}: corrupt legacy checkpoint: storage {number} is not described by its pickle")
        handle.seek(position)
        count_bytes = handle.read(8)
        where = f"storage {number} of {len(storage_keys)}"
        if len(count_bytes) < 8:
            raise BadInputError(f"{path}: truncated legacy checkpoint: {where} is missing; {truncated}")
        count = int.from_bytes(count_bytes, "little", signed=True)
        size = keys_seen[key][1]
        if count < 0:
            raise BadInputError(f"{path}: corrupt legacy checkpoint: {where} has a negative size")
        if position + 8 + size > file_size:
            raise BadInputError(
                f"{path}: truncated legacy checkpoint: {where} needs bytes {position + 8:,}–{position + 8 + size:,}, "
                f"the file has {file_size:,}; {truncated}"
            )
        offsets[key] = position + 8
        # The count is in elements; the size we derived from the pickle is in bytes.
        position += 8 + size
    missing = set(keys_seen) - set(offsets)
    if missing:
        raise BadInputError(
            f"{path}: corrupt legacy checkpoint: no data for {len(missing)} storage(s) its pickle describes"
        )
    return offsets


# --------------------------------------------------------------------------- safetensors


def read_safetensors_header(path: str) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
    """Parse and validate a safetensors header without reading tensor data.

    Returns:
        ``(tensors by name in file order, __metadata__, file size)``.

    Raises:
        BadInputError: the header is absurd, not JSON, or lies about the data.
    """
    try:
        with open(path, "rb") as handle:
            file_size = os.fstat(handle.fileno()).st_size
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise BadInputError(f"{path}: too short to be a safetensors file")
            header_size = int.from_bytes(prefix, "little")
            if header_size > file_size - 8:
                raise BadInputError(
                    f"{path}: safetensors header claims {header_size} bytes but the "
                    f"file has {file_size - 8} after the length field"
                )
            if header_size > limits.HEADER_BYTES.value:
                raise limits.HEADER_BYTES.exceeded(f"{path}: safetensors header of {header_size:,} bytes")
            raw = handle.read(header_size)
    except OSError as failure:
        raise BadInputError(f"cannot read {path}: {failure.strerror or failure}") from None
    header = _parse_json(raw, f"{path}: safetensors header")
    if not isinstance(header, dict):
        raise BadInputError(f"{path}: safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise BadInputError(f"{path}: safetensors __metadata__ must map strings to strings")
    data_start = 8 + header_size
    tensors: dict[str, TensorInfo] = {}
    spans = []
    # Files with a million entries repeat a few shapes: each distinct shape is validated once.
    known_shapes: dict[tuple[Any, ...], tuple[tuple[int, ...], tuple[int, ...], int]] = {}
    for name, entry in header.items():
        try:
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            begin, end = entry["data_offsets"]
            shape_key = tuple(entry["shape"])
            shape, stride, numel = known_shapes[shape_key]
            if not (type(begin) is int and type(end) is int and 0 <= begin <= end):
                raise ValueError
        except (TypeError, KeyError, ValueError):
            dtype, shape, begin, end = _safetensors_entry(path, name, entry)
            stride, numel = contiguous_stride(shape), math.prod(shape)
            known_shapes[shape] = (shape, stride, numel)
        nbytes = ITEMSIZE[dtype] * numel
        if end - begin != nbytes:
            raise BadInputError(
                f"{path}: tensor {brief(name)}: data_offsets span {end - begin} bytes, "
                f"its dtype and shape need {nbytes}"
            )
        spans.append((begin, end, name))
        tensors[name] = TensorInfo(dtype, shape, stride, 0, StorageRef(path, name, nbytes, "cpu", data_start + begin))
    position, previous = 0, None
    for begin, end, name in sorted(spans):
        if begin < position:
            raise BadInputError(f"{path}: tensors {brief(previous)} and {brief(name)} overlap in the data")
        if begin > position:
            raise BadInputError(f"{path}: a gap of {begin - position} bytes before tensor {brief(name)}")
        position, previous = end, name
    if data_start + position != file_size:
        raise BadInputError(
            f"{path}: header describes {position} bytes of data but the file holds "
            f"{file_size - data_start}; the file is truncated or padded"
        )
    return tensors, metadata, file_size


def _safetensors_entry(path: str, name: str, entry: Any) -> tuple[str, tuple[int, ...], int, int]:
    """One header entry, checked field by field so that the message names what is wrong."""
    what = f"{path}: tensor {brief(name)}"
    if not isinstance(entry, dict):
        raise BadInputError(f"{what}: header entry is not an object")
    code = entry.get("dtype")
    dtype = SAFETENSORS_DTYPES.get(code) if isinstance(code, str) else None
    if dtype is None:
        raise BadInputError(f"{what}: unknown dtype {brief(code)}")
    shape = entry.get("shape")
    offsets = entry.get("data_offsets")
    if not (isinstance(shape, list) and is_shape(tuple(shape))):
        raise BadInputError(f"{what}: shape {brief(shape)} is not a list of sizes")
    if not (
        isinstance(offsets, list) and len(offsets) == 2 and whole_numbers(tuple(offsets)) and offsets[0] <= offsets[1]
    ):
        raise BadInputError(f"{what}: data_offsets {brief(offsets)} are invalid")
    return dtype, tuple(shape), offsets[0], offsets[1]


def _open_safetensors(path: str) -> Checkpoint:
    tensors, metadata, file_size = read_safetensors_header(path)
    root: collections.OrderedDict[str, Any] = collections.OrderedDict(tensors)
    aliases = restore_aliases(root, metadata)
    checkpoint = Checkpoint(path=path, format="safetensors", root=root, size_bytes=file_size, metadata=metadata)
    if aliases:
        checkpoint.notes.append(f"{aliases} tied tensor name(s) restored from __metadata__")
    return checkpoint


def contained_path(path: str, real_folder: str, what: str) -> str:
    """``path``'s real location, refused unless it lies inside ``real_folder`` (after symlinks).

    Raises:
        BadInputError: an absolute path, ``..``, or a symlink leading out of the folder.
    """
    if not is_within(path, real_folder) or os.path.realpath(path) == os.path.realpath(real_folder):
        raise BadInputError(f"{what} points outside the checkpoint's folder; refusing to read it")
    return os.path.realpath(path)


def restore_aliases(tensors: dict[str, Any], metadata: dict[str, str]) -> int:
    """Re-add tied names that safetensors' ``save_model`` stored as ``{alias: kept name}``."""
    added = 0
    for alias, kept in metadata.items():
        if alias not in tensors and kept in tensors and isinstance(tensors[kept], TensorInfo):
            tensors[alias] = tensors[kept]
            added += 1
    return added


def _parse_json(raw: bytes, what: str) -> Any:
    """JSON from a file we did not write (orjson: several times faster on million-entry
    headers, and a nesting past its bound is a clean error, never a crash)."""
    import orjson

    try:
        return orjson.loads(raw)
    except (UnicodeDecodeError, ValueError) as failure:
        raise BadInputError(f"{what} is not valid JSON ({brief_text(str(failure))})") from None


# --------------------------------------------------------------------------- sharded


def _read_bounded(path: str, limit: limits.Limit, what: str) -> bytes:
    """A whole metadata file, refused (without reading further) once it passes ``limit``."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(limit.value + 1)
    except OSError as failure:
        raise BadInputError(f"cannot read {path}: {failure.strerror or failure}") from None
    if len(data) > limit.value:
        raise limit.exceeded(what)
    return data


def _open_index(path: str, trust: bool) -> Checkpoint:
    index = _parse_json(_read_bounded(path, limits.HEADER_BYTES, f"{path}: index"), path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise BadInputError(f"{path}: not a sharded-checkpoint index (no weight_map of name -> file)")
    folder = os.path.dirname(os.path.abspath(path))
    real_folder = os.path.realpath(folder)
    shards: dict[str, Checkpoint] = {}
    root: collections.OrderedDict[str, Any] = collections.OrderedDict()
    metadata: dict[str, str] = {}
    for name, shard_name in weight_map.items():
        if shard_name not in shards:
            shard_path = os.path.join(folder, shard_name)
            contained_path(shard_path, real_folder, f"{path}: shard {brief(shard_name)}")
            if os.path.realpath(shard_path) == os.path.realpath(path) or shard_name.endswith(".json"):
                raise BadInputError(f"{path}: shard {brief(shard_name)} is an index, not a shard")
            if not os.path.isfile(shard_path):
                raise BadInputError(f"{path}: shard {brief(shard_name)} listed in the index is missing")
            shard = open_checkpoint(shard_path, trust=trust)
            if shard.format not in ("safetensors", "torch-zip", "torch-legacy"):
                raise BadInputError(f"{path}: shard {brief(shard_name)} is a {shard.format} file")
            if not isinstance(shard.root, dict):
                raise BadInputError(f"{path}: shard {brief(shard_name)} does not hold a flat state dict")
            shards[shard_name] = shard
            metadata.update(shard.metadata)
        tensor = shards[shard_name].root.get(name)
        if tensor is None:
            raise BadInputError(f"{path}: tensor {brief(name)} is not in shard {brief(shard_name)}")
        root[name] = tensor
    restore_aliases(root, metadata)
    by_file = {shard.path: shard for shard in shards.values()}
    return Checkpoint(
        path=path,
        format="sharded",
        root=root,
        size_bytes=os.path.getsize(path) + sum(s.size_bytes for s in shards.values()),
        metadata=metadata,
        locate=lambda ref: by_file[ref.file].locate(ref),
        read_record=lambda ref, start, length: by_file[ref.file].read(ref, start, length),
        notes=[f"{len(weight_map)} tensors in {len(shards)} shard(s)"],
    )


# --------------------------------------------------------------------------- DCP


class _DcpRecord(Opaque):
    """A torch.distributed.checkpoint metadata object, kept as data (never its real class)."""


class _DcpGlobals(dict):
    def __contains__(self, qualified: object) -> bool:
        return isinstance(qualified, str) and qualified.startswith("torch.distributed.checkpoint.")

    def __getitem__(self, qualified: str) -> Any:
        return type("DcpRecord", (_DcpRecord,), {"qualified_name": qualified})


def _record_field(record: Any, name: str, position: int | None = None) -> Any:
    state = record.state if isinstance(record, Opaque) else None
    if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):
        state = {**(state[0] or {}), **state[1]}  # (dict state, slot state)
    if isinstance(state, dict):
        return state.get(name)
    if isinstance(state, tuple) and position is not None and position < len(state):
        return state[position]
    if isinstance(record, Opaque) and position is not None and position < len(record.args):
        return record.args[position]
    return None


def _open_dcp(path: str) -> Checkpoint:
    metadata_path = os.path.join(path, ".metadata")
    require_regular_file(metadata_path, "DCP metadata file")
    data = _read_bounded(metadata_path, limits.PICKLE_BYTES, metadata_path)

    def no_storage(key: str, location: str, size: int) -> StorageRef:
        raise BadInputError(f"{metadata_path}: unexpected tensor storage in DCP metadata")

    metadata = unpickle(data, no_storage, what=metadata_path, extra_globals=_DcpGlobals())
    entries = _record_field(metadata, "state_dict_metadata")
    storage_data = _record_field(metadata, "storage_data") or {}
    if not isinstance(entries, dict) or not isinstance(storage_data, dict):
        raise BadInputError(f"{metadata_path}: not DCP metadata (no state_dict_metadata and storage_data)")
    locations = _dcp_locations(path, metadata_path, storage_data)
    root: collections.OrderedDict[str, Any] = collections.OrderedDict()
    for fqn, entry in entries.items():
        if not isinstance(fqn, str):
            raise BadInputError(f"{metadata_path}: entry name {brief(fqn)} is not text")
        chunks = _record_field(entry, "chunks")
        if chunks is None:  # BytesStorageMetadata: a pickled non-tensor object
            root[fqn] = DcpBytes(fqn)
            continue
        root[fqn] = _dcp_tensor(metadata_path, fqn, entry, chunks, locations)
    notes = ["torch.distributed.checkpoint folder: tensors assembled from chunks"]
    nested = _dcp_nesting(root, _record_field(metadata, "planner_data"))
    if nested is not None:
        root = nested
        notes.append("nesting restored from the checkpoint's planner data (as the run saved it)")
    return Checkpoint(path=path, format="dcp", root=root, size_bytes=size_on_disk(path), notes=notes)


def _dcp_nesting(flat: dict[str, Any], planner_data: Any) -> Any:
    """The state dict as the run saved it (``{"model": {...}, "optim": {...}}``), rebuilt from
    the planner's ``{fqn: (key, key, index…)}`` paths; None (keep the flat names) when the
    paths are missing, malformed or collide."""
    if not isinstance(planner_data, dict) or not flat:
        return None
    root: dict[Any, Any] = {}
    for fqn, value in flat.items():
        path = planner_data.get(fqn)
        if not (
            isinstance(path, tuple)
            and 0 < len(path) <= limits.DEPTH.value
            and all(isinstance(k, str) or (type(k) is int and 0 <= k < 1 << 31) for k in path)
        ):
            return None
        node = root
        for key in path[:-1]:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):  # a leaf where the path needs a container
                return None
            node = child
        if path[-1] in node:
            return None
        node[path[-1]] = value
    return _as_containers(root)


def _as_containers(node: Any) -> Any:
    """Dicts keyed 0..n-1 by ints become lists (DCP flattens lists by index)."""
    if not isinstance(node, dict):
        return node
    items = {key: _as_containers(value) for key, value in node.items()}
    if items and all(type(key) is int for key in items) and set(items) == set(range(len(items))):
        return [items[index] for index in range(len(items))]
    return collections.OrderedDict(items)


def _dcp_locations(
    path: str, metadata_path: str, storage_data: dict[Any, Any]
) -> dict[tuple[str, tuple[int, ...]], StorageRef]:
    """Where each chunk's bytes are: files inside the folder, byte ranges inside the files."""
    real_folder = os.path.realpath(path)
    file_sizes: dict[str, int] = {}
    locations: dict[tuple[str, tuple[int, ...]], StorageRef] = {}
    for index, info in storage_data.items():
        fqn, offset = _record_field(index, "fqn", 0), _record_field(index, "offset", 1)
        relative, start, length = (
            _record_field(info, "relative_path", 0),
            _record_field(info, "offset", 1),
            _record_field(info, "length", 2),
        )
        if _record_field(info, "transform_descriptors", 3):
            raise BadInputError(f"{path}: DCP chunks written with transforms (e.g. compression) are not supported")
        offset = tuple(offset) if isinstance(offset, list) else offset
        if not (
            isinstance(fqn, str)
            and isinstance(relative, str)
            and whole_numbers((start, length))
            and (offset is None or whole_numbers(offset))
        ):
            raise BadInputError(f"{metadata_path}: corrupt storage entry {brief(fqn)}")
        file = os.path.join(path, relative)
        real = contained_path(file, real_folder, f"{metadata_path}: shard {brief(relative)}")
        if real not in file_sizes:
            kind = path_kind(real)
            if kind != "file":
                raise BadInputError(
                    f"{path}: DCP shard {brief(relative)} is {'missing' if kind == 'no such file' else kind}"
                )
            file_sizes[real] = os.path.getsize(real)
        if start + length > file_sizes[real]:
            raise BadInputError(
                f"{metadata_path}: {brief(fqn)} is stored at bytes {start:,}–{start + length:,} "
                f"of {relative}, which has {file_sizes[real]:,}"
            )
        locations[(fqn, offset or ())] = StorageRef(
            file=real, key=f"{relative}@{start}", size_bytes=length, offset=start
        )
    return locations


def _dcp_tensor(
    metadata_path: str, fqn: str, entry: Any, chunks: Any, locations: dict[tuple[str, tuple[int, ...]], StorageRef]
) -> TensorInfo:
    """A DCP tensor entry, its chunks checked to lie inside the tensor and to hold their bytes."""
    dtype = _record_field(_record_field(entry, "properties"), "dtype", 0)
    shape = _record_field(entry, "size")
    shape = tuple(shape) if isinstance(shape, (list, tuple)) else shape
    if (
        not isinstance(dtype, TorchDType)
        or dtype.name not in ITEMSIZE
        or not is_shape(shape)
        or not isinstance(chunks, (list, tuple))
    ):
        raise BadInputError(f"{metadata_path}: corrupt tensor entry for {brief(fqn)}")
    itemsize = ITEMSIZE[dtype.name]
    tensor = TensorInfo(dtype=dtype.name, shape=shape, stride=contiguous_stride(shape))
    covered = 0
    for chunk in chunks:
        offsets, sizes = _record_field(chunk, "offsets", 0), _record_field(chunk, "sizes", 1)
        offsets = tuple(offsets) if isinstance(offsets, list) else offsets
        sizes = tuple(sizes) if isinstance(sizes, list) else sizes
        if not (
            whole_numbers(offsets, len(shape))
            and whole_numbers(sizes, len(shape))
            and all(o + n <= d for o, n, d in zip(offsets, sizes, shape))
        ):
            raise BadInputError(f"{metadata_path}: a chunk of {brief(fqn)} lies outside its shape {list(shape)}")
        ref = locations.get((fqn, offsets))
        if ref is None:
            raise BadInputError(f"{metadata_path}: no stored data for a chunk of {brief(fqn)}")
        volume = math.prod(sizes)
        if volume * itemsize > ref.size_bytes:
            raise BadInputError(
                f"{metadata_path}: a chunk of {brief(fqn)} needs {volume * itemsize:,} bytes, "
                f"{ref.size_bytes:,} are stored"
            )
        covered += volume
        tensor.chunks.append((offsets, sizes, ref))
    if covered != tensor.numel:
        raise BadInputError(
            f"{metadata_path}: the chunks of {brief(fqn)} hold {covered:,} of its {tensor.numel:,} elements"
        )
    _check_tiling(metadata_path, fqn, shape, [(offsets, sizes) for offsets, sizes, _ in tensor.chunks])
    return tensor


def _check_tiling(
    metadata_path: str, fqn: str, shape: tuple[int, ...], boxes: list[tuple[tuple[int, ...], tuple[int, ...]]]
) -> None:
    """Refuse chunks that overlap. Inside the tensor and adding up to its size (checked
    before), disjoint chunks tile it exactly: no element is left for uninitialised memory.

    The chunks' edges cut each dimension into intervals; every chunk is a block of the grid
    they make, painted once (the grid is bounded, so a hostile layout costs little).
    """
    import numpy as np

    boxes = [box for box in boxes if all(box[1])]  # empty chunks hold nothing to overlap
    if len(boxes) < 2:
        return
    edges = [
        sorted({0, extent, *(o[d] for o, _ in boxes), *(o[d] + n[d] for o, n in boxes)})
        for d, extent in enumerate(shape)
    ]
    cells = math.prod(len(cuts) - 1 for cuts in edges)
    if cells > limits.OBJECTS.value:
        raise limits.OBJECTS.exceeded(f"{metadata_path}: the chunks of {brief(fqn)} cut it into {cells:,} cells")
    painted = np.zeros([len(cuts) - 1 for cuts in edges], dtype=bool)
    for offsets, sizes in boxes:
        block = painted[
            tuple(
                slice(bisect.bisect_left(cuts, o), bisect.bisect_left(cuts, o + n))
                for cuts, o, n in zip(edges, offsets, sizes)
            )
        ]
        if block.any():
            raise BadInputError(
                f"{metadata_path}: chunks of {brief(fqn)} overlap (one at offsets {list(offsets)}); "
                "DCP chunks must tile the tensor"
            )
        block[...] = True


class DcpBytes:
    """A non-tensor object stored in a DCP checkpoint (its bytes are a pickle, not read)."""

    def __init__(self, fqn: str) -> None:
        self.fqn = fqn

    def __repr__(self) -> str:
        return "<pickled object in DCP>"
