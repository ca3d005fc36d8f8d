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
from typing import Any

from ptools.core.checkpoint.readers import ZIP_MAGIC, Checkpoint, _open_zip, _read_head, contained_path
from ptools.core.checkpoint.tensors import FLOATING, ITEMSIZE, StorageRef, TensorInfo, contiguous_stride, whole_numbers
from ptools.core.checkpoint.unpickle import Opaque
from ptools.core.choices import ZeroWeights, values
from ptools.core.files import require_regular_file
from ptools.core.limits import brief
from ptools.errors import BadInputError

# The only DeepSpeed classes its checkpoints name: kept as records, never imported.
DEEPSPEED_GLOBALS = frozenset(
    {
        "deepspeed.runtime.fp16.loss_scaler.LossScaler",
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
        if not isinstance(name, str) or not whole_numbers(shape):
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
    dtype: str, shape: tuple[int, ...], pieces: list[tuple[StorageRef, int, int]], anchor: TensorInfo
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
        if gaps is not None and not (isinstance(gaps, list) and whole_numbers(tuple(gaps), len(shapes))):
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
    parameters: dict[str, TensorInfo] = {}
    offset = 0
    for shapes in param_shapes:
        for name, shape in shapes.items():
            numel = math.prod(shape)
            part = math.ceil(numel / world)
            if offset + part > total:
                raise BadInputError(
                    f"{step}: each rank's partitions hold {total:,} elements, but the model needs "
                    f"{offset + part:,} up to {brief(name)}: a partition is short or missing"
                )
            pieces = []
            for rank, flat in enumerate(flats):
                take = min(part, numel - rank * part)
                if take <= 0:
                    break
                pieces.extend(flat.runs(offset, take))
            parameters[name] = _parameter(flats[0].tensors[0].dtype, shape, pieces, flats[0].tensors[0])
            offset += part
    if offset != total:
        raise BadInputError(
            f"{step}: each rank's partitions hold {total:,} elements, the model's parameters take {offset:,}: "
            "the files do not belong together"
        )
    return parameters


def _frozen_copy(tensor: TensorInfo) -> TensorInfo:
    return TensorInfo(tensor.dtype, tensor.shape, tensor.stride, tensor.storage_offset, tensor.storage, False, True)


def _frozen(
    step: str, shapes: dict[str, tuple[int, ...]], models: list[Checkpoint], stage: int, world: int
) -> dict[str, TensorInfo]:
    """Frozen parameters have no master copy: stage 1-2 keep them whole in the model file,
    stage 3 keeps ``ceil(numel / world)`` elements of each in every rank's model file."""
    frozen: dict[str, TensorInfo] = {}
    fragments = [model.root.get("frozen_param_fragments") or {} for model in models]
    module = models[0].root.get("module") or {}
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
        pieces = []
        for rank, cut in enumerate(cuts):
            take = min(part, numel - rank * part)
            if take > 0:
                pieces.extend(_Flat([cut]).runs(0, take))
        tensor = _parameter(cuts[0].dtype, shape, pieces, cuts[0])
        tensor.requires_grad = False
        frozen[name] = tensor
    return frozen


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
    step, tag = _step_folder(path, tag)
    real_step = os.path.realpath(step)
    files = _Files(step)
    opened: list[Checkpoint] = []

    def open_file(name: str) -> Checkpoint:
        checkpoint = _open_rank_file(os.path.join(step, name), real_step, trust)
        opened.append(checkpoint)
        return checkpoint

    optimizers = {rank: open_file(name) for rank, name in sorted(files.optimizer.items())}
    first = optimizers[min(optimizers)]
    first_state = _optimizer_state(first)
    stage = _zero_stage(first_state.get("zero_stage"), first.path)
    world = _world_size(first_state.get("partition_count"), first.path)
    _missing_ranks(step, "optimizer", files.optimizer, world)
    key = "fp32_flat_groups" if stage == 3 else "single_partition_of_fp32_groups"
    ranks = []
    for rank, checkpoint in optimizers.items():
        state = _optimizer_state(checkpoint)
        if _zero_stage(state.get("zero_stage"), checkpoint.path) != stage or (
            _world_size(state.get("partition_count"), checkpoint.path) != world
        ):
            raise BadInputError(
                f"{step}: rank {rank}'s optimizer file is from another run (ZeRO stage or world size differ)"
            )
        ranks.append(_partitions(state, key, checkpoint.path))
    if len({groups[0].dtype for groups in ranks}) != 1:
        raise BadInputError(f"{step}: the ranks' master weights have different dtypes")

    if stage == 3:
        _missing_ranks(step, "model-states", files.stage3_model, world)
        models = [open_file(files.stage3_model[rank]) for rank in range(world)]
    else:
        if files.model is None:
            raise BadInputError(f"{step}: {_MODEL_FILE} is missing", "copy the whole step folder")
        models = [open_file(files.model)]
    layout = models[0].root
    if not isinstance(layout, dict) or "param_shapes" not in layout:
        raise BadInputError(f"{models[0].path}: not a DeepSpeed model-states file (no param_shapes)")
    raw_shapes = layout["param_shapes"]
    if isinstance(raw_shapes, dict):
        raw_shapes = [raw_shapes]
    if not isinstance(raw_shapes, list):
        raise BadInputError(f"{models[0].path}: corrupt ZeRO model file (param_shapes)")
    param_shapes = [_shapes(group, models[0].path, "param_shapes") for group in raw_shapes]
    frozen_shapes = _shapes(layout.get("frozen_param_shapes") or {}, models[0].path, "frozen_param_shapes")
    shared = layout.get("shared_params") or {}
    buffer_names = layout.get("buffer_names") or []
    module = layout.get("module")
    if not isinstance(module, dict):
        module = {}
    if not (
        isinstance(shared, dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in shared.items())
        and isinstance(buffer_names, list)
    ):
        raise BadInputError(f"{models[0].path}: corrupt ZeRO model file (shared_params or buffer_names)")

    if stage == 3:
        trainable = _stage3_parameters(step, param_shapes, ranks, world)
    else:
        paddings = _optimizer_state(first).get("param_alignment_paddings")
        trainable = _stage12_parameters(step, param_shapes, ranks, paddings, world)
    frozen = _frozen(step, frozen_shapes, models, stage, world)
    both = set(trainable) & set(frozen)
    if both:
        raise BadInputError(f"{step}: {brief(sorted(both)[0])} is listed as both trainable and frozen")
    buffers = {}
    for name in buffer_names:
        tensor = module.get(name) if isinstance(name, str) else None
        if isinstance(tensor, TensorInfo):
            buffers[name] = tensor
    # ZeRO-1 records no frozen parameters (DeepSpeed's zero_to_fp32 drops them); stages 1-2
    # keep every weight whole in the module, so the unlisted ones are read from there.
    recovered = []
    if stage < 3:
        for name, tensor in module.items():
            if (
                isinstance(name, str)
                and name not in buffers
                and name not in trainable
                and name not in frozen
                and name not in shared
                and isinstance(tensor, TensorInfo)
                and tensor.has_data
            ):
                frozen[name] = _frozen_copy(tensor)
                recovered.append(name)
    parameters = {**trainable, **frozen}
    aliases: dict[str, str] = {
        alias: source for alias, source in shared.items() if source in parameters and alias not in parameters
    }

    training_dtype = "bfloat16" if files.bf16 else None
    if training_dtype is None:
        sample = next((module[name] for name in trainable if isinstance(module.get(name), TensorInfo)), None)
        training_dtype = sample.dtype if sample is not None else ranks[0][0].dtype

    if weights == "module":
        if stage == 3:
            raise BadInputError(
                f"{step}: ZeRO-3 saves no module weights, only the fp32 master partitions",
                f"read the master weights and cast them to {training_dtype} (`dtype`): that is what the module held",
            )
        chosen: dict[str, TensorInfo] = {}
        for name in [*parameters, *aliases]:
            tensor = module.get(name)
            source = aliases.get(name, name)
            if not isinstance(tensor, TensorInfo) or tensor.shape != parameters[source].shape:
                raise BadInputError(f"{models[0].path}: the module's weight {brief(name)} is missing or misshapen")
            tensor.is_parameter, tensor.requires_grad = True, source in trainable
            chosen[name] = tensor
        parameters, aliases = chosen, {}

    root: collections.OrderedDict[str, Any] = collections.OrderedDict()
    left_out = []
    for name in module:
        if name in buffers:
            root[name] = buffers[name]
        elif name in parameters:
            root[name] = parameters[name]
        elif name in aliases:
            root[name] = parameters[aliases[name]]
        elif isinstance(name, str):
            left_out.append(name)
    for name in [*buffers, *parameters, *aliases]:  # a model file without a module listing
        if name not in root:
            root[name] = buffers.get(name) or parameters.get(name) or parameters[aliases[name]]

    by_file = {checkpoint.path: checkpoint for checkpoint in opened}
    what = (
        f"the {ranks[0][0].dtype} master weights, assembled parameter by parameter from the {world} rank partitions"
        if weights == "master"
        else f"the module's own weights ({training_dtype}) from {os.path.basename(models[0].path)}"
    )
    notes = [f"DeepSpeed ZeRO-{stage} checkpoint, step {tag}, world size {world}, trained in {training_dtype}: {what}"]
    frozen_dtypes = {tensor.dtype for tensor in frozen.values()} - {ranks[0][0].dtype}
    if weights == "master" and frozen_dtypes:
        notes.append(
            f"{len(frozen)} frozen parameter(s) have no master copy: read as training held them "
            f"({', '.join(sorted(frozen_dtypes))}), as DeepSpeed's zero_to_fp32 does"
        )
    if aliases:
        shown = ", ".join(f"{alias} = {source}" for alias, source in list(aliases.items())[:4])
        notes.append(f"{len(aliases)} tied name(s) (shared_params): {shown}")
    if recovered:
        notes.append(
            f"{len(recovered)} frozen parameter(s) the run did not list (ZeRO-{stage} records none), read "
            f"from the module: DeepSpeed's zero_to_fp32 leaves them out ({brief(recovered)})"
        )
    if left_out:
        notes.append(
            f"{len(left_out)} module entries that are neither parameters nor buffers left out: {brief(left_out)}"
        )
    checkpoint = Checkpoint(
        path=path,
        format="deepspeed",
        root=root,
        size_bytes=sum(c.size_bytes for c in opened),
        parameter_names=set(parameters) | set(aliases),
        notes=notes,
        locate=lambda ref: by_file[ref.file].locate(ref),
        read_record=lambda ref, start, length: by_file[ref.file].read(ref, start, length),
    )
    checkpoint.details = {
        "deepspeed": {
            "zero_stage": stage,
            "world_size": world,
            "tag": tag,
            "step_folder": step,
            "training_dtype": training_dtype,
            "master_dtype": ranks[0][0].dtype,
            "weights": weights,
            "ds_version": layout.get("ds_version") if isinstance(layout.get("ds_version"), str) else None,
            "tied": aliases,
            "frozen": sorted(frozen),
            "buffers": list(buffers),
        }
    }
    return checkpoint
