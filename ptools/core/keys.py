"""Key transforms for state dicts: strip, add and rename prefixes, select keys, cast, and
remap device tags.

They work on any mapping - a state dict of torch tensors in a training script as well as the
tensor descriptions ptools reads - and keep the state dict's ``_metadata`` (per-module
versions that ``load_state_dict`` reads), its module names renamed along with the keys.
Importing this module imports neither torch nor the conversion pipeline.
"""

from __future__ import annotations

import collections
import difflib
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ptools.errors import BadInputError

# The prefixes wrappers put in front of every key: DataParallel/DDP and torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
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
_DEVICE_RE = re.compile(r"^([a-z]+)(:\d+)?$")
# The device types torch.device accepts (c10's DeviceType names), so that a tag torch cannot
# load (`gpu`, `foo`) is refused here instead of being written into the output.
TORCH_DEVICE_TYPES = (
    "cpu", "cuda", "mps", "xpu", "meta", "hpu", "mtia", "xla", "lazy", "ipu", "hip", "ve", "fpga", "maia",
    "vulkan", "opengl", "opencl", "ideep", "mkldnn", "privateuseone",
)  # fmt: skip


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
        match = _DEVICE_RE.match(value)
        if not match:
            raise BadInputError(f"`map_location`: {value!r} is not a device (cpu, cuda, cuda:1, …)")
        if match.group(1) not in TORCH_DEVICE_TYPES:
            close = (
                ["cuda"]
                if match.group(1) == "gpu"
                else difflib.get_close_matches(match.group(1), TORCH_DEVICE_TYPES, n=1)
            )
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise BadInputError(
                f"`map_location`: {value!r} is not a device type torch knows{hint} (cpu, cuda, cuda:1, mps, xpu, …)"
            )
        return value

    if "=" not in text:
        target = device(text)
        return lambda _location: target
    mapping = {}
    for pair in text.split(","):
        source, sep, target = pair.partition("=")
        if not sep:
            raise BadInputError(f"`map_location`: {pair!r} is not FROM=TO")
        origin = device(source)  # checked first: an error names the first bad device of the pair
        mapping[origin] = device(target)
    return lambda location: mapping.get(location, location)
