"""Finding the model weights inside a training checkpoint, and describing what else is there."""

from __future__ import annotations

import argparse
import collections
from collections.abc import Iterator, Mapping
from typing import Any

from ptools.core.checkpoint.tensors import TensorInfo
from ptools.core.checkpoint.unpickle import NumpyArray, NumpyDType, Opaque, TorchDType, TorchMarker
from ptools.errors import BadInputError

# Where training code usually keeps the model weights, most specific first. EMA weights
# (timm's state_dict_ema, model_ema) come after the live ones.
STATE_DICT_KEYS = (
    "state_dict",
    "model_state_dict",
    "model_state",
    "model",
    "module",
    "net",
    "network",
    "weights",
    "params",
    "state_dict_ema",
    "model_ema",
    "ema",
)


def iter_tensors(node: Any, prefix: str = "") -> Iterator[tuple[str, TensorInfo]]:
    """Every tensor under ``node`` with its dotted path (list items by index)."""
    if isinstance(node, TensorInfo):
        yield prefix.rstrip("."), node
    elif isinstance(node, Mapping):
        for key, value in node.items():
            yield from iter_tensors(value, f"{prefix}{key}.")
    elif isinstance(node, (list, tuple)):
        for index, value in enumerate(node):
            yield from iter_tensors(value, f"{prefix}{index}.")


def is_state_dict(node: Any) -> bool:
    """A mapping of names to tensors (``_extra_state`` entries may hold anything)."""
    if not isinstance(node, Mapping) or not node:
        return False
    tensors = 0
    for key, value in node.items():
        if isinstance(value, TensorInfo):
            tensors += 1
        elif not str(key).endswith("_extra_state"):
            return False
    return tensors > 0


def navigate(root: Any, path: str) -> Any:
    """Follow a dotted path through nested dicts and lists. Keys may contain dots themselves:
    the longest key matching at each level wins.

    Raises:
        BadInputError: the path names nothing, listing what exists at the failing level.
    """
    node, rest, walked = root, path, []
    while rest:
        if isinstance(node, Mapping):
            parts = rest.split(".")
            for cut in range(len(parts), 0, -1):
                candidate = ".".join(parts[:cut])
                if candidate in node:
                    node, rest = node[candidate], ".".join(parts[cut:])
                    walked.append(candidate)
                    break
            else:
                keys = ", ".join(map(str, list(node)[:12]))
                where = ".".join(walked) or "the top level"
                raise BadInputError(f"`key` {path!r}: no key {parts[0]!r} at {where}; there are: {keys}")
        elif isinstance(node, (list, tuple)):
            head, _, rest = rest.partition(".")
            if not head.isdigit() or int(head) >= len(node):
                raise BadInputError(f"`key` {path!r}: {head!r} is not an index of a list of {len(node)}")
            node = node[int(head)]
            walked.append(head)
        else:
            raise BadInputError(f"`key` {path!r}: {'.'.join(walked)!r} holds a {type_name(node)}, not a dict or list")
    return node


def find_state_dict(root: Any, key: str | None = "auto") -> tuple[str, Any, str]:
    """Locate the model weights.

    Args:
        root: the checkpoint's object.
        key: a dotted path (``--key``), or ``auto``/None to search.

    Returns:
        ``(path, node, how)``: the dotted path ("" for the top level), the node, and a phrase
        saying how it was chosen.

    Raises:
        BadInputError: ``key`` names nothing, or no tensors exist anywhere.
    """
    if key not in (None, "auto"):
        return key, navigate(root, key), "given with `key`"
    if is_state_dict(root):
        return "", root, "the file is a state dict"
    path = _search_known_keys(root, "")
    if path is not None:
        return path, navigate(root, path), "a conventional key for model weights"
    best = max(_state_dicts(root, ""), key=lambda found: len(found[1]), default=None)
    if best is not None:
        return best[0], best[1], "the largest dict of tensors in the file"
    if any(True for _ in iter_tensors(root)):
        return "", root, "every tensor in the file (no dict of tensors found)"
    raise BadInputError("no tensors found in this checkpoint")


def _search_known_keys(node: Any, prefix: str) -> str | None:
    if not isinstance(node, Mapping):
        return None
    for key in STATE_DICT_KEYS:
        value = node.get(key)
        if is_state_dict(value):
            return f"{prefix}{key}"
        nested = _search_known_keys(value, f"{prefix}{key}.")
        if nested is not None:
            return nested
    return None


def _state_dicts(node: Any, prefix: str) -> Iterator[tuple[str, Mapping[str, Any]]]:
    if is_state_dict(node):
        yield prefix.rstrip("."), node
    elif isinstance(node, Mapping):
        for key, value in node.items():
            yield from _state_dicts(value, f"{prefix}{key}.")


def flatten(node: Any) -> collections.OrderedDict[str, Any]:
    """The chosen sub-tree as ``{name: TensorInfo or other value}``; nested containers dotted."""
    if isinstance(node, Mapping):
        if all(type(value) is TensorInfo and type(key) is str for key, value in node.items()):
            return collections.OrderedDict(node)  # a flat state dict (the common case): one C-speed copy
        flat: collections.OrderedDict[str, Any] = collections.OrderedDict()
        for key, value in node.items():
            if isinstance(value, (Mapping, list, tuple)) and any(True for _ in iter_tensors(value)):
                for name, tensor in iter_tensors(value, f"{key}."):
                    flat[name] = tensor
            else:
                flat[str(key)] = value
        return flat
    if isinstance(node, TensorInfo):
        return collections.OrderedDict([("", node)])
    return collections.OrderedDict(iter_tensors(node))


def type_name(value: Any) -> str:
    """A short, familiar name for the type of a checkpoint value."""
    if isinstance(value, TensorInfo):
        return "tensor"
    if isinstance(value, Opaque):
        return value.qualified_name
    if isinstance(value, NumpyArray):
        return "numpy.ndarray"
    if isinstance(value, NumpyDType):
        return "numpy.dtype"
    if isinstance(value, argparse.Namespace):
        return "argparse.Namespace"
    if isinstance(value, (TorchDType, TorchMarker)):
        return "torch." + type(value).__name__.replace("Torch", "").lower()
    module = type(value).__module__
    return type(value).__name__ if module == "builtins" else f"{module}.{type(value).__name__}"


def describe(value: Any) -> str:
    """One line about a top-level value: what it is and how much it holds."""
    if isinstance(value, TensorInfo):
        return f"{value.dtype} {list(value.shape)}"
    if isinstance(value, list) and value and all(_is_optimizer_state(v) for v in value):
        return f"{len(value)} optimizer state(s): " + "; ".join(describe(v) for v in value[:3])
    if _is_optimizer_state(value):
        groups = value["param_groups"]
        state = value["state"]
        tensors = sum(1 for _ in iter_tensors(state))
        return (
            f"optimizer state: {len(groups) if isinstance(groups, list) else '?'} param group(s), "
            f"state for {len(state) if isinstance(state, Mapping) else '?'} parameter(s) "
            f"({tensors} tensors)"
        )
    if isinstance(value, (Mapping, list, tuple)):
        found = list(iter_tensors(value))
        kind = "dict" if isinstance(value, Mapping) else type(value).__name__
        if found:
            numel = sum(t.numel for _, t in found)
            others = len(value) - len(found) if isinstance(value, Mapping) and is_state_dict(value) else None
            extra = f", {others} other entries" if others else ""
            return f"{kind} of {len(value)}: {len(found)} tensors, {numel:,} elements{extra}"
        return f"{kind} of {len(value)}: {short_repr(value)}"
    if isinstance(value, argparse.Namespace):
        return f"{len(vars(value))} fields: {short_repr(vars(value))}"
    return short_repr(value)


def _is_optimizer_state(value: Any) -> bool:
    return isinstance(value, Mapping) and {"state", "param_groups"} <= set(value)


def short_repr(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def plain(value: Any) -> Any:
    """A JSON-ready form of a non-tensor value: numbers, strings, lists, dicts; else repr."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, argparse.Namespace):
        return {k: plain(v) for k, v in vars(value).items()}
    if isinstance(value, NumpyArray):
        value = value.array
    if type(value).__module__ == "numpy":
        size = getattr(value, "size", 1)
        if size <= 64:
            return plain(value.tolist())  # numpy scalars and small arrays
        return f"<numpy array {getattr(value, 'shape', '')} {getattr(value, 'dtype', '')}>"
    return repr(value)


def _is_module(value: Any) -> bool:
    """An ``nn.Module`` as unpickled with trust: its state lives in ``__dict__``."""
    state = getattr(value, "__dict__", None)
    return (
        isinstance(state, dict)
        and isinstance(state.get("_parameters"), Mapping)
        and isinstance(state.get("_modules"), Mapping)
    )


def module_state_dict(module: Any) -> tuple[collections.OrderedDict[str, Any], set[str]]:
    """What ``module.state_dict()`` would hold - parameters, then persistent buffers, then
    each child's, dotted - read from the unpickled attributes without calling the module's
    code (its tensors are descriptions, not torch tensors). Also the names that are
    parameters."""
    state: collections.OrderedDict[str, Any] = collections.OrderedDict()
    parameters: set[str] = set()
    seen: set[int] = set()

    def walk(node: Any, prefix: str) -> None:
        if id(node) in seen:  # a module reachable twice is listed once, as torch does
            return
        seen.add(id(node))
        attributes = node.__dict__
        for name, value in attributes["_parameters"].items():
            if isinstance(value, TensorInfo):
                state[prefix + str(name)] = value
                parameters.add(prefix + str(name))
        transient = attributes.get("_non_persistent_buffers_set") or ()
        for name, value in (attributes.get("_buffers") or {}).items():
            if isinstance(value, TensorInfo) and name not in transient:
                state[prefix + str(name)] = value
        for name, child in attributes["_modules"].items():
            if _is_module(child):
                walk(child, f"{prefix}{name}.")

    walk(module, "")
    return state, parameters


def expand_modules(root: Any) -> tuple[Any, set[str] | None, int]:
    """Replace every whole pickled module in ``root`` (read with trust) by its state dict.

    Returns:
        ``(root, parameter_names, count)``: the new root; when the root itself was a module,
        the names of its parameters (else None); how many modules were replaced.
    """
    if _is_module(root):
        state, parameters = module_state_dict(root)
        return state, parameters, 1
    replaced = 0

    def visit(node: Any) -> Any:
        nonlocal replaced
        if _is_module(node):
            replaced += 1
            return module_state_dict(node)[0]
        if isinstance(node, dict):
            for key, value in node.items():
                node[key] = visit(value)
        elif isinstance(node, list):
            node[:] = [visit(value) for value in node]
        return node

    return visit(root), None, replaced
