"""Converting checkpoints: remap devices, rename/select keys, extract, cast, change format.

The key transforms (:func:`strip_prefix`, :func:`add_prefix`, :func:`rename_keys`,
:func:`select_keys`) work on any mapping — a state dict of torch tensors in a training script
as well as the tensor descriptions ptools reads. :func:`cast_floating` casts a torch state
dict. :func:`convert_checkpoint` does the whole job on files: it reads through the safe
reader, streams tensor data storage by storage, writes to a temporary file next to the
output, verifies it if asked, and only then renames it into place.
"""

from __future__ import annotations

import collections
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from ptools.core.checkpoint.readers import Checkpoint, DcpBytes, open_checkpoint
from ptools.core.checkpoint.structure import find_state_dict, is_state_dict, iter_tensors
from ptools.core.checkpoint.tensors import TensorInfo
from ptools.core.checkpoint.writers import (
    CASTABLE,
    CastTally,
    OutputStorage,
    SafetensorsEntry,
    build_torch_pickle,
    write_safetensors,
    write_torch_zip,
)
from ptools.core.choices import CastDtype, CastScope, CheckpointOutputFormat, values
from ptools.core.files import (
    fsync_folder,
    is_within,
    size_on_disk,
    stale_temporaries,
    temporary_path,
    write_atomically,
    write_file,
)
from ptools.errors import BadInputError

WRAPPER_PREFIXES = ("module.", "_orig_mod.")
OPTIMIZER_KEYS = (
    "optimizer",
    "optimizers",
    "optimizer_state_dict",
    "optimizer_states",
    "optim",
    "optim_state_dict",
    "lr_scheduler",
    "lr_schedulers",
    "scheduler",
    "schedulers",
    "scheduler_state_dict",
    "scaler",
    "grad_scaler",
    "scaler_state_dict",
    "amp",
)
TORCH_EXTENSIONS = (".pt", ".pth", ".bin", ".ckpt", ".tar")
OUTPUT_FORMATS = values(CheckpointOutputFormat)
DTYPES = {
    "fp16": "float16",
    "float16": "float16",
    "half": "float16",
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp32": "float32",
    "float32": "float32",
    "float": "float32",
}
_DEVICE_RE = re.compile(r"^[a-z]+(:\d+)?$")


# --------------------------------------------------------------------------- key transforms


def _with_metadata(
    items: Iterable[tuple[str, Any]], source: Mapping[str, Any], rename_module: Callable[[str], str | None] | None
) -> collections.OrderedDict[str, Any]:
    """An OrderedDict of ``items`` keeping the source's ``_metadata`` (per-module versions),
    its module keys renamed like the tensor keys."""
    result: collections.OrderedDict[str, Any] = collections.OrderedDict(items)
    metadata = getattr(source, "_metadata", None)
    if metadata is not None:
        if rename_module is not None:
            renamed = collections.OrderedDict()
            for module, value in metadata.items():
                new = rename_module(module)
                if new is not None:
                    renamed[new] = value
            metadata = renamed
        result._metadata = metadata  # type: ignore[attr-defined]
    return result


def _check_collisions(pairs: list[tuple[str, str]], what: str) -> None:
    seen: dict[str, str] = {}
    for old, new in pairs:
        if new in seen:
            raise BadInputError(
                f"{what} makes {seen[new]!r} and {old!r} both {new!r}", "change the pattern so that names stay distinct"
            )
        seen[new] = old


def detect_wrapper_prefix(names: Iterable[str]) -> str:
    """The ``module.``/``_orig_mod.`` prefix (possibly stacked) shared by every name, or ""."""
    names = list(names)
    prefix = ""
    while names:
        for candidate in WRAPPER_PREFIXES:
            if all(name.startswith(prefix + candidate) for name in names):
                prefix += candidate
                break
        else:
            break
    return prefix


def strip_prefix(state_dict: Mapping[str, Any], prefix: str = "auto") -> tuple[collections.OrderedDict[str, Any], str]:
    """Remove ``prefix`` from the keys that start with it (``auto``: the wrapper prefix shared
    by every key, see :func:`detect_wrapper_prefix`). Returns the new dict and the prefix removed.

    Raises:
        BadInputError: stripping makes two keys equal.
    """
    if prefix == "auto":
        prefix = detect_wrapper_prefix(state_dict)
    if not prefix:
        return _with_metadata(state_dict.items(), state_dict, None), ""
    pairs = [(k, k[len(prefix) :] if k.startswith(prefix) else k) for k in state_dict]
    _check_collisions(pairs, f"`strip` {prefix!r}")
    module = prefix.rstrip(".")

    def rename_module(name: str) -> str:
        if name == module:
            return ""
        return name[len(prefix) :] if name.startswith(prefix) else name

    return _with_metadata(((new, state_dict[old]) for old, new in pairs), state_dict, rename_module), prefix


def add_prefix(state_dict: Mapping[str, Any], prefix: str) -> collections.OrderedDict[str, Any]:
    """Put ``prefix`` in front of every key (e.g. ``module.`` to load into a DDP-wrapped model)."""
    module = prefix.rstrip(".")
    return _with_metadata(
        ((prefix + k, v) for k, v in state_dict.items()),
        state_dict,
        lambda name: module if name == "" else prefix + name,
    )


def parse_rename(rule: str) -> tuple[re.Pattern[str], str]:
    """``'REGEX=REPLACEMENT'`` (split at the first ``=``) -> compiled rule.

    Raises:
        BadInputError: no ``=``, or an invalid regular expression.
    """
    pattern, sep, replacement = rule.partition("=")
    if not sep or not pattern:
        raise BadInputError(f"`rename` {rule!r} is not REGEX=REPLACEMENT")
    try:
        return re.compile(pattern), replacement
    except re.error as failure:
        raise BadInputError(f"`rename` {rule!r}: invalid regular expression ({failure})") from None


def rename_keys(
    state_dict: Mapping[str, Any], rules: Iterable[str | tuple[re.Pattern[str], str]]
) -> collections.OrderedDict[str, Any]:
    """Apply ``re.sub`` rules to every key, in order.

    Raises:
        BadInputError: a rule is malformed, or two keys end up equal (both are named).
    """
    compiled = [parse_rename(r) if isinstance(r, str) else r for r in rules]

    def apply(name: str) -> str:
        for pattern, replacement in compiled:
            try:
                name = pattern.sub(replacement, name)
            except (re.error, IndexError) as failure:
                raise BadInputError(f"`rename` {pattern.pattern!r}: bad replacement ({failure})") from None
        return name

    pairs = [(k, apply(k)) for k in state_dict]
    _check_collisions(pairs, "`rename`")
    return _with_metadata(((new, state_dict[old]) for old, new in pairs), state_dict, apply)


def select_keys(
    state_dict: Mapping[str, Any], keep: str | None = None, drop: str | None = None
) -> collections.OrderedDict[str, Any]:
    """Keep the keys matching ``keep`` (searched), then remove those matching ``drop``."""

    def compiled(flag: str, text: str | None) -> re.Pattern[str] | None:
        try:
            return re.compile(text) if text is not None else None
        except re.error as failure:
            raise BadInputError(f"{flag} {text!r}: invalid regular expression ({failure})") from None

    keep_re, drop_re = compiled("`keep`", keep), compiled("`drop`", drop)
    items = [
        (k, v)
        for k, v in state_dict.items()
        if (keep_re is None or keep_re.search(k)) and not (drop_re is not None and drop_re.search(k))
    ]
    return _with_metadata(items, state_dict, None)


def parse_dtype(text: str) -> str:
    """``fp16|bf16|fp32`` (and their torch names) -> dtype name."""
    if text not in DTYPES:
        raise BadInputError(f"unknown `dtype` {text!r}; choose one of: fp16, bf16, fp32")
    return DTYPES[text]


def cast_floating(
    state_dict: Mapping[str, Any], dtype: Any, keep_dtype: str | None = None
) -> collections.OrderedDict[str, Any]:
    """Cast the floating-point torch tensors of a state dict to ``dtype``; integers, booleans
    (``num_batches_tracked``, masks) and keys matching ``keep_dtype`` stay as they are."""
    import torch

    target = getattr(torch, parse_dtype(dtype)) if isinstance(dtype, str) else dtype
    keep_re = re.compile(keep_dtype) if keep_dtype else None
    items = []
    for name, value in state_dict.items():
        if (
            isinstance(value, torch.Tensor)
            and value.is_floating_point()
            and value.dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16)
            and not (keep_re is not None and keep_re.search(name))
        ):
            value = value.to(target)
        items.append((name, value))
    return _with_metadata(items, state_dict, None)


def parse_map_location(text: str) -> Callable[[str], str]:
    """torch's ``map_location`` as a function of device tags: ``cpu``, ``cuda``, ``cuda:N``, or
    ``'cuda:1=cuda:0,cuda:2=cuda:0'`` (tags not listed stay).

    Raises:
        BadInputError: a device is not of the form ``type`` or ``type:index``.
    """

    def device(value: str) -> str:
        value = value.strip()
        if not _DEVICE_RE.match(value):
            raise BadInputError(f"`map_location`: {value!r} is not a device (cpu, cuda, cuda:1, …)")
        return value

    if "=" not in text:
        target = device(text)
        return lambda _location: target
    mapping = {}
    for pair in text.split(","):
        source, sep, target = pair.partition("=")
        if not sep:
            raise BadInputError(f"`map_location`: {pair!r} is not FROM=TO")
        mapping[device(source)] = device(target)
    return lambda location: mapping.get(location, location)


# --------------------------------------------------------------------------- the conversion


@dataclass
class ConversionReport:
    """What a conversion did (or, with ``dry_run``, would do)."""

    input: str
    output: str
    input_format: str
    output_format: str
    state_dict_key: str
    state_dict_how: str
    tensors: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    renamed: int = 0
    stripped_prefix: str = ""
    dropped_keys: list[str] = field(default_factory=list)
    dropped_entries: list[str] = field(default_factory=list)
    cast: int = 0
    kept_dtype: list[str] = field(default_factory=list)
    cast_scope: str = "weights"
    outside_cast_scope: int = 0
    cast_losses: list[dict[str, Any]] = field(default_factory=list)
    devices: dict[str, str] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    shards: int = 0
    notes: list[str] = field(default_factory=list)
    plan: list[dict[str, Any]] = field(default_factory=list)
    dry_run: bool = False
    verified: bool | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def output_format(path: str, requested: str | None, shard_size: int | None) -> str:
    """``torch``, ``safetensors`` or ``sharded`` from ``--format``, ``--shard-size`` or the extension."""
    if requested is not None and requested not in OUTPUT_FORMATS:
        raise BadInputError(f"unknown `format` {requested!r}; choose one of: {', '.join(OUTPUT_FORMATS)}")
    if shard_size is not None:
        if requested == "torch":
            raise BadInputError("`shard_size` writes sharded safetensors; it cannot go with `format` torch")
        return "sharded"
    if requested is not None:
        return requested
    lowered = path.lower()
    if lowered.endswith(".safetensors"):
        return "safetensors"
    if lowered.endswith(TORCH_EXTENSIONS):
        return "torch"
    raise BadInputError(
        f"cannot tell the output format from {path!r}",
        "use .pt/.pth/.bin/.ckpt or .safetensors, or pass `format` torch|safetensors",
    )


def _input_files(checkpoint: Checkpoint) -> set[str]:
    """Real paths of everything the checkpoint was read from (its path, shards, chunk files)."""
    files = {checkpoint.path}
    for _, tensor in iter_tensors(checkpoint.root):
        if tensor.storage is not None:
            files.add(tensor.storage.file)
        files.update(ref.file for _, _, ref in tensor.chunks)
    return {os.path.realpath(f) for f in files}


def _is_input(path: str, inputs: set[str]) -> bool:
    real = os.path.realpath(path)
    if real in inputs:
        return True
    if not os.path.exists(path):
        return False
    return any(os.path.exists(other) and os.path.samefile(path, other) for other in inputs)  # hard links


def _check_destination(inputs: set[str], destination: str, force: bool, kind: str) -> None:
    """Refuse any destination whose writing could touch the input (``inputs``: real paths of
    its files and folders): the same file (by path, symlink or hard link), or a file inside an
    input folder. What a sharded OUT folder may lose is decided by :class:`_ShardedTarget`."""
    never = "ptools never overwrites its input"
    if _is_input(destination, inputs) or any(is_within(destination, path) for path in inputs if os.path.isdir(path)):
        raise BadInputError(f"{destination} is the input (or part of it); {never}", "write to another path")
    folder = os.path.dirname(os.path.abspath(destination))
    if not os.path.isdir(folder):
        raise BadInputError(f"folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise BadInputError(f"cannot write to folder {folder}")
    if kind == "sharded":
        if os.path.lexists(destination) and not os.path.isdir(destination):
            raise BadInputError(f"{destination} exists and is not a folder; `shard_size` writes a folder")
        return  # what may be replaced inside it is decided by _ShardedTarget
    if os.path.isdir(destination):
        raise BadInputError(
            f"{destination} is a folder",
            "name the output file, e.g. "
            f"{os.path.join(destination, 'model' + ('.safetensors' if kind == 'safetensors' else '.pt'))}",
        )
    if os.path.lexists(destination):
        if not force:
            raise BadInputError(f"{destination} exists", "pass `force=True` to replace it")
        if os.path.islink(destination) or not os.path.isfile(destination):
            raise BadInputError(
                f"{destination} is not a regular file; `force=True` replaces only a file",
                "remove it yourself or write elsewhere",
            )


_SHARD_NAME = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
INDEX_NAME = "model.safetensors.index.json"


def _drop_training_state(root: Any, state_dict_path: str) -> list[str]:
    if not isinstance(root, dict):
        return []
    head = state_dict_path.split(".", 1)[0] if state_dict_path else None
    dropped = []
    for key in list(root):
        value = root[key]
        is_optimizer = isinstance(value, Mapping) and {"state", "param_groups"} <= set(value)
        is_list = (
            isinstance(value, list)
            and value
            and all(isinstance(v, Mapping) and {"state", "param_groups"} <= set(v) for v in value)
        )
        if key != head and (key in OPTIMIZER_KEYS or is_optimizer or is_list):
            del root[key]
            dropped.append(str(key))
    return dropped


def _replace_at(root: Any, path: str, value: Any) -> Any:
    """``root`` with the node at dotted ``path`` (read as :func:`navigate` reads it) replaced."""
    if path == "":
        return value
    container: Any = None
    key: Any = None
    node, rest = root, path
    while rest:  # the same walk as navigate, remembering the last container and key
        if isinstance(node, Mapping):
            parts = rest.split(".")
            cut = next((c for c in range(len(parts), 0, -1) if ".".join(parts[:c]) in node), None)
            if cut is None:  # a key that is not text (an int, bytes) cannot be named by a path
                raise BadInputError(
                    f"cannot rewrite the state dict at {path!r}: a key on its path is not text",
                    "pass `extract='auto'` to write the state dict alone",
                )
            container, key = node, ".".join(parts[:cut])
            node, rest = node[key], ".".join(parts[cut:])
        else:
            head, _, rest = rest.partition(".")
            container, key = node, int(head)
            node = node[key]
    if isinstance(container, tuple):
        raise BadInputError(f"cannot rewrite {path!r}: it sits inside a tuple")
    container[key] = value
    return root


def _storage_identity(tensor: TensorInfo) -> tuple[str, str] | None:
    if tensor.storage is not None:
        return tensor.storage.file, tensor.storage.key
    return None


def convert_checkpoint(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    map_location: str | None = None,
    strip: str | None = None,
    add: str | None = None,
    rename: Iterable[str] = (),
    keep: str | None = None,
    drop: str | None = None,
    extract: str | None = None,
    flatten: bool = False,
    drop_optimizer: bool = False,
    dtype: CastDtype | None = None,
    keep_dtype: str | None = None,
    cast_scope: CastScope = "weights",
    format: CheckpointOutputFormat | None = None,  # noqa: A002  (the flag's name)
    shard_size: int | None = None,
    force: bool = False,
    trust: bool = False,
    dry_run: bool = False,
    verify: bool = False,
    on_bytes: Callable[[int], None] | None = None,
    on_total: Callable[[int], None] | None = None,
) -> ConversionReport:
    """Convert checkpoint ``src`` into ``dst``; see the module docstring and README.

    ``on_bytes(n)`` is called as output bytes are written, after ``on_total(size)`` announced
    how many will be (for progress bars).

    Raises:
        BadInputError: bad input, options or destination (nothing is written).
        UnsafeFileError: the input needs code to be read and ``trust`` is off.
    """
    started = time.perf_counter()
    src, dst = os.fspath(src), os.fspath(dst)
    kind = output_format(dst, format, shard_size)
    target_dtype = parse_dtype(dtype) if dtype is not None else None
    if cast_scope not in values(CastScope):
        raise BadInputError(f"unknown `cast_scope` {cast_scope!r}; choose one of: {', '.join(values(CastScope))}")
    relocate = parse_map_location(map_location) if map_location is not None else None
    try:
        keep_dtype_re = re.compile(keep_dtype) if keep_dtype else None
    except re.error as failure:
        raise BadInputError(f"`keep_dtype` {keep_dtype!r}: invalid regular expression ({failure})") from None
    rename_rules = [parse_rename(rule) for rule in rename]
    checkpoint = open_checkpoint(src, trust=trust)
    inputs = _input_files(checkpoint)
    notes_for_report: list[str] = []
    if not dry_run:
        _check_destination(inputs, dst, force, kind)

    root = checkpoint.root
    if checkpoint.format == "dcp":
        # Non-tensor DCP entries are pickles of their own that ptools does not read: left out.
        kept = collections.OrderedDict((k, v) for k, v in root.items() if not isinstance(v, DcpBytes))
        if len(kept) != len(root):
            notes_for_report = [f"{len(root) - len(kept)} non-tensor DCP entr(ies) (pickled objects) left out"]
            root = kept
    path, node, how = find_state_dict(root, extract if extract is not None else "auto")
    if extract is None and not isinstance(node, Mapping):
        raise BadInputError("the model weights are not a dict of tensors; pass `extract` KEY")
    state = node if isinstance(node, Mapping) else collections.OrderedDict(iter_tensors(node))
    report = ConversionReport(
        input=src,
        output=dst,
        input_format=checkpoint.format,
        output_format=kind,
        state_dict_key=path,
        state_dict_how=how,
        dry_run=dry_run,
        bytes_in=checkpoint.size_bytes,
        cast_scope=cast_scope,
    )
    report.notes += [*checkpoint.notes, *notes_for_report]
    stale = stale_temporaries(dst)
    if stale:
        report.notes.append(
            f"{len(stale)} temporary file(s) from an interrupted earlier run: "
            f"{' '.join(stale[:3])}{' …' if len(stale) > 3 else ''}; ptools leaves them; "
            "remove them with rm -r once no conversion is running"
        )
    # Where each tensor was, by object, in order (a tied tensor sits under several names).
    original_paths: dict[int, collections.deque[str]] = collections.defaultdict(collections.deque)
    for original_path, tensor in iter_tensors(root):
        original_paths[id(tensor)].append(original_path)

    transformed = select_keys(state, keep, drop)
    report.dropped_keys = [k for k in state if k not in transformed]
    if strip is not None:
        transformed, report.stripped_prefix = strip_prefix(transformed, strip)
        if strip == "auto" and not report.stripped_prefix:
            report.notes.append("`strip='auto'`: no module./_orig_mod. prefix shared by every key")
    if add is not None:
        transformed = add_prefix(transformed, add)
    if rename_rules:
        transformed = rename_keys(transformed, rename_rules)
    kept_names = [k for k in state if k not in report.dropped_keys]
    report.renamed = sum(1 for old, new in zip(kept_names, transformed) if old != new)

    if extract is not None:
        root = transformed
    else:
        root = _replace_at(root, path, transformed)
        if drop_optimizer:
            report.dropped_entries = _drop_training_state(root, path)
            if not report.dropped_entries:
                report.notes.append("`drop_optimizer`: no optimizer, scheduler or scaler state found")

    if kind != "torch":
        root = _flat_tensors(root, flatten, report)

    # Casting decisions are per storage: tensors sharing one must keep sharing one dtype.
    names_by_storage: dict[Any, list[str]] = collections.defaultdict(list)
    for name, tensor in iter_tensors(root):
        names_by_storage[_storage_identity(tensor) or id(tensor)].append(name)
    # By default only the model weights are cast: an optimizer's second moments (exp_avg_sq,
    # ~1e-10 and below) underflow to zero in float16.
    in_cast_scope = (
        None
        if cast_scope == "all"
        else {_storage_identity(tensor) or id(tensor) for _, tensor in iter_tensors(transformed)}
    )

    def dtype_for(tensor: TensorInfo) -> str:
        if target_dtype is None or tensor.dtype not in CASTABLE:
            return tensor.dtype
        identity = _storage_identity(tensor) or id(tensor)
        if in_cast_scope is not None and identity not in in_cast_scope:
            return tensor.dtype
        if keep_dtype_re is not None and any(keep_dtype_re.search(n) for n in names_by_storage[identity]):
            return tensor.dtype
        return target_dtype

    for name, tensor in iter_tensors(root):
        report.tensors += 1
        new_dtype = dtype_for(tensor)
        if new_dtype != tensor.dtype:
            report.cast += 1
        elif target_dtype is not None and tensor.dtype in CASTABLE and tensor.dtype != target_dtype:
            if in_cast_scope is not None and (_storage_identity(tensor) or id(tensor)) not in in_cast_scope:
                report.outside_cast_scope += 1
            else:
                report.kept_dtype.append(name)
        device = tensor.device
        new_device = relocate(device) if relocate is not None and kind == "torch" else device
        if new_device != device:
            report.devices[device] = new_device
        if dry_run:
            sources = original_paths.get(id(tensor))
            report.plan.append(
                {
                    "from": sources.popleft() if sources else name,
                    "to": name,
                    "dtype": tensor.dtype,
                    "new_dtype": new_dtype,
                    "device": device,
                    "new_device": new_device,
                    "shape": list(tensor.shape),
                }
            )
    if dry_run:
        prefix = f"{path}." if path else ""
        for name in report.dropped_keys:
            value = state[name]
            if isinstance(value, TensorInfo):
                report.plan.append(
                    {
                        "from": prefix + name,
                        "to": None,
                        "dtype": value.dtype,
                        "new_dtype": None,
                        "device": value.device,
                        "new_device": None,
                        "shape": list(value.shape),
                    }
                )
    if relocate is not None and kind != "torch":
        report.notes.append("`map_location` has no effect on safetensors output (it stores no devices)")

    storages: dict[Any, OutputStorage] = {}

    def storage_for(tensor: TensorInfo) -> OutputStorage | None:
        if tensor.storage is None and not tensor.chunks:
            return None  # a meta tensor
        identity = _storage_identity(tensor) or id(tensor)
        known = storages.get(identity)
        if (
            known is not None
            and tensor.storage is not None
            and known.tensor.storage is not None
            and (known.tensor.dtype != tensor.dtype or known.tensor.storage.size_bytes != tensor.storage.size_bytes)
        ):
            raise BadInputError(
                f"{src}: storage {tensor.storage.key} is claimed with different dtypes or sizes "
                "by the tensors sharing it; the file is corrupt"
            )
        if identity not in storages:
            location = tensor.device
            new_dtype = dtype_for(tensor)
            tally = (
                CastTally(names_by_storage[identity][:16], tensor.dtype, new_dtype)
                if new_dtype != tensor.dtype
                else None
            )
            storages[identity] = OutputStorage(
                key=str(len(storages)),
                source_checkpoint=checkpoint,
                tensor=tensor,
                dtype=new_dtype,
                location=relocate(location) if relocate else location,
                tally=tally,
            )
        return storages[identity]

    if kind == "torch":
        pickle_bytes = build_torch_pickle(root, storage_for, dtype_for)
        report.bytes_out = len(pickle_bytes) + sum(s.nbytes for s in storages.values())

        def write(handle: Any) -> None:
            archive = os.path.splitext(os.path.basename(dst))[0] or "archive"
            write_torch_zip(
                handle, re.sub(r"[^A-Za-z0-9_.-]", "_", archive), pickle_bytes, list(storages.values()), on_bytes
            )
    else:
        entries, metadata = _safetensors_entries(root, checkpoint, dtype_for, report)
        for entry in entries:
            if entry.dtype != entry.tensor.dtype:
                entry.tally = CastTally([entry.name], entry.tensor.dtype, entry.dtype)
        report.bytes_out = sum(e.nbytes for e in entries)
        groups = _shards(entries, shard_size) if kind == "sharded" else [entries]
        report.shards = len(groups) if kind == "sharded" else 0

        def write(handle: Any) -> None:
            write_safetensors(handle, entries, metadata, on_bytes)

    if dry_run:
        report.seconds = time.perf_counter() - started
        return report
    _check_space(dst, report.bytes_out)
    if on_total is not None:  # for a progress bar: the bytes about to be written
        on_total(report.bytes_out)
    if kind == "sharded":
        target = _ShardedTarget.plan(dst, len(groups), force, inputs)
        _write_sharded(target, groups, metadata, on_bytes, verify, report)
    else:
        write_atomically(
            dst, write, (lambda tmp: _verify(tmp, root, checkpoint, dtype_for, report)) if verify else None
        )
    tallies = [s.tally for s in storages.values()] if kind == "torch" else [e.tally for e in entries]
    report.cast_losses = [tally.to_dict() for tally in tallies if tally is not None and tally.lossy]
    report.bytes_out = size_on_disk(dst)
    report.seconds = time.perf_counter() - started
    return report


def _flat_tensors(root: Any, flatten: bool, report: ConversionReport) -> collections.OrderedDict[str, Any]:
    """safetensors holds a flat name -> tensor map: refuse anything else unless --flatten."""
    if is_state_dict(root) and all(isinstance(v, TensorInfo) for v in root.values()):
        return collections.OrderedDict(root)
    if not flatten:
        offending = (
            [str(k) for k, v in root.items() if not isinstance(v, TensorInfo)]
            if isinstance(root, Mapping)
            else ["(top level)"]
        )
        shown = ", ".join(offending[:8]) + (f" and {len(offending) - 8} more" if len(offending) > 8 else "")
        raise BadInputError(
            f"safetensors holds only a flat dict of tensors; these entries are not tensors: {shown}",
            "pass `extract='auto'` (the model weights) or `flatten=True`",
        )
    flat = collections.OrderedDict(iter_tensors(root))
    dropped = sum(1 for _ in _non_tensor_leaves(root))
    if dropped:
        report.notes.append(f"`flatten=True`: {dropped} non-tensor value(s) left out")
    return flat


def _non_tensor_leaves(node: Any) -> Iterable[Any]:
    if isinstance(node, Mapping):
        for value in node.values():
            yield from _non_tensor_leaves(value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            yield from _non_tensor_leaves(value)
    elif not isinstance(node, TensorInfo):
        yield node


def _safetensors_entries(
    root: Mapping[str, Any], checkpoint: Checkpoint, dtype_for: Callable[[TensorInfo], str], report: ConversionReport
) -> tuple[list[SafetensorsEntry], dict[str, str]]:
    """One entry per distinct tensor; exact aliases (tied weights) recorded in metadata the way
    safetensors' ``save_model`` does: ``{alias: kept name}``."""
    entries: list[SafetensorsEntry] = []
    first: dict[Any, str] = {}
    metadata = {k: v for k, v in checkpoint.metadata.items() if not (k in root and v in root)}
    metadata.setdefault("format", "pt")
    for name, tensor in root.items():
        if tensor.storage is None and not tensor.chunks:
            raise BadInputError(f"{name} is a meta tensor (no data); safetensors cannot hold it", "`drop` it")
        view = (
            _storage_identity(tensor) or id(tensor),
            tensor.storage_offset,
            tuple(tensor.shape),
            tuple(tensor.stride),
            tensor.dtype,
        )
        if view in first:
            metadata[name] = first[view]
            report.aliases[name] = first[view]
            continue
        first[view] = name
        entries.append(SafetensorsEntry(name=name, checkpoint=checkpoint, tensor=tensor, dtype=dtype_for(tensor)))
    return entries, metadata


def _shards(entries: list[SafetensorsEntry], shard_size: int | None) -> list[list[SafetensorsEntry]]:
    """Greedy packing in order; a tensor larger than the limit gets a shard of its own."""
    if not shard_size or shard_size <= 0:
        raise BadInputError("`shard_size` must be a positive size, e.g. 2GB")
    groups: list[list[SafetensorsEntry]] = [[]]
    size = 0
    for entry in entries:
        if groups[-1] and size + entry.nbytes > shard_size:
            groups.append([])
            size = 0
        groups[-1].append(entry)
        size += entry.nbytes
    return groups


SPACE_MARGIN = 16 << 20


def _check_space(destination: str, needed: int) -> None:
    folder = os.path.dirname(os.path.abspath(destination))
    free = shutil.disk_usage(folder).free
    if needed + SPACE_MARGIN > free:
        from ptools.core.units import format_bytes

        raise BadInputError(
            f"not enough disk space in {folder}: the output needs {format_bytes(needed)} plus a "
            f"{format_bytes(SPACE_MARGIN)} margin, {format_bytes(free)} is free"
        )


@dataclass
class _ShardedTarget:
    """Where a sharded output goes, and the only files an existing OUT may lose: the index
    ptools wrote there before and the shards it names (by ptools' own naming)."""

    folder: str
    names: list[str]  # the new shards, then the index
    stale: list[str]  # shards of the old index that the new output no longer has

    @classmethod
    def plan(cls, folder: str, count: int, force: bool, inputs: set[str]) -> _ShardedTarget:
        names = [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)] + [INDEX_NAME]
        ours = cls._files_of_old_index(folder)
        replaced = [name for name in names if os.path.lexists(os.path.join(folder, name))]
        stale = sorted(set(ours) - set(names))
        for name in replaced:
            if name not in ours:
                raise BadInputError(
                    f"{os.path.join(folder, name)} exists and is not part of a sharded output "
                    "ptools can recognise; ptools never replaces it",
                    "write to another folder",
                )
        for name in replaced + stale:
            path = os.path.join(folder, name)
            if _is_input(path, inputs):
                raise BadInputError(
                    f"{folder} holds the input ({name}); writing there would replace it",
                    "write the shards to another folder",
                )
            if os.path.islink(path) or not os.path.isfile(path):
                raise BadInputError(f"{path} is not a regular file; ptools never replaces it")
        if (replaced or stale) and not force:
            raise BadInputError(
                f"{folder} already holds a sharded output ({len(ours) - 1} shard(s))", "pass `force=True` to replace it"
            )
        return cls(folder=folder, names=names, stale=stale)

    @staticmethod
    def _files_of_old_index(folder: str) -> list[str]:
        index_path = os.path.join(folder, INDEX_NAME)
        if not os.path.isfile(index_path):
            return []
        try:
            with open(index_path, "rb") as handle:
                weight_map = json.loads(handle.read(64 << 20)).get("weight_map")
        except (OSError, ValueError, RecursionError, AttributeError):
            return []
        if not isinstance(weight_map, dict):
            return []
        shards = {name for name in weight_map.values() if isinstance(name, str) and _SHARD_NAME.match(name)}
        return sorted(shards) + [INDEX_NAME]


def _write_sharded(
    target: _ShardedTarget,
    groups: list[list[SafetensorsEntry]],
    metadata: dict[str, str],
    on_bytes: Callable[[int], None] | None,
    verify: bool,
    report: ConversionReport,
) -> None:
    """Shards and the index into a temporary folder; verified there; then moved into place
    (the whole folder when OUT is new, file by file with the index last otherwise)."""
    destination = target.folder
    exists = os.path.isdir(destination)
    temporary = temporary_path(os.path.join(destination, "shards") if exists else destination, directory=True)
    try:
        weight_map: dict[str, str] = {}
        for group, shard in zip(groups, target.names):
            kept = {e.name for e in group}
            shard_metadata = {k: v for k, v in metadata.items() if k not in report.aliases or v in kept}

            def write_shard(handle: Any, g: list[SafetensorsEntry] = group, m: dict[str, str] = shard_metadata) -> None:
                write_safetensors(handle, g, m, on_bytes)

            write_file(os.path.join(temporary, shard), write_shard)
            weight_map.update({e.name: shard for e in group})
        index = {"metadata": {"total_size": report.bytes_out}, "weight_map": weight_map}
        write_file(
            os.path.join(temporary, INDEX_NAME), lambda handle: handle.write(json.dumps(index, indent=2).encode())
        )
        if verify:
            _verify_against(os.path.join(temporary, INDEX_NAME), groups, report)
        if not exists:
            os.chmod(temporary, 0o755)
            os.replace(temporary, destination)
            fsync_folder(os.path.dirname(os.path.abspath(destination)))
            return
        for name in target.names:  # the index last: until then the old index stays whole
            os.chmod(os.path.join(temporary, name), 0o644)
            os.replace(os.path.join(temporary, name), os.path.join(destination, name))
        for name in target.stale:
            os.unlink(os.path.join(destination, name))
        fsync_folder(destination)
        os.rmdir(temporary)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def _verify(
    path: str, root: Any, source: Checkpoint, dtype_for: Callable[[TensorInfo], str], report: ConversionReport
) -> None:
    """Re-read the written file and compare every tensor with its source (after any cast)."""
    written = open_checkpoint(path)
    expected = collections.OrderedDict(iter_tensors(root))
    actual_root = written.root
    if report.output_format == "torch":
        actual = collections.OrderedDict(iter_tensors(actual_root))
    else:
        actual = collections.OrderedDict((k, v) for k, v in actual_root.items())
    _compare(expected, source, actual, written, dtype_for, report)


def _verify_against(index_path: str, groups: list[list[SafetensorsEntry]], report: ConversionReport) -> None:
    written = open_checkpoint(index_path)
    expected = collections.OrderedDict((e.name, e.tensor) for g in groups for e in g)
    if not any(groups):
        return  # nothing was written to compare
    source = groups[0][0].checkpoint
    dtypes = {id(e.tensor): e.dtype for g in groups for e in g}
    actual = collections.OrderedDict((k, written.root[k]) for k in expected)
    _compare(expected, source, actual, written, lambda t: dtypes[id(t)], report)


def _compare(
    expected: Mapping[str, TensorInfo],
    source: Checkpoint,
    actual: Mapping[str, Any],
    written: Checkpoint,
    dtype_for: Callable[[TensorInfo], str],
    report: ConversionReport,
) -> None:
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
        if tensor.storage is None and not tensor.chunks:
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
    report.verified = True
