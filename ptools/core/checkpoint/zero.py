"""DeepSpeed ZeRO checkpoint folders (stages 1, 2 and 3), read without DeepSpeed and without
running code.

A ZeRO run saves, per step folder, the model's layout (``*model_states.pt``: parameter
names and shapes, buffers, tied names, frozen parameters) and one optimizer file per rank
holding that rank's slice of the flat fp32 master weights. Opening the folder reads only
their pickles; each parameter becomes a :class:`TensorInfo` whose ``pieces`` are the byte runs
of the rank partitions it was cut into, so a writer streams it without ever holding more
than one read buffer, and nothing of the optimizer state (Adam moments) is read at all.

Layouts, as DeepSpeed's own ``zero_to_fp32`` reads them:
- stages 1 and 2: per parameter group, the rank partitions concatenated are the group's
  flat vector; parameters follow each other in ``param_shapes`` order (with
  ``param_alignment_paddings`` between them when recorded), the tail is padding.
- stage 3: every parameter is cut into ``ceil(numel / world)`` elements per rank; each
  rank's flat groups hold its cuts in ``param_shapes`` order.
"""

from __future__ import annotations

import bisect
import collections
import math
import os
import re
from dataclasses import dataclass
from typing import Any

from ptools.core import limits
from ptools.core.checkpoint.readers import ZIP_MAGIC, Checkpoint, _open_zip, _read_head, contained_path
from ptools.core.checkpoint.tensors import (
    FLOATING,
    ITEMSIZE,
    DeferredRuns,
    StorageRef,
    TensorInfo,
    contiguous_stride,
    counts,
    is_shape,
)
from ptools.core.checkpoint.unpickle import Opaque
from ptools.core.choices import ZeroWeights, values
from ptools.core.files import require_regular_file
from ptools.core.limits import brief
from ptools.errors import BadInputError

# The only DeepSpeed classes its checkpoints name: kept as records, never imported.
DEEPSPEED_GLOBALS = frozenset(
    {
        "deepspeed.runtime.fp16.loss_scaler.LossScaler",
        "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",  # fp16 runs
        "deepspeed.runtime.zero.config.ZeroStageEnum",
        "deepspeed.utils.tensor_fragment.fragment_address",
    }
)
ZERO_WEIGHTS = values(ZeroWeights)

_OPTIMIZER_FILE = re.compile(r"(bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt\Z")
_STAGE3_MODEL_FILE = re.compile(r"zero_pp_rank_(\d+)_mp_rank_(\d+)_model_states\.pt\Z")
_MODEL_FILE = "mp_rank_00_model_states.pt"
_MODEL_PARALLEL = re.compile(r"mp_rank_(?!00_)\d+_")
_TAG_BYTES = 1024


class DeepSpeedRecord(Opaque):
    """A DeepSpeed object in a checkpoint (loss scaler, ZeRO stage, fragment address), as data."""


class _DeepSpeedGlobals(dict):
    def __contains__(self, qualified: object) -> bool:
        return qualified in DEEPSPEED_GLOBALS

    def __getitem__(self, qualified: str) -> Any:
        if qualified not in DEEPSPEED_GLOBALS:
            raise KeyError(qualified)
        return type("DeepSpeedRecord", (DeepSpeedRecord,), {"qualified_name": qualified})


def _is_rank_file(name: str) -> bool:
    return bool(_OPTIMIZER_FILE.match(name) or _STAGE3_MODEL_FILE.match(name)) or name == _MODEL_FILE


def is_deepspeed_folder(path: str) -> bool:
    """Whether ``path`` is a DeepSpeed run folder (``latest``, or step folders of rank files)
    or one step folder of it. Decided by names only; :func:`open_zero` checks the content."""
    try:
        names = os.listdir(path)
    except OSError:
        return False
    if "latest" in names or any(_is_rank_file(name) for name in names):
        return True
    return bool(_step_folders(path, names))


def _step_folders(path: str, names: list[str] | None = None) -> list[str]:
    """Sub-folders holding ZeRO rank files (``global_step*`` or any other tag)."""
    found = []
    for name in sorted(names if names is not None else os.listdir(path)):
        folder = os.path.join(path, name)
        if os.path.isdir(folder) and not os.path.islink(folder):
            try:
                if any(_is_rank_file(entry) for entry in os.listdir(folder)):
                    found.append(name)
            except OSError:
                continue
    return found


def _known_tags(path: str) -> str:
    tags = _step_folders(path)
    if not tags:
        return ""
    shown = ", ".join(tags[:8]) + (f" and {len(tags) - 8} more" if len(tags) > 8 else "")
    return f" (step folders here: {shown})"


def _valid_tag(tag: str) -> bool:
    return bool(tag) and len(tag) <= 255 and tag not in (".", "..") and not re.search(r"[/\\\x00-\x1f]", tag)


def _step_folder(path: str, tag: str | None) -> tuple[str, str]:
    """The step folder to read and its tag: ``tag`` when given, else what ``latest`` names,
    else ``path`` itself when it holds the rank files."""
    real = os.path.realpath(path)
    if tag is not None:
        if not _valid_tag(tag):
            raise BadInputError(f"`tag` {brief(tag)} is not the name of a step folder")
        step = os.path.join(path, tag)
        if not os.path.isdir(step):
            raise BadInputError(f"{path}: no step folder {tag!r}{_known_tags(path)}")
        contained_path(step, real, f"{path}: step folder {tag!r}")
        return step, tag
    latest = os.path.join(path, "latest")
    if os.path.lexists(latest):
        require_regular_file(latest, "DeepSpeed `latest` file")
        raw = _read_head(latest, _TAG_BYTES + 1)
        text = raw.decode("utf-8", errors="replace").strip()
        if len(raw) > _TAG_BYTES or not _valid_tag(text):
            raise BadInputError(
                f"{latest} should name a step folder but holds {brief(text)}", "pick the step with `tag`"
            )
        step = os.path.join(path, text)
        if not os.path.isdir(step):
            raise BadInputError(
                f"{path}: `latest` names step {text!r}, which is not here{_known_tags(path)}",
                "pick the step with `tag`",
            )
        contained_path(step, real, f"{latest}: step {text!r}")
        return step, text
    if any(_is_rank_file(name) for name in os.listdir(path)):
        return path, os.path.basename(os.path.normpath(real))
    raise BadInputError(
        f"{path}: a DeepSpeed run folder without a `latest` file{_known_tags(path)}", "pick the step with `tag`"
    )


def _open_rank_file(path: str, real_folder: str, trust: bool) -> Checkpoint:
    contained_path(path, real_folder, f"ZeRO file {os.path.basename(path)}")
    require_regular_file(path, "ZeRO checkpoint file")
    if not _read_head(path, 4).startswith(ZIP_MAGIC):
        raise BadInputError(f"{path}: not a PyTorch zip archive, as DeepSpeed writes its checkpoint files")
    return _open_zip(path, trust, _DeepSpeedGlobals())


class _Files:
    """The rank files of one step folder, by rank."""

    def __init__(self, step: str) -> None:
        self.optimizer: dict[int, str] = {}
        self.stage3_model: dict[int, str] = {}
        self.bf16 = False
        names = sorted(os.listdir(step))
        for name in names:
            if _MODEL_PARALLEL.search(name) and name.endswith(".pt"):
                raise BadInputError(
                    f"{step}: {name} is a model-parallel (tensor or pipeline) shard; "
                    "only data-parallel ZeRO checkpoints (mp_rank_00) are read"
                )
            if name.startswith("layer_") and name.endswith("model_states.pt"):
                raise BadInputError(
                    f"{step}: {name} is a pipeline-parallel layer file; pipeline checkpoints are not read"
                )
            match = _OPTIMIZER_FILE.match(name)
            if match:
                rank = int(match.group(2))
                if rank in self.optimizer:
                    raise BadInputError(
                        f"{step}: two optimizer files for rank {rank} ({self.optimizer[rank]} and {name})"
                    )
                self.optimizer[rank] = name
                self.bf16 = self.bf16 or bool(match.group(1))
            match = _STAGE3_MODEL_FILE.match(name)
            if match:
                self.stage3_model[int(match.group(1))] = name
        if not self.optimizer:
            raise BadInputError(
                f"{step}: no ZeRO optimizer files (*zero_pp_rank_*_optim_states.pt)",
                "name the run folder or a step folder of a DeepSpeed ZeRO checkpoint",
            )
        if self.bf16 and not all(name.startswith("bf16_") for name in self.optimizer.values()):
            raise BadInputError(f"{step}: optimizer files of bf16 and other runs are mixed")
        self.model = _MODEL_FILE if _MODEL_FILE in names else None


def _missing_ranks(step: str, what: str, found: dict[int, str], world: int) -> None:
    missing = [rank for rank in range(world) if rank not in found]
    extra = [rank for rank in found if rank >= world]
    if missing:
        shown = ", ".join(map(str, missing[:8])) + (" …" if len(missing) > 8 else "")
        raise BadInputError(
            f"{step}: the run had {world:,} ranks but the {what} file(s) of rank(s) {shown} are missing",
            "copy the whole step folder; every rank's file is needed",
        )
    if extra:
        raise BadInputError(f"{step}: {what} files for {len(found)} ranks, but the run had {world}")


def _zero_stage(value: Any, path: str) -> int:
    if isinstance(value, DeepSpeedRecord) and value.qualified_name.endswith("ZeroStageEnum") and len(value.args) == 1:
        value = value.args[0]
    if isinstance(value, int) and not isinstance(value, bool) and value in (1, 2, 3):
        return value
    raise BadInputError(f"{path}: not a ZeRO optimizer file (zero_stage is {brief(value)})")


def _world_size(value: Any, path: str) -> int:
    counts = value if isinstance(value, list) else [value]
    if not counts or not all(isinstance(c, int) and not isinstance(c, bool) and 1 <= c <= 1 << 20 for c in counts):
        raise BadInputError(f"{path}: corrupt ZeRO optimizer file (partition_count {brief(value)})")
    return max(counts)


def _optimizer_state(checkpoint: Checkpoint) -> dict[str, Any]:
    root = checkpoint.root
    state = root.get("optimizer_state_dict") if isinstance(root, dict) else None
    if not isinstance(state, dict):
        raise BadInputError(f"{checkpoint.path}: not a ZeRO optimizer file (no optimizer_state_dict)")
    return state


def _partitions(state: dict[str, Any], key: str, path: str) -> list[TensorInfo]:
    groups = state.get(key)
    if not isinstance(groups, list) or not groups:
        raise BadInputError(f"{path}: corrupt ZeRO optimizer file (no {key})")
    for tensor in groups:
        if not (
            isinstance(tensor, TensorInfo)
            and tensor.storage is not None
            and len(tensor.shape) == 1
            and tensor.is_contiguous
            and tensor.dtype in FLOATING
        ):
            raise BadInputError(f"{path}: corrupt ZeRO optimizer file ({key} holds something other than flat tensors)")
    if len({tensor.dtype for tensor in groups}) != 1:
        raise BadInputError(f"{path}: corrupt ZeRO optimizer file ({key} mixes dtypes)")
    return groups


def _shapes(value: Any, path: str, what: str) -> dict[str, tuple[int, ...]]:
    if not isinstance(value, dict):
        raise BadInputError(f"{path}: corrupt ZeRO model file ({what} is not a mapping of names to shapes)")
    shapes = {}
    for name, shape in value.items():
        shape = tuple(shape) if isinstance(shape, (list, tuple)) else shape
        if not isinstance(name, str) or not is_shape(shape):
            raise BadInputError(f"{path}: corrupt ZeRO model file ({what}: {brief(name)} -> {brief(shape)})")
        shapes[name] = shape
    return shapes


class _Flat:
    """Tensors laid end to end (one rank's partitions): cut element ranges into byte runs."""

    def __init__(self, tensors: list[TensorInfo]) -> None:
        self.tensors = tensors
        self.starts = [0]
        for tensor in tensors:
            self.starts.append(self.starts[-1] + tensor.numel)

    @property
    def numel(self) -> int:
        return self.starts[-1]

    def runs(self, start: int, count: int) -> list[tuple[StorageRef, int, int]]:
        index = bisect.bisect_right(self.starts, start) - 1
        runs: list[tuple[StorageRef, int, int]] = []
        while count > 0:
            tensor = self.tensors[index]
            within = start - self.starts[index]
            take = min(count, tensor.numel - within)
            itemsize = ITEMSIZE[tensor.dtype]
            assert tensor.storage is not None  # checked in _partitions
            runs.append((tensor.storage, (tensor.storage_offset + within) * itemsize, take * itemsize))
            start, count, index = start + take, count - take, index + 1
        return runs


def _parameter(
    dtype: str, shape: tuple[int, ...], pieces: list[tuple[StorageRef, int, int]] | DeferredRuns, anchor: TensorInfo
) -> TensorInfo:
    if not pieces:  # an empty parameter: a zero-length run keeps it a tensor with data
        assert anchor.storage is not None
        pieces = [(anchor.storage, 0, 0)]
    return TensorInfo(
        dtype=dtype, shape=shape, stride=contiguous_stride(shape), pieces=pieces, requires_grad=True, is_parameter=True
    )


def _stage12_parameters(
    step: str, param_shapes: list[dict[str, tuple[int, ...]]], ranks: list[list[TensorInfo]], paddings: Any, world: int
) -> dict[str, TensorInfo]:
    parameters: dict[str, TensorInfo] = {}
    for rank, groups in enumerate(ranks):
        if len(groups) != len(param_shapes):
            raise BadInputError(
                f"{step}: rank {rank} holds {len(groups)} parameter group(s), the model files list {len(param_shapes)}"
            )
    for group, shapes in enumerate(param_shapes):
        flat = _Flat([groups[group] for groups in ranks])
        gaps = paddings[group] if isinstance(paddings, list) and group < len(paddings) else None
        if gaps is not None and not (isinstance(gaps, list) and counts(tuple(gaps), len(shapes))):
            raise BadInputError(f"{step}: corrupt ZeRO optimizer file (param_alignment_paddings of group {group})")
        offset = 0
        for index, (name, shape) in enumerate(shapes.items()):
            numel = math.prod(shape)
            if offset + numel > flat.numel:
                raise BadInputError(
                    f"{step}: the rank partitions of parameter group {group} hold {flat.numel:,} elements, "
                    f"but the model needs {offset + numel:,} up to {brief(name)}: a partition is short or missing"
                )
            parameters[name] = _parameter(flat.tensors[0].dtype, shape, flat.runs(offset, numel), flat.tensors[0])
            offset += numel + (gaps[index] if gaps is not None else 0)
        align = 2 * world  # DeepSpeed pads each group to a multiple of this
        if math.ceil(offset / align) != math.ceil(flat.numel / align):
            raise BadInputError(
                f"{step}: the rank partitions of parameter group {group} hold {flat.numel:,} elements, "
                f"the model's parameters {offset:,}: the files do not belong together"
            )
    return parameters


def _stage3_parameters(
    step: str, param_shapes: list[dict[str, tuple[int, ...]]], ranks: list[list[TensorInfo]], world: int
) -> dict[str, TensorInfo]:
    flats = [_Flat(groups) for groups in ranks]
    if len({flat.numel for flat in flats}) != 1:
        sizes = ", ".join(f"{flat.numel:,}" for flat in flats[:8])
        raise BadInputError(
            f"{step}: the ranks hold partitions of different sizes ({sizes}); every rank must hold as many"
        )
    total = flats[0].numel
    refs = tuple(tensor.storage for flat in flats for tensor in flat.tensors if tensor.storage is not None)
    parameters: dict[str, TensorInfo] = {}
    offset = runs = 0
    for shapes in param_shapes:
        for name, shape in shapes.items():
            numel = math.prod(shape)
            part = math.ceil(numel / world)
            if offset + part > total:
                raise BadInputError(
                    f"{step}: each rank's partitions hold {total:,} elements, but the model needs "
                    f"{offset + part:,} up to {brief(name)}: a partition is short or missing"
                )
            pieces = _cut_across_ranks(flats, offset, part, numel, refs)
            runs += len(pieces)
            if runs > limits.PIECES.value:
                raise limits.PIECES.exceeded(f"{step}: {len(parameters) + 1:,} parameters over {world:,} ranks")
            parameters[name] = _parameter(flats[0].tensors[0].dtype, shape, pieces, flats[0].tensors[0])
            offset += part
    if offset != total:
        raise BadInputError(
            f"{step}: each rank's partitions hold {total:,} elements, the model's parameters take {offset:,}: "
            "the files do not belong together"
        )
    return parameters


def _cut_across_ranks(
    flats: list[_Flat], offset: int, part: int, numel: int, refs: tuple[StorageRef, ...]
) -> DeferredRuns | list[tuple[StorageRef, int, int]]:
    """A ZeRO-3 parameter's byte runs: ``part`` elements at ``offset`` of each rank's flat
    partitions, in rank order, until ``numel`` are taken. Computed when read, so opening W
    ranks of P parameters holds P small objects, not W × P runs (a 1 MB folder of many ranks
    and parameters made a listing take 1.4 GB and 37 s)."""
    ranks = min(len(flats), math.ceil(numel / part)) if part else 0
    if ranks == 0:
        return []

    def build() -> list[tuple[StorageRef, int, int]]:
        return [run for rank in range(ranks) for run in flats[rank].runs(offset, min(part, numel - rank * part))]

    return DeferredRuns(build, refs, ranks)


def _mapping(value: Any, path: str, what: str) -> dict[Any, Any]:
    """A model file's ``what`` entry: a dict, or nothing recorded (None); anything else is refused."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadInputError(f"{path}: corrupt ZeRO model file ({what} is {type(value).__name__}, not a mapping)")
    return value


def _frozen_copy(tensor: TensorInfo) -> TensorInfo:
    return TensorInfo(tensor.dtype, tensor.shape, tensor.stride, tensor.storage_offset, tensor.storage, False, True)


def _frozen(
    step: str, shapes: dict[str, tuple[int, ...]], models: list[Checkpoint], stage: int, world: int
) -> dict[str, TensorInfo]:
    """Frozen parameters have no master copy: stage 1-2 keep them whole in the model file,
    stage 3 keeps ``ceil(numel / world)`` elements of each in every rank's model file."""
    frozen: dict[str, TensorInfo] = {}
    fragments = [
        _mapping(model.root.get("frozen_param_fragments"), model.path, "frozen_param_fragments") for model in models
    ]
    module = _mapping(models[0].root.get("module"), models[0].path, "module")
    for name, shape in shapes.items():
        numel = math.prod(shape)
        if stage < 3:
            tensor = fragments[0].get(name, module.get(name))
            if not (isinstance(tensor, TensorInfo) and tensor.shape == shape and tensor.has_data):
                raise BadInputError(f"{step}: frozen parameter {brief(name)} of shape {list(shape)} is not saved")
            frozen[name] = _frozen_copy(tensor)
            continue
        part = math.ceil(numel / world)
        found = [rank_fragments.get(name) for rank_fragments in fragments]
        cuts = [cut for cut in found if isinstance(cut, TensorInfo)]
        if (
            len(cuts) != len(found)
            or not all(cut.storage is not None and cut.shape == (part,) and cut.is_contiguous for cut in cuts)
            or len({cut.dtype for cut in cuts}) != 1
        ):
            raise BadInputError(
                f"{step}: frozen parameter {brief(name)} is not saved as {world} slices of {part:,} elements"
            )
        cut_refs = tuple(cut.storage for cut in cuts if cut.storage is not None)
        pieces = _cut_across_ranks([_Flat([cut]) for cut in cuts], 0, part, numel, cut_refs)
        tensor = _parameter(cuts[0].dtype, shape, pieces, cuts[0])
        tensor.requires_grad = False
        frozen[name] = tensor
    return frozen


@dataclass
class _Run:
    """One step of a ZeRO run, as its files describe it (pickles read, no tensor data)."""

    step: str
    tag: str
    stage: int
    world: int
    bf16: bool
    opened: list[Checkpoint]  # every file read, for reads by file
    partitions: list[list[TensorInfo]]  # per rank, per parameter group: the flat master weights
    paddings: Any  # stage 1-2: param_alignment_paddings, when recorded
    models: list[Checkpoint]  # the model-states file (stage 1-2) or one per rank (stage 3)
    param_shapes: list[dict[str, tuple[int, ...]]]
    frozen_shapes: dict[str, tuple[int, ...]]
    shared: dict[str, str]  # tied name -> the name it is saved under
    buffer_names: list[Any]
    module: dict[Any, Any]  # the module's state dict as saved (placeholders in stage 3)
    ds_version: str | None

    @property
    def master_dtype(self) -> str:
        return self.partitions[0][0].dtype


def _read_run(step: str, tag: str, trust: bool) -> _Run:
    """Open the optimizer files, then the model-states file(s), and check they belong together."""
    real_step = os.path.realpath(step)
    files = _Files(step)
    opened: list[Checkpoint] = []

    def open_file(name: str) -> Checkpoint:
        checkpoint = _open_rank_file(os.path.join(step, name), real_step, trust)
        opened.append(checkpoint)
        return checkpoint

    optimizers = {rank: open_file(name) for rank, name in sorted(files.optimizer.items())}
    first = _optimizer_state(optimizers[min(optimizers)])
    stage = _zero_stage(first.get("zero_stage"), opened[0].path)
    world = _world_size(first.get("partition_count"), opened[0].path)
    _missing_ranks(step, "optimizer", files.optimizer, world)
    key = "fp32_flat_groups" if stage == 3 else "single_partition_of_fp32_groups"
    partitions = []
    for rank, checkpoint in optimizers.items():
        state = _optimizer_state(checkpoint)
        if _zero_stage(state.get("zero_stage"), checkpoint.path) != stage or (
            _world_size(state.get("partition_count"), checkpoint.path) != world
        ):
            raise BadInputError(
                f"{step}: rank {rank}'s optimizer file is from another run (ZeRO stage or world size differ)"
            )
        partitions.append(_partitions(state, key, checkpoint.path))
    if len({groups[0].dtype for groups in partitions}) != 1:
        raise BadInputError(f"{step}: the ranks' master weights have different dtypes")

    if stage == 3:
        _missing_ranks(step, "model-states", files.stage3_model, world)
        models = [open_file(files.stage3_model[rank]) for rank in range(world)]
    elif files.model is None:
        raise BadInputError(f"{step}: {_MODEL_FILE} is missing", "copy the whole step folder")
    else:
        models = [open_file(files.model)]
    for model in models:  # every rank's file is read, so every rank's is checked
        if not isinstance(model.root, dict):
            raise BadInputError(f"{model.path}: not a DeepSpeed model-states file (not a mapping)")
    layout, where = models[0].root, models[0].path
    if "param_shapes" not in layout:
        raise BadInputError(f"{where}: not a DeepSpeed model-states file (no param_shapes)")
    raw_shapes = layout["param_shapes"]
    raw_shapes = [raw_shapes] if isinstance(raw_shapes, dict) else raw_shapes
    if not isinstance(raw_shapes, list):
        raise BadInputError(f"{where}: corrupt ZeRO model file (param_shapes)")
    shared = layout.get("shared_params") or {}
    buffer_names = layout.get("buffer_names") or []
    if not (
        isinstance(shared, dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in shared.items())
        and isinstance(buffer_names, list)
    ):
        raise BadInputError(f"{where}: corrupt ZeRO model file (shared_params or buffer_names)")
    module = _mapping(layout.get("module"), where, "module")
    version = layout.get("ds_version")
    return _Run(
        step=step,
        tag=tag,
        stage=stage,
        world=world,
        bf16=files.bf16,
        opened=opened,
        partitions=partitions,
        paddings=first.get("param_alignment_paddings"),
        models=models,
        param_shapes=[_shapes(group, where, "param_shapes") for group in raw_shapes],
        frozen_shapes=_shapes(layout.get("frozen_param_shapes") or {}, where, "frozen_param_shapes"),
        shared=shared,
        buffer_names=buffer_names,
        module=module,
        ds_version=version if isinstance(version, str) else None,
    )


@dataclass
class _Weights:
    """What a step holds, by kind; ``recovered``: frozen parameters read from the module
    because the run did not list them (ZeRO-1)."""

    buffers: dict[str, TensorInfo]
    trainable: dict[str, TensorInfo]
    frozen: dict[str, TensorInfo]
    aliases: dict[str, str]
    recovered: list[str]

    @property
    def parameters(self) -> dict[str, TensorInfo]:
        return {**self.trainable, **self.frozen}


def _master_weights(run: _Run) -> _Weights:
    if run.stage == 3:
        trainable = _stage3_parameters(run.step, run.param_shapes, run.partitions, run.world)
    else:
        trainable = _stage12_parameters(run.step, run.param_shapes, run.partitions, run.paddings, run.world)
    frozen = _frozen(run.step, run.frozen_shapes, run.models, run.stage, run.world)
    both = set(trainable) & set(frozen)
    if both:
        raise BadInputError(f"{run.step}: {brief(sorted(both)[0])} is listed as both trainable and frozen")
    buffers = {}
    for name in run.buffer_names:
        tensor = run.module.get(name) if isinstance(name, str) else None
        if isinstance(tensor, TensorInfo):
            buffers[name] = tensor
    # ZeRO-1 records no frozen parameters (DeepSpeed's zero_to_fp32 drops them); stages 1-2
    # keep every weight whole in the module, so the unlisted ones are read from there.
    recovered = []
    if run.stage < 3:
        for name, tensor in run.module.items():
            if (
                isinstance(name, str)
                and name not in buffers
                and name not in trainable
                and name not in frozen
                and name not in run.shared
                and isinstance(tensor, TensorInfo)
                and tensor.has_data
            ):
                frozen[name] = _frozen_copy(tensor)
                recovered.append(name)
    parameters = {**trainable, **frozen}
    aliases = {
        alias: source for alias, source in run.shared.items() if source in parameters and alias not in parameters
    }
    return _Weights(buffers, trainable, frozen, aliases, recovered)


def _training_dtype(run: _Run, weights: _Weights) -> str:
    if run.bf16:
        return "bfloat16"
    sample = next((run.module[n] for n in weights.trainable if isinstance(run.module.get(n), TensorInfo)), None)
    return sample.dtype if sample is not None else run.master_dtype


def _module_weights(run: _Run, weights: _Weights, training_dtype: str) -> _Weights:
    """The module's own saved weights in place of the master weights (ZeRO-1 and 2)."""
    if run.stage == 3:
        raise BadInputError(
            f"{run.step}: ZeRO-3 saves no module weights, only the fp32 master partitions",
            f"read the master weights and cast them to {training_dtype} (`dtype`): that is what the module held",
        )
    parameters = weights.parameters
    chosen: dict[str, TensorInfo] = {}
    for name in [*parameters, *weights.aliases]:
        tensor = run.module.get(name)
        source = weights.aliases.get(name, name)
        if not isinstance(tensor, TensorInfo) or tensor.shape != parameters[source].shape:
            raise BadInputError(f"{run.models[0].path}: the module's weight {brief(name)} is missing or misshapen")
        tensor.is_parameter, tensor.requires_grad = True, source in weights.trainable
        chosen[name] = tensor
    trainable = {name: tensor for name, tensor in chosen.items() if tensor.requires_grad}
    frozen = {name: tensor for name, tensor in chosen.items() if not tensor.requires_grad}
    return _Weights(weights.buffers, trainable, frozen, {}, weights.recovered)


def _in_module_order(run: _Run, weights: _Weights) -> tuple[collections.OrderedDict[str, Any], list[str]]:
    """Name -> tensor in the model's own state_dict order (a tied name is the same tensor),
    and the module entries that are none of them."""
    parameters = weights.parameters
    root: collections.OrderedDict[str, Any] = collections.OrderedDict()
    left_out = []
    for name in run.module:
        if name in weights.buffers:
            root[name] = weights.buffers[name]
        elif name in parameters:
            root[name] = parameters[name]
        elif name in weights.aliases:
            root[name] = parameters[weights.aliases[name]]
        elif isinstance(name, str):
            left_out.append(name)
    for name in [*weights.buffers, *parameters, *weights.aliases]:  # a model file without a module listing
        if name not in root:
            root[name] = weights.buffers.get(name) or parameters.get(name) or parameters[weights.aliases[name]]
    return root, left_out


def _notes(run: _Run, weights: _Weights, chosen: str, training_dtype: str, left_out: list[str]) -> list[str]:
    what = (
        f"the {run.master_dtype} master weights, assembled parameter by parameter from the {run.world} rank partitions"
        if chosen == "master"
        else f"the module's own weights ({training_dtype}) from {os.path.basename(run.models[0].path)}"
    )
    notes = [
        f"DeepSpeed ZeRO-{run.stage} checkpoint, step {run.tag}, world size {run.world}, "
        f"trained in {training_dtype}: {what}"
    ]
    frozen_dtypes = {tensor.dtype for tensor in weights.frozen.values()} - {run.master_dtype}
    if chosen == "master" and frozen_dtypes:
        notes.append(
            f"{len(weights.frozen)} frozen parameter(s) have no master copy: read as training held them "
            f"({', '.join(sorted(frozen_dtypes))}), as DeepSpeed's zero_to_fp32 does"
        )
    if weights.aliases:
        shown = ", ".join(f"{alias} = {source}" for alias, source in list(weights.aliases.items())[:4])
        notes.append(f"{len(weights.aliases)} tied name(s) (shared_params): {shown}")
    if weights.recovered:
        notes.append(
            f"{len(weights.recovered)} frozen parameter(s) the run did not list (ZeRO-{run.stage} records none), "
            f"read from the module: DeepSpeed's zero_to_fp32 leaves them out ({brief(weights.recovered)})"
        )
    if left_out:
        notes.append(
            f"{len(left_out)} module entries that are neither parameters nor buffers left out: {brief(left_out)}"
        )
    return notes


def open_zero(path: str, *, trust: bool = False, tag: str | None = None, weights: ZeroWeights = "master") -> Checkpoint:
    """Open a DeepSpeed ZeRO checkpoint (run folder or step folder): metadata only.

    Args:
        path: the run folder (with ``latest``) or one step folder (``global_step100``).
        trust: allow pickled globals outside the allowlist in its files (runs code).
        tag: the step folder to read instead of the one ``latest`` names.
        weights: ``master``: the fp32 master weights, assembled from the rank partitions;
            ``module``: the module's own (16-bit when trained so) weights, stages 1 and 2.

    Raises:
        BadInputError: not a ZeRO checkpoint, files missing or not matching each other.
        UnsafeFileError: a file names globals beyond DeepSpeed's three records.
    """
    if weights not in ZERO_WEIGHTS:
        raise BadInputError(f"`weights` must be one of {', '.join(ZERO_WEIGHTS)}, not {brief(weights)}")
    run = _read_run(*_step_folder(path, tag), trust)
    held = _master_weights(run)
    training_dtype = _training_dtype(run, held)
    if weights == "module":
        held = _module_weights(run, held, training_dtype)
    root, left_out = _in_module_order(run, held)
    by_file = {checkpoint.path: checkpoint for checkpoint in run.opened}
    checkpoint = Checkpoint(
        path=path,
        format="deepspeed",
        root=root,
        size_bytes=sum(c.size_bytes for c in run.opened),
        parameter_names=set(held.parameters) | set(held.aliases),
        notes=_notes(run, held, weights, training_dtype, left_out),
        locate=lambda ref: by_file[ref.file].locate(ref),
        read_record=lambda ref, start, length: by_file[ref.file].read(ref, start, length),
    )
    checkpoint.details = {
        "deepspeed": {
            "zero_stage": run.stage,
            "world_size": run.world,
            "tag": run.tag,
            "step_folder": run.step,
            "training_dtype": training_dtype,
            "master_dtype": run.master_dtype,
            "weights": weights,
            "ds_version": run.ds_version,
            "tied": held.aliases if weights == "master" else dict(run.shared),
            "frozen": sorted(held.frozen),
            "buffers": list(held.buffers),
        }
    }
    return checkpoint
