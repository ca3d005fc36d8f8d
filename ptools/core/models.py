"""Naming models on the command line, counting their parameters, and freezing layers.

A model spec is one of:

* ``resnet50`` or ``torchvision:resnet50`` — ``torchvision.models.get_model(name, weights=None)``,
  never downloading anything;
* ``timm:NAME`` — when timm happens to be installed;
* ``package.module:factory`` or ``path/to/file.py:ClassOrFactory`` — your code, called with
  ``kwargs``;
* a TorchScript file, or an ExportedProgram (``.pt2``);
* a whole pickled module (``torch.save(model)``) — only with ``trust``, since loading it runs
  code from the file.
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
import importlib.util
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from ptools.core.choices import BatchNormMode, values
from ptools.errors import BadInputError, UnsafeFileError

if TYPE_CHECKING:
    from ptools.core.checkpoint.readers import Checkpoint

BN_MODES = values(BatchNormMode)


# --------------------------------------------------------------------------- loading


def _call_user_code(spec: str, factory: Any, kwargs: dict[str, Any]) -> Any:
    try:
        return factory(**kwargs)
    except Exception as failure:  # the user's code failed: say so, with its own words
        raise BadInputError(f"error inside {spec}: {type(failure).__name__}: {failure}") from failure


def _build_on(device: str | None, spec: str, factory: Any, kwargs: dict[str, Any]) -> Any:
    """Build a library model under a default device; a few constructors read tensor values
    (``.item()``), which meta tensors lack: those are built on the CPU instead."""
    import torch

    if device is None:
        return _call_user_code(spec, factory, kwargs)
    try:
        with torch.device(device):
            return factory(**kwargs)
    except Exception:  # library code only: retrying on the CPU is safe
        return _call_user_code(spec, factory, kwargs)


def _torchvision_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models())


def load_model(
    spec: str, kwargs: dict[str, Any] | None = None, *, trust: bool = False, device: str | None = None
) -> Any:
    """Build or load the model a spec names (see the module docstring).

    ``device`` builds torchvision/timm models under that default device: ``meta`` gives every
    shape and count with no memory and no initialisation cost.

    Raises:
        BadInputError: unknown name (with close matches), a file that holds no model, or an
            error inside user code (reported as such).
        UnsafeFileError: a pickled module without ``trust``.
    """
    kwargs = dict(kwargs or {})
    if os.path.isfile(spec):
        return _load_model_file(spec, trust)
    if os.path.lexists(spec) or spec.endswith(_MODEL_FILE_EXTENSIONS):
        from ptools.core.files import require_regular_file

        require_regular_file(
            spec,
            "model file",
            "count-params and inspect-state-dict read checkpoint folders; summary and freeze need a model spec"
            if os.path.isdir(spec)
            else None,
        )
    import torch

    prefix, _, rest = spec.partition(":")
    if prefix == "torchvision" or (not rest and ":" not in spec):
        name = rest if prefix == "torchvision" else spec
        names = _torchvision_names()
        if name not in names:
            close = difflib.get_close_matches(name, names, n=5, cutoff=0.6)
            hint = f"did you mean: {', '.join(close)}?" if close else "see torchvision.models.list_models()"
            raise BadInputError(f"unknown model {name!r}", hint)
        import inspect

        import torchvision

        # Detection and segmentation builders would download an ImageNet backbone by default.
        if "weights_backbone" in inspect.signature(torchvision.models.get_model_builder(name)).parameters:
            kwargs.setdefault("weights_backbone", None)
        return _build_on(device, spec, lambda **kw: torchvision.models.get_model(name, weights=None, **kw), kwargs)
    if prefix == "timm":
        try:
            import timm
        except ImportError:
            raise BadInputError("timm: models need timm, which is not installed (pip install timm)") from None
        if not timm.is_model(rest):
            close = difflib.get_close_matches(rest, timm.list_models(), n=5)
            raise BadInputError(f"unknown timm model {rest!r}", f"did you mean: {', '.join(close)}?" if close else None)
        return _build_on(device, spec, lambda **kw: timm.create_model(rest, pretrained=False, **kw), kwargs)
    target, _, attribute = spec.rpartition(":")
    if not target or not attribute:
        raise BadInputError(
            f"cannot read model spec {spec!r}",
            "use a torchvision name, timm:NAME, package.module:factory or file.py:Class",
        )
    if target.endswith(".py"):
        module = _import_user_file(target)
    else:
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as failure:
            raise BadInputError(f"cannot import {target!r}: {failure}") from None
        except Exception as failure:
            raise BadInputError(f"error inside {target}: {type(failure).__name__}: {failure}") from failure
    factory = getattr(module, attribute, None)
    if factory is None or not callable(factory):
        raise BadInputError(f"{target} has no class or function {attribute!r}")
    model = _call_user_code(spec, factory, kwargs)
    if not isinstance(model, torch.nn.Module):
        raise BadInputError(f"{spec} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _import_user_file(path: str) -> Any:
    """Import ``path/to/models.py`` as the module ``models``, as ``python`` run from its folder
    would, so that a model built from it pickles as ``models.Net`` and loads back wherever
    that folder is on ``sys.path``. The folder joins the end of ``sys.path`` (siblings it
    imports are found; installed packages are not shadowed). When the name is taken by
    another module, the file is imported under a private name: it then cannot be pickled
    (:func:`user_code_folders` says so)."""
    import sys

    if not os.path.isfile(path):
        raise BadInputError(f"{path}: no such file")
    folder = os.path.dirname(os.path.abspath(path))
    stem = os.path.splitext(os.path.basename(path))[0]
    name = stem
    if not stem.isidentifier() or _is_taken(stem, os.path.abspath(path)):
        name = _PRIVATE_PREFIX + re.sub(r"\W", "_", stem)
    if folder not in sys.path:
        sys.path.append(folder)
    loader_spec = importlib.util.spec_from_file_location(name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise BadInputError(f"{path}: Python cannot import this file")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[name] = module  # pickle finds classes through sys.modules
    try:
        loader_spec.loader.exec_module(module)
    except Exception as failure:
        del sys.modules[name]
        raise BadInputError(f"error inside {path}: {type(failure).__name__}: {failure}") from failure
    if name == stem:
        _USER_FILE_FOLDERS[name] = folder
    return module


def _is_taken(name: str, path: str) -> bool:
    """Whether ``import name`` already means some other module than the file at ``path``."""
    import sys

    existing = sys.modules.get(name)
    if existing is not None:
        return os.path.abspath(getattr(existing, "__file__", "") or "") != path
    try:
        found = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return True
    return found is not None and os.path.abspath(found.origin or "") != path


def user_code_folders(model: Any) -> list[str]:
    """The folders that must be on ``sys.path`` for a whole pickled ``model`` to load back:
    those of the user files (``file.py:Class`` specs) its modules' classes come from.

    Raises:
        BadInputError: a class comes from a user file imported under a private name (its
            own name is taken by another module): the pickle could not load back.
    """
    folders = []
    for module in model.modules():
        module_name = type(module).__module__
        if module_name.startswith(_PRIVATE_PREFIX):
            raise BadInputError(
                f"{type(module).__name__} comes from a file whose module name is taken by another "
                "module, so a pickled model could not be loaded back",
                "rename the file, or save the weights instead (`trainable_out` names, or a state dict)",
            )
        folder = _USER_FILE_FOLDERS.get(module_name)
        if folder is not None and folder not in folders:
            folders.append(folder)
    return folders


_USER_FILE_FOLDERS: dict[str, str] = {}  # module name -> folder, for user files imported by name
_PRIVATE_PREFIX = "_ptools_user_"  # user files whose own module name is taken are imported under this


_MODEL_FILE_EXTENSIONS = (".pt2", ".pt", ".pth", ".ckpt", ".bin", ".safetensors", ".jit", ".ts")


def _load_model_file(path: str, trust: bool) -> Any:
    import torch

    if path.endswith(".pt2"):
        from ptools.core.checkpoint.exported import load_exported_program

        return _exported_module(load_exported_program(path, trust))
    from ptools.core.checkpoint import open_checkpoint

    try:
        checkpoint = open_checkpoint(path, trust=False)
    except UnsafeFileError as failure:
        if not trust:
            raise whole_model_refused(path, failure) from None
        model = torch.load(path, map_location="cpu", weights_only=False)
        if not isinstance(model, torch.nn.Module):
            raise BadInputError(f"{path} holds a {type(model).__name__}, not a torch.nn.Module") from None
        return model
    if checkpoint.format == "torchscript":
        import warnings

        try:
            with warnings.catch_warnings():  # torch 2.9+ deprecates TorchScript; its files still exist
                warnings.simplefilter("ignore", FutureWarning)
                return torch.jit.load(path, map_location="cpu")
        except Exception as failure:  # torch's own (restricted) unpickler refused a tampered archive
            message = str(failure).strip().splitlines()[0] if str(failure).strip() else type(failure).__name__
            raise BadInputError(f"{path}: not a loadable TorchScript archive ({message[:200]})") from None
    raise BadInputError(
        f"{path} is a checkpoint ({checkpoint.format}), not a model",
        "name the model (e.g. resnet50) and pass the file as `weights`",
    )


def _exported_module(program: Any) -> Any:
    """An ExportedProgram as a module with its original hierarchy (``torch.export.unflatten``:
    submodules keep their names, so hooks, per-module counts and ``train()`` work), carrying
    the original class names and the program's example inputs."""
    import torch

    try:
        module = torch.export.unflatten(program)
    except Exception:  # programs unflatten cannot rebuild still run flat, as one module
        return program.module()
    types: dict[str, str] = {}
    for node in program.graph.nodes:
        for fqn, class_path in (node.meta.get("nn_module_stack") or {}).values():
            if isinstance(fqn, str) and isinstance(class_path, str):
                types.setdefault(fqn, class_path.rpartition(".")[2])
    # Plain attributes on the module object (nn.Module's __setattr__ stores them as such).
    object.__setattr__(module, "ptools_module_types", types)
    object.__setattr__(module, "ptools_example_inputs", program.example_inputs)
    return module


def module_type(model: Any, name: str, module: Any) -> str:
    """The class name to show for submodule ``name``: the original class for TorchScript
    (``original_name``) and exported programs, else ``type(module).__name__``."""
    names = getattr(model, "ptools_module_types", None)
    if names and name in names:
        return names[name]
    original = getattr(module, "original_name", None)
    if isinstance(original, str) and type(module).__name__ == "RecursiveScriptModule":
        return original
    return type(module).__name__


def default_input_size(spec: str, model: Any) -> tuple[tuple[int, ...], str] | None:
    """The input size (without batch) a library model's published weights were made for, and
    where it comes from: torchvision's image classification weights (the crop size of
    ``weights.transforms()``; for ViTs the weights matching the model's ``image_size``) and
    segmentation weights (their resize size); timm's ``pretrained_cfg["input_size"]``. None
    when nothing is published (detection, video and optical-flow models take other inputs).
    """
    config = getattr(model, "pretrained_cfg", None)
    if isinstance(config, dict) and isinstance(config.get("input_size"), (tuple, list)):
        size = tuple(int(v) for v in config["input_size"])
        return size, f"timm's pretrained_cfg input_size for {type(model).__name__}"
    prefix, _, rest = spec.partition(":")
    if not is_library_model(spec) or prefix == "timm":
        return None
    import torchvision

    name = rest if prefix == "torchvision" else spec
    try:
        choices = list(torchvision.models.get_model_weights(name))
        default = torchvision.models.get_model_weights(name).DEFAULT
    except (ValueError, KeyError, AttributeError):
        return None
    built = getattr(model, "image_size", None)  # ViTs are built for one size
    for weights in [default, *choices]:
        transforms = weights.transforms()
        kind = type(transforms).__name__
        crop = getattr(transforms, "crop_size", None)
        side = crop[0] if kind == "ImageClassification" and crop else None
        if kind == "SemanticSegmentation" and getattr(transforms, "resize_size", None):
            side = transforms.resize_size[0]
        if side is None or (isinstance(built, int) and built != side):
            continue
        return (3, side, side), f"the {'crop' if crop else 'resize'} size of {type(weights).__name__}.{weights.name}"
    return None


def whole_model_refused(path: str, failure: UnsafeFileError) -> UnsafeFileError:
    """The error for a pickled object (a whole model?) opened without trust."""
    return UnsafeFileError(
        f"{path} holds pickled objects (a whole model?): {failure.message}",
        "pass `trust=True` to load it with torch.load(weights_only=False); it runs code from the file",
    )


def is_library_model(spec: str) -> bool:
    """Whether a spec names a torchvision or timm model (library code, safe to build on meta)."""
    if os.path.exists(spec):
        return False
    prefix, sep, _ = spec.partition(":")
    return not sep or prefix in ("torchvision", "timm")


def parse_kwargs(text: str | None) -> dict[str, Any]:
    """``--kwargs '{"num_classes": 10}'`` -> dict."""
    if not text:
        return {}
    import json

    try:
        value = json.loads(text)
    except ValueError as failure:
        raise BadInputError(f"`kwargs` is not valid JSON ({failure})") from None
    if not isinstance(value, dict):
        raise BadInputError("`kwargs` must be a JSON object, e.g. '{\"num_classes\": 10}'")
    return value


@dataclass
class WeightsReport:
    """How a checkpoint's tensors fit a model."""

    file: str
    state_dict_key: str
    stripped_prefix: str
    loaded: int
    missing: list[str]
    unexpected: list[str]
    shape_mismatched: list[dict[str, Any]]

    @property
    def clean(self) -> bool:
        return not (self.missing or self.unexpected or self.shape_mismatched)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "clean": self.clean}


def load_weights(model: Any, path: str, *, strict: bool = False, trust: bool = False) -> WeightsReport:
    """Load a checkpoint of any format the reader knows into ``model``: the state dict is
    found automatically and a ``module.``/``_orig_mod.`` prefix removed; tensors whose shape
    does not fit are reported, not loaded.

    Raises:
        BadInputError: with ``strict``, any missing, unexpected or mismatched key.
    """
    import torch

    from ptools.core.checkpoint import list_checkpoint, open_checkpoint, read_tensor
    from ptools.core.keys import detect_wrapper_prefix

    checkpoint = open_checkpoint(path, trust=trust)
    listing = list_checkpoint(checkpoint)
    prefix = detect_wrapper_prefix(row.name for row in listing.rows)
    expected = model.state_dict()
    loaded, unexpected, mismatched = {}, [], []
    for row in listing.rows:
        name = row.name[len(prefix) :]
        if name not in expected:
            unexpected.append(name)
            continue
        if tuple(expected[name].shape) != row.tensor.shape:
            mismatched.append({"name": name, "checkpoint": list(row.tensor.shape), "model": list(expected[name].shape)})
            continue
        values = torch.from_numpy(read_tensor(checkpoint, row.tensor).copy())
        loaded[name] = values.to(expected[name].dtype)
    missing = [name for name in expected if name not in loaded and name not in {m["name"] for m in mismatched}]
    report = WeightsReport(
        file=path,
        state_dict_key=listing.state_dict_key,
        stripped_prefix=prefix,
        loaded=len(loaded),
        missing=missing,
        unexpected=unexpected,
        shape_mismatched=mismatched,
    )
    if strict and not report.clean:
        raise BadInputError(
            f"`strict=True`: {len(missing)} missing, {len(unexpected)} unexpected, "
            f"{len(mismatched)} shape-mismatched key(s) in {path}"
        )
    model.load_state_dict(loaded, strict=False)
    return report


# --------------------------------------------------------------------------- counting


@dataclass
class ParameterCount:
    """Parameters and buffers of a model (tied parameters counted once)."""

    total: int
    trainable: int | None  # None: a state dict does not record requires_grad
    frozen: int | None
    buffers: int
    parameter_bytes: int
    buffer_bytes: int
    by_dtype: dict[str, int]
    modules: list[dict[str, Any]] = field(default_factory=list)
    inferred_from_names: bool = False
    source: str = "model"
    # Lazy modules' parameters and buffers not initialised yet (their sizes come from the
    # first input): not in the counts above, which are then lower bounds.
    uninitialized: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _is_uninitialized(tensor: Any) -> bool:
    from torch.nn.parameter import UninitializedBuffer, UninitializedParameter

    return isinstance(tensor, (UninitializedParameter, UninitializedBuffer))


def count_model(model: Any, depth: int = 1, input_sizes: list[tuple[int, ...]] | None = None) -> ParameterCount:
    """Count a model's parameters; ``modules`` holds per-module subtotals down to ``depth``
    (a parameter shared by two modules is counted in each of them, once in the totals).

    Lazy modules (``nn.LazyLinear`` …) learn their sizes from the first input: with
    ``input_sizes`` (each without the batch dimension) one forward pass of zeros initialises
    them; without, their tensors are listed in ``uninitialized`` and left out of the counts.

    Raises:
        BadInputError: the forward pass that initialises lazy modules fails.
    """
    import torch

    def pending() -> list[str]:
        named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
        return [name for name, tensor in named if _is_uninitialized(tensor)]

    uninitialized = pending()
    if uninitialized and input_sizes:
        device = next((t.device for t in model.parameters() if not _is_uninitialized(t)), torch.device("cpu"))
        modes = [(module, module.training) for module in model.modules()]
        model.eval()  # a batch of one: BatchNorm in training mode would refuse it
        try:
            with torch.no_grad():
                model(*(torch.zeros((1, *size), device=device) for size in input_sizes))
        except Exception as failure:  # the user's model: any error is theirs, reported in one line
            raise BadInputError(
                f"initialising the lazy modules with inputs {[list(s) for s in input_sizes]} failed: "
                f"{type(failure).__name__}: {str(failure).splitlines()[0] if str(failure) else ''}"
            ) from None
        finally:
            for module, training in modes:
                module.training = training
        uninitialized = pending()
    parameters = [p for p in model.parameters() if not _is_uninitialized(p)]  # torch dedups: tied once
    buffers = [b for b in model.buffers() if not _is_uninitialized(b)]
    by_dtype: dict[str, int] = {}
    for p in parameters:
        key = str(p.dtype).removeprefix("torch.")
        by_dtype[key] = by_dtype.get(key, 0) + p.numel()
    modules = []
    for name, module in model.named_modules():
        level = name.count(".") + 1 if name else 0
        if not name or level > depth:
            continue
        own = [p for p in module.parameters() if not _is_uninitialized(p)]
        modules.append(
            {
                "name": name,
                "type": module_type(model, name, module),
                "depth": level,
                "parameters": sum(p.numel() for p in own),
                "trainable": sum(p.numel() for p in own if p.requires_grad),
                "buffers": sum(b.numel() for b in module.buffers() if not _is_uninitialized(b)),
            }
        )
    total = sum(p.numel() for p in parameters)
    trainable = sum(p.numel() for p in parameters if p.requires_grad)
    return ParameterCount(
        total=total,
        trainable=trainable,
        frozen=total - trainable,
        buffers=sum(b.numel() for b in buffers),
        parameter_bytes=sum(p.numel() * p.element_size() for p in parameters),
        buffer_bytes=sum(b.numel() * b.element_size() for b in buffers),
        by_dtype=by_dtype,
        modules=modules,
        uninitialized=uninitialized,
    )


def count_checkpoint(
    source: str | Checkpoint, key: str | None = "auto", depth: int = 1, trust: bool = False
) -> ParameterCount:
    """Count from a checkpoint (a path, or one already opened) without a model and without
    reading tensor data.

    Parameters vs buffers are inferred from names (BatchNorm statistics are buffers); tensors
    sharing storage (tied weights) are counted once."""
    from ptools.core.checkpoint import list_checkpoint, open_checkpoint

    checkpoint = open_checkpoint(source, trust=trust) if isinstance(source, str) else source
    listing = list_checkpoint(checkpoint, key=key)
    seen: set[Any] = set()
    total = buffers = parameter_bytes = buffer_bytes = trainable = 0
    # Pickled nn.Parameters (a whole module, read with trust) record requires_grad; the
    # detached tensors of a state dict do not.
    knows_grad = any(row.kind != "buffer" for row in listing.rows) and all(
        row.tensor.is_parameter for row in listing.rows if row.kind != "buffer"
    )
    by_dtype: dict[str, int] = {}
    prefixes: dict[str, dict[str, Any]] = {}
    for row in listing.rows:
        tensor = row.tensor
        identity = (
            (tensor.storage.file, tensor.storage.key, tensor.storage_offset, tensor.shape)
            if tensor.storage is not None
            else id(tensor)
        )
        if identity in seen:
            continue
        seen.add(identity)
        parts = row.name.split(".")
        grad = row.kind != "buffer" and tensor.requires_grad
        for level in range(1, min(depth, len(parts) - 1) + 1):
            prefix = ".".join(parts[:level])
            entry = prefixes.setdefault(
                prefix,
                {
                    "name": prefix,
                    "type": None,
                    "depth": level,
                    "parameters": 0,
                    "trainable": 0 if knows_grad else None,
                    "buffers": 0,
                },
            )
            entry["buffers" if row.kind == "buffer" else "parameters"] += tensor.numel
            if knows_grad and grad:
                entry["trainable"] += tensor.numel
        if row.kind == "buffer":
            buffers += tensor.numel
            buffer_bytes += tensor.nbytes
        else:
            total += tensor.numel
            trainable += tensor.numel if grad else 0
            parameter_bytes += tensor.nbytes
            by_dtype[tensor.dtype] = by_dtype.get(tensor.dtype, 0) + tensor.numel
    return ParameterCount(
        total=total,
        trainable=trainable if knows_grad else None,
        frozen=total - trainable if knows_grad else None,
        buffers=buffers,
        parameter_bytes=parameter_bytes,
        buffer_bytes=buffer_bytes,
        by_dtype=by_dtype,
        modules=list(prefixes.values()),
        inferred_from_names=listing.kinds_inferred,
        source="checkpoint",
    )


def human(count: int) -> str:
    """25557032 -> '25.6 M'."""
    for unit, size in (("G", 10**9), ("M", 10**6), ("K", 10**3)):
        if abs(count) >= size:
            return f"{count / size:.1f} {unit}"
    return str(count)


# --------------------------------------------------------------------------- freezing


def frozen_batchnorm(source: Any) -> Any:
    """A :class:`~ptools.core.frozen_bn.FrozenBatchNorm` copy of a BatchNorm1d/2d/3d or
    SyncBatchNorm module."""
    from ptools.core.frozen_bn import FrozenBatchNorm

    return FrozenBatchNorm(source)


def _matches(name: str, pattern: str) -> bool:
    """Glob match on dotted boundaries: a module matches when it, or one of its dotted
    ancestors, matches the glob; a ``module.`` wrapper prefix is ignored on either side."""
    names = {name}
    if name.startswith("module."):
        names.add(name[len("module.") :])
    patterns = {pattern, pattern[len("module.") :]} if pattern.startswith("module.") else {pattern}
    for candidate in names:
        parts = candidate.split(".")
        for cut in range(1, len(parts) + 1):
            prefix = ".".join(parts[:cut])
            if any(fnmatch.fnmatchcase(prefix, p) for p in patterns):
                return True
    return False


@dataclass
class FreezeReport:
    """What :func:`freeze` did (or would do)."""

    frozen_modules: list[dict[str, Any]]
    trainable_before: int
    trainable_after: int
    total: int
    batchnorm: str
    batchnorm_replaced: list[str] = field(default_factory=list)
    batchnorm_eval: list[str] = field(default_factory=list)
    dry_run: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def freeze(
    model: Any, layers: Sequence[str], except_: Sequence[str] = (), bn: BatchNormMode = "frozen", dry_run: bool = False
) -> FreezeReport:
    """Freeze the modules whose dotted names match ``layers`` (globs), except ``except_``.

    Args:
        bn: ``frozen`` replaces BatchNorm (1d/2d/3d, SyncBatchNorm) in the frozen part with
            FrozenBatchNorm, so a later ``model.train()`` cannot update statistics; ``eval``
            puts them in eval mode (undone by ``model.train()``); ``none`` leaves them.

    Raises:
        BadInputError: a pattern matches no module, or an unknown ``bn`` mode.
    """
    import torch

    if bn not in BN_MODES:
        raise BadInputError(f"unknown `bn` {bn!r}; choose one of: {', '.join(BN_MODES)}")
    if not layers:
        raise BadInputError("name at least one layer pattern, e.g. `layers` 'backbone.*'")
    named = [(name, module) for name, module in model.named_modules() if name]
    for pattern in [*layers, *except_]:
        if not any(_matches(name, pattern) for name, _ in named):
            sample = ", ".join(name for name, _ in named if "." not in name)[:200]
            raise BadInputError(f"pattern {pattern!r} matches no module", f"top-level modules: {sample}")
    selected = [
        (name, module)
        for name, module in named
        if any(_matches(name, p) for p in layers) and not any(_matches(name, p) for p in except_)
    ]
    # Report each matched subtree once, at its top.
    tops = [
        (name, module)
        for name, module in selected
        if not any(name.startswith(other + ".") for other, _ in selected if other != name)
    ]
    excluded = {id(p) for name, module in named if any(_matches(name, p) for p in except_) for p in module.parameters()}
    to_freeze = {id(p): p for _, module in selected for p in module.parameters(recurse=False) if id(p) not in excluded}

    def trainable(parameters: Iterable[Any], after: bool) -> int:
        return sum(p.numel() for p in parameters if p.requires_grad and not (after and id(p) in to_freeze))

    everything = list(model.parameters())
    rows = [
        {
            "name": name,
            "type": type(module).__name__,
            "parameters": sum(p.numel() for p in module.parameters()),
            "trainable_before": trainable(module.parameters(), after=False),
            "trainable_after": trainable(module.parameters(), after=True),
        }
        for name, module in tops
    ]
    report = FreezeReport(
        frozen_modules=rows,
        trainable_before=trainable(everything, after=False),
        trainable_after=trainable(everything, after=True),
        total=sum(p.numel() for p in everything),
        batchnorm=bn,
        dry_run=dry_run,
    )
    batchnorms = [
        (name, module) for name, module in selected if isinstance(module, torch.nn.modules.batchnorm._BatchNorm)
    ]
    if bn == "frozen":
        report.batchnorm_replaced = [name for name, _ in batchnorms]
    elif bn == "eval":
        report.batchnorm_eval = [name for name, _ in batchnorms]
    if dry_run:
        return report
    for parameter in to_freeze.values():
        parameter.requires_grad_(False)
    if bn == "frozen":
        modules = dict(model.named_modules())
        for name, module in batchnorms:
            parent_name, _, child = name.rpartition(".")
            setattr(modules[parent_name] if parent_name else model, child, frozen_batchnorm(module))
    elif bn == "eval":
        for _, module in batchnorms:
            module.eval()
    return report


def unfreeze(model: Any, layers: Sequence[str] = ("*",)) -> int:
    """Make the parameters of the modules matching ``layers`` trainable again; returns how
    many elements changed. (FrozenBatchNorm replacements stay frozen.)"""
    changed = 0
    for name, module in model.named_modules():
        if name and any(_matches(name, p) for p in layers):
            for parameter in module.parameters(recurse=False):
                if not parameter.requires_grad:
                    parameter.requires_grad_(True)
                    changed += parameter.numel()
    return changed


def trainable_parameters(model: Any) -> list[Any]:
    """The parameters an optimizer should get: those that require grad (build optimizers
    after freezing, or frozen tensors still receive weight decay and momentum)."""
    return [p for p in model.parameters() if p.requires_grad]


def trainable_names(model: Any) -> list[str]:
    """Names of the trainable parameters, for an optimizer config file."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


def iter_patterns(values: Iterable[str] | None) -> list[str]:
    """Split repeated and comma-separated pattern options into one list."""
    return [part.strip() for value in values or () for part in value.split(",") if part.strip()]
