"""Layer-by-layer model summaries with output shapes and MACs/FLOPs counted from the real
operations (``torch.utils.flop_counter``: matmul, linear, convolution, attention), not
estimated from parameter counts.

One forward pass under ``no_grad``; the model's mode (train/eval, per module) and every buffer
(BatchNorm running statistics included) are as they were afterwards; the model is never moved.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from ptools.core.choices import SummaryDtype, SummaryMode, values
from ptools.errors import BadInputError

DTYPES = values(SummaryDtype)
DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
SHAPES_KEPT = 16  # distinct output shapes kept per module (an RNN cell may run thousands of times)


class ForwardPassError(BadInputError):
    """The model's own forward pass failed on the inputs given (its error is in the message)."""


def torch_dtype(name: str) -> Any:
    """``"bf16"`` or ``"bfloat16"`` -> ``torch.bfloat16``."""
    import torch

    name = DTYPE_ALIASES.get(name, name)
    if name not in DTYPES:
        raise BadInputError(f"unknown dtype {name!r}; choose one of: {', '.join(DTYPES)}")
    return getattr(torch, name)


def parse_input_size(text: str) -> tuple[int, ...]:
    """``"3,224,224"`` -> ``(3, 224, 224)``."""
    try:
        size = tuple(int(part) for part in text.replace("x", ",").split(",") if part.strip())
    except ValueError:
        raise BadInputError(f"`input_size` {text!r} is not a list of integers like 3,224,224") from None
    if not size or any(s <= 0 for s in size):
        raise BadInputError(f"`input_size` {text!r} must list positive sizes, like 3,224,224")
    return size


def _tensor_from_spec(spec: dict[str, Any], device: Any, default_dtype: Any) -> Any:
    import torch

    shape = spec.get("shape")
    if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise BadInputError(f"`input_spec`: {spec!r}: 'shape' must be a list of sizes")
    dtype_name = spec.get("dtype")
    dtype = getattr(torch, dtype_name, None) if dtype_name else default_dtype
    if not isinstance(dtype, torch.dtype):
        raise BadInputError(f"`input_spec`: unknown dtype {dtype_name!r}")
    fill = spec.get("fill", "randn" if dtype.is_floating_point else "zeros")
    if fill == "randn":
        return torch.randn(shape, dtype=dtype, device=device)
    if fill == "zeros":
        return torch.zeros(shape, dtype=dtype, device=device)
    if fill == "ones":
        return torch.ones(shape, dtype=dtype, device=device)
    if fill == "randint":
        return torch.randint(0, int(spec.get("high", 2)), shape, dtype=dtype, device=device)
    raise BadInputError(f"`input_spec`: unknown fill {fill!r}; choose one of: randn, zeros, ones, randint")


def _build(value: Any, device: Any, dtype: Any, batch: int | None = None) -> Any:
    if isinstance(value, dict) and "shape" in value:
        if batch is not None and isinstance(value["shape"], list) and value["shape"]:
            value = {**value, "shape": [batch, *value["shape"][1:]]}
        return _tensor_from_spec(value, device, dtype)
    if isinstance(value, dict):
        return {k: _build(v, device, dtype, batch) for k, v in value.items()}
    if isinstance(value, list):
        return [_build(v, device, dtype, batch) for v in value]
    return value


def make_inputs(
    input_sizes: list[tuple[int, ...]],
    batch_size: int,
    input_spec: str | None,
    device: Any,
    dtype: Any,
    *,
    spec_batch: int | None = None,
) -> tuple[list[Any], dict[str, Any]]:
    """Positional and keyword inputs from ``--input-size`` (batch dimension added) or from an
    ``--input-spec``: JSON (or ``@file.json``) ``{"args": [...], "kwargs": {...}}`` where any
    object with a ``shape`` is a tensor: ``{"shape": [1, 128], "dtype": "int64", "fill": "randint",
    "high": 30000}`` (fill: randn (floats' default), zeros (others'), ones, randint).
    ``spec_batch`` replaces the first dimension of every tensor of a spec (a batch sweep)."""
    import torch

    if input_spec is not None:
        text = input_spec
        if input_spec.startswith("@"):
            try:
                with open(input_spec[1:], encoding="utf-8") as handle:
                    text = handle.read()
            except OSError as failure:
                raise BadInputError(f"`input_spec` {input_spec}: {failure.strerror or failure}") from None
        try:
            spec = json.loads(text)
        except ValueError as failure:
            raise BadInputError(f"`input_spec` is not valid JSON ({failure})") from None
        if not isinstance(spec, dict) or not set(spec) <= {"args", "kwargs"}:
            raise BadInputError('`input_spec` must be an object {"args": [...], "kwargs": {...}}')
        args = _build(spec.get("args", []), device, dtype, spec_batch)
        kwargs = _build(spec.get("kwargs", {}), device, dtype, spec_batch)
        if not isinstance(args, list) or not isinstance(kwargs, dict):
            raise BadInputError('`input_spec`: "args" must be a list and "kwargs" an object')
        return args, kwargs
    if not input_sizes:
        raise BadInputError("give `input_size` (e.g. 3,224,224) or `input_spec`")
    if batch_size < 1:
        raise BadInputError(f"`batch_size` must be 1 or more, not {batch_size}")
    return [torch.randn((batch_size, *size), dtype=dtype, device=device) for size in input_sizes], {}


def describe(value: Any) -> Any:
    """Shapes of a module output: tensors as lists, containers kept, None as None."""
    import torch

    if isinstance(value, torch.Tensor):
        return list(value.shape)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): describe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [describe(v) for v in value]
    return type(value).__name__


def shape_text(described: Any) -> str:
    """``[1, 64, 56, 56]`` -> ``1×64×56×56``; containers in brackets, dicts with keys."""
    if isinstance(described, list) and all(isinstance(v, int) for v in described):
        return "×".join(map(str, described)) or "scalar"
    if isinstance(described, list):
        return "(" + ", ".join(shape_text(v) for v in described) + ")"
    if isinstance(described, dict):
        return "{" + ", ".join(f"{k}: {shape_text(v)}" for k, v in described.items()) + "}"
    return "None" if described is None else str(described)


def _tensor_bytes(value: Any) -> int:
    import torch

    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


@dataclass
class LayerRow:
    """One module of the summary. ``macs`` counts multiply-accumulates (FLOPs = 2 × MACs)."""

    name: str
    type: str
    depth: int
    output: Any  # the first call's output shapes (None: not called, or not observable)
    parameters: int
    trainable: int
    macs: int | None  # None: not observable (a submodule of a TorchScript module)
    flops: int | None
    calls: int
    outputs: list[Any] = field(default_factory=list)  # distinct output shapes, in call order


@dataclass
class ModelSummary:
    """A forward pass, measured. Bytes are bytes (human output shows MiB = 2^20 bytes)."""

    model: str
    mode: str
    device: str
    dtype: str
    inputs: Any
    output: Any
    rows: list[LayerRow]
    totals: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    units: dict[str, str] = field(
        default_factory=lambda: {
            "macs": "multiply-accumulates of matmul, linear, convolution and attention ops",
            "flops": "2 x MACs (torch.utils.flop_counter); elementwise ops are not counted",
            "bytes": "bytes; human output in KiB/MiB/GiB (2^10/2^20/2^30 bytes)",
            "activation_bytes": "estimate: sum of the outputs of leaf modules",
        }
    )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _extra_flop_formulas() -> dict[Any, Any]:
    """CPU kernels torch's counter does not know and would count as zero: SDPA runs as
    ``_scaled_dot_product_flash_attention_for_cpu``, and LSTMs (GRU/RNN where oneDNN takes
    them) as one ``mkldnn_rnn_layer`` per layer and direction."""
    import torch
    from torch.utils.flop_counter import sdpa_flop_count

    def cpu_flash_attention(
        query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, out_shape: Any = None, **kwargs: Any
    ) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    def recurrent_layer(
        input_shape: Any, input_weight: Any, hidden_weight: Any, *args: Any, out_shape: Any = None, **kwargs: Any
    ) -> int:
        # One layer and direction of an LSTM/GRU/RNN as oneDNN runs it on the CPU: every time
        # step of every sequence multiplies the input by W_ih [G·H, I] and the state by
        # W_hh [G·H, H] (what the meta device's decomposition counts as addmm).
        steps = math.prod(input_shape[:-1])  # T × B, or the rows of a packed sequence
        return 2 * steps * (math.prod(input_weight) + math.prod(hidden_weight))

    def recurrent_layer_backward(
        input_shape: Any, input_weight: Any, hidden_weight: Any, *args: Any, **kwargs: Any
    ) -> int:
        return 2 * recurrent_layer(input_shape, input_weight, hidden_weight)  # input and weight gradients

    formulas: dict[Any, Any] = {}
    for name, formula in (
        ("_scaled_dot_product_flash_attention_for_cpu", cpu_flash_attention),
        ("mkldnn_rnn_layer", recurrent_layer),
        ("mkldnn_rnn_layer_backward", recurrent_layer_backward),
    ):
        kernel = getattr(torch.ops.aten, name, None)
        if kernel is not None:
            formulas[kernel] = formula
    return formulas


def summarize(
    model: Any,
    args: list[Any],
    kwargs: dict[str, Any] | None = None,
    *,
    mode: SummaryMode = "eval",
    name: str | None = None,
) -> ModelSummary:
    """Run one forward pass of ``model(*args, **kwargs)`` and measure every module.

    Args:
        mode: ``eval`` (default) or ``train`` (e.g. GoogLeNet/Inception's tuple outputs); in
            both, buffers are restored afterwards, so BatchNorm statistics are untouched.

    Raises:
        ForwardPassError: the forward pass fails (the model's own error is reported).
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ptools.core.models import module_type

    if mode not in ("eval", "train"):
        raise BadInputError(f"unknown mode {mode!r}; choose one of: eval, train")
    kwargs = kwargs or {}
    modes = {module: module.training for module in model.modules()}
    saved_buffers = (
        {
            key: value.detach().clone()
            for key, value in model.state_dict(keep_vars=True).items()
            if not isinstance(value, torch.nn.Parameter) and value.device.type != "meta"
        }
        if mode == "train"
        else {}
    )
    outputs: dict[str, list[Any]] = {}
    calls: dict[str, int] = {}
    leaf_bytes = [0]
    names = {module: module_name for module_name, module in model.named_modules()}
    leaves = {module for module in model.modules() if not list(module.children())}

    def hook(module: Any, _inputs: Any, output: Any) -> None:
        module_name = names.get(module)
        if module_name is None:
            return
        calls[module_name] = calls.get(module_name, 0) + 1
        shapes = outputs.setdefault(module_name, [])
        if len(shapes) < SHAPES_KEPT:
            shape = describe(output)
            if shape not in shapes:
                shapes.append(shape)
        if module in leaves:
            leaf_bytes[0] += _tensor_bytes(output)

    # TorchScript modules take no hooks: their totals are measured, per-module shapes are not.
    scripted = isinstance(model, torch.jit.ScriptModule)
    handles = [] if scripted else [module.register_forward_hook(hook) for module in model.modules()]
    # depth=None: every module level (torch's annotation says int; None is what it checks for).
    counter = FlopCounterMode(display=False, depth=None, custom_mapping=_extra_flop_formulas())  # type: ignore[arg-type]
    model.train(mode == "train")
    # MultiheadAttention's fused fast path is one opaque kernel to the counter; the regular
    # path computes the same thing through countable ops (projections and SDPA).
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with counter, torch.no_grad():
            result = model(*args, **kwargs)
    except Exception as failure:
        raise ForwardPassError(
            f"the forward pass failed: {type(failure).__name__}: {str(failure)[:300]}",
            "check `input_size` / `input_spec` against what the model expects",
        ) from failure
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for handle in handles:
            handle.remove()
        restore_state(model, modes, saved_buffers)
    counts = counter.get_flop_counts()
    root = type(model).__name__
    rows = []
    for module_name, module in model.named_modules():
        key = f"{root}.{module_name}" if module_name else root
        flops = int(sum(counts.get(key, {}).values()))
        own = list(module.parameters())
        shapes = outputs.get(module_name, [])
        rows.append(
            LayerRow(
                name=module_name,
                type=module_type(model, module_name, module),
                depth=module_name.count(".") + 1 if module_name else 0,
                output=shapes[0] if shapes else None,
                parameters=sum(p.numel() for p in own),
                trainable=sum(p.numel() for p in own if p.requires_grad),
                macs=None if scripted and module_name else flops // 2,
                flops=None if scripted and module_name else flops,
                calls=calls.get(module_name, 0),
                outputs=shapes,
            )
        )
    parameters = list(model.parameters())
    buffers = list(model.buffers())
    total_flops = int(counter.get_total_flops())
    first = next((p for p in parameters), None)
    totals = {
        "parameters": sum(p.numel() for p in parameters),
        "trainable": sum(p.numel() for p in parameters if p.requires_grad),
        "non_trainable": sum(p.numel() for p in parameters if not p.requires_grad),
        "buffers": sum(b.numel() for b in buffers),
        "parameter_bytes": sum(p.numel() * p.element_size() for p in parameters),
        "buffer_bytes": sum(b.numel() * b.element_size() for b in buffers),
        "activation_bytes": leaf_bytes[0],
        "input_bytes": _tensor_bytes(args) + _tensor_bytes(kwargs),
        "macs": total_flops // 2,
        "flops": total_flops,
        # Names beyond the first that a parameter is reachable under (an LM head tied to its
        # embedding: 1); the totals count each parameter once.
        "tied_names": len(list(model.named_parameters(remove_duplicate=False))) - len(parameters),
    }
    notes = []
    if scripted:
        notes.append(
            "TorchScript: scripted modules take no forward hooks, so per-module output shapes, calls "
            "and MACs cannot be observed; the totals and the output are measured over the whole forward"
        )
        totals["activation_bytes"] = None
    return ModelSummary(
        model=name or root,
        mode=mode,
        device=str(first.device) if first is not None else "cpu",
        dtype=str(first.dtype).removeprefix("torch.") if first is not None else "float32",
        inputs=describe([args, kwargs]),
        output=describe(result),
        rows=rows,
        totals=totals,
        notes=notes,
    )


def restore_state(model: Any, modes: dict[Any, bool], saved: dict[str, Any]) -> None:
    """Put back each module's train/eval mode and the values of ``saved`` (state-dict keys to
    copies taken before a pass that may have changed them)."""
    import torch

    for module, training in modes.items():
        module.training = training
    if saved:
        with torch.no_grad():
            current = model.state_dict(keep_vars=True)
            for key, value in saved.items():
                current[key].copy_(value)


def torchsummary_text(model: Any, input_sizes: list[tuple[int, ...]], batch_size: int, device: str) -> str:
    """The classic torchsummary layout, via the torchsummary package, in eval mode under
    no_grad with mode and buffers restored (torchsummary itself would update BatchNorm).

    Raises:
        BadInputError: torchsummary cannot handle the model (it fails on dict/None outputs).
    """
    import contextlib
    import io

    import torch
    from torchsummary import summary

    if device not in ("cpu", "cuda"):
        raise BadInputError("the torchsummary layout runs on `device` cpu or cuda only")
    modes = {module: module.training for module in model.modules()}
    text = io.StringIO()
    model.eval()
    try:
        with torch.no_grad(), contextlib.redirect_stdout(text):
            summary(
                model, input_sizes if len(input_sizes) > 1 else input_sizes[0], batch_size=batch_size, device=device
            )
    except Exception as failure:
        raise BadInputError(
            f"torchsummary cannot summarize this model ({type(failure).__name__}: {str(failure)[:200]})",
            "use the default format",
        ) from None
    finally:
        restore_state(model, modes, {})
    return text.getvalue()


def check_device(text: str) -> str:
    """The form of a model device: cpu, meta, cuda or cuda:N (whether it exists is
    :func:`model_device`'s question)."""
    import re

    if not re.fullmatch(r"auto|cpu|meta|cuda(:\d+)?", text):
        raise BadInputError(f"unknown device {text!r}; choose auto, cpu, meta, cuda or cuda:N")
    return text


def model_device(text: str) -> str:
    """Validate ``--device``: cpu, meta, cuda or cuda:N, and that torch sees CUDA for the latter.

    Raises:
        BadInputError: not a device name.
        RequirementNotMetError: a CUDA device on a machine where torch sees none.
    """
    check_device(text)
    if text.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            from ptools.errors import RequirementNotMetError

            raise RequirementNotMetError(f"`device` {text}: torch sees no CUDA device")
    return text
