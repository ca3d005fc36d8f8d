"""What one training step costs: memory by part at its peak, and forward and backward FLOPs.

One forward pass, a loss, ``loss.backward()`` and ``optimizer.step()`` run under a dispatch
mode that sees every tensor the step allocates (ops, autograd and the optimizer alike) and
notices when its storage is freed, so the live total is known after every op. Where the step
runs on the meta device, the tensors are fake (``FakeTensorMode``): shapes, dtypes and
strides without memory or arithmetic, so any model size is traced on any machine.

The step measured is the steady one of a training loop: the optimizer state exists already
(as after the first step) and the gradients do not (``zero_grad(set_to_none=True)``, the
default). Storages are classified after the step, by what they turned out to be: a parameter,
buffer or input; a parameter's ``.grad``; a tensor in ``optimizer.state``; a tensor autograd
saved for backward during the forward pass (``saved_tensors_hooks``); anything else is a
temporary.
"""

from __future__ import annotations

import contextlib
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from ptools.core.choices import TrainOptimizer as Optimizer
from ptools.core.choices import TrainTarget as Target
from ptools.core.choices import values
from ptools.core.summary import restore_state
from ptools.errors import BadInputError

OPTIMIZERS = values(Optimizer)
PARTS = ("parameters", "buffers", "inputs", "gradients", "optimizer_state", "activations", "temporaries")
PHASES = ("forward", "loss", "backward", "optimizer")
CUDA_BLOCK = 512  # the CUDA caching allocator rounds every allocation up to a multiple of this
SGD_MOMENTUM = 0.9  # what training recipes use; it gives SGD one state tensor per parameter
FIT_LIMIT = 1 << 24  # largest batch `fit_batch_size` tries


class TrainingStepError(BadInputError):
    """The step could not be traced or run (the model's own error is in the message).
    ``needs_values``: it failed only because fake tensors have no values (a data-dependent
    shape or a value read on the meta device); a real step may succeed."""

    needs_values = False


def _needs_values(failure: BaseException) -> bool:
    from torch._subclasses.fake_tensor import (
        DataDependentOutputException,
        DynamicOutputShapeException,
        UnsupportedOperatorException,
    )

    seen: BaseException | None = failure
    while seen is not None:
        if isinstance(seen, (DataDependentOutputException, DynamicOutputShapeException, UnsupportedOperatorException)):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


@dataclass
class TrainingRow:
    """One module: what its forward saved for backward, and its FLOPs both ways (inclusive of
    submodules, like the summary's MACs)."""

    name: str
    type: str
    depth: int
    parameters: int
    saved_activation_bytes: int
    forward_flops: int
    backward_flops: int


@dataclass
class TrainingStepReport:
    """One training step, measured. Bytes are bytes; FLOPs = 2 x MACs of matmul, linear,
    convolution and attention (elementwise ops are not counted)."""

    model: str
    device: str  # where the step ran: meta (fake tensors) or a real device
    target: str  # the device whose behaviour was modelled (allocator rounding, optimizer kernels)
    dtype: str  # parameters' dtype
    amp: str | None  # autocast dtype, None without autocast
    optimizer: str
    inputs: Any
    peak_bytes: int
    peak_phase: str
    at_peak: dict[str, int]  # bytes live at the peak, by part (sums to peak_bytes)
    at_start_bytes: int  # live before the step: parameters, buffers, optimizer state, inputs
    step_growth_bytes: int  # peak_bytes - at_start_bytes: what the step itself adds
    forward_flops: int
    backward_flops: int
    rows: list[TrainingRow]
    seconds: float
    measured: dict[str, Any] | None = None  # the device's own counters, for a real CUDA step
    notes: list[str] = field(default_factory=list)

    @property
    def forward_macs(self) -> int:
        return self.forward_flops // 2

    @property
    def backward_macs(self) -> int:
        return self.backward_flops // 2

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["forward_macs"] = self.forward_macs
        data["backward_macs"] = self.backward_macs
        return data


# --------------------------------------------------------------------------- the ledger


class _Storage:
    __slots__ = ("born", "died", "nbytes", "part")

    def __init__(self, nbytes: int, born: int, part: str):
        self.nbytes = nbytes
        self.born = born
        self.died: int | None = None
        self.part = part


class _Ledger:
    """Every storage the step touches, when it was born and died, and what it is. The clock
    ticks once per birth and once per death, so "live at the peak" has one exact answer.

    The peak is found while running (a running total per op); which parts made it up is
    decided afterwards from each storage's final classification.
    """

    # A storage keeps the part it was first given over these later guesses, in this order.
    _RANK = {part: rank for rank, part in enumerate(PARTS)}

    def __init__(self, round_to: int = 1, device_type: str | None = None):
        self.round_to = round_to
        self.device_type = device_type  # on a real CUDA step, host tensors take no device memory
        self.entries: list[_Storage] = []
        self.serial: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
        self.tick = 0
        self.live = 0
        self.peak = 0
        self.peak_tick = 0
        self.phase = "start"
        self.peak_phase = "start"

    def _size(self, storage: Any, nbytes: int | None = None) -> int:
        nbytes = int(storage.nbytes()) if nbytes is None else nbytes
        if self.round_to > 1 and nbytes:
            nbytes = -(-nbytes // self.round_to) * self.round_to
        return nbytes

    def add(
        self, tensor: Any, part: str = "temporaries", *, on_host: bool = False, nbytes: int | None = None
    ) -> int | None:
        """Record ``tensor``'s storage (once); return its serial. A better-ranked part wins.
        ``on_host``: a tensor the modelled step keeps in host memory (it counts 0 bytes);
        ``nbytes``: the size the real kernel would allocate, where a fake kernel differs."""
        import torch

        if not isinstance(tensor, torch.Tensor) or tensor.is_sparse:
            return None
        storage = tensor.untyped_storage()
        serial = self.serial.get(storage)
        if serial is not None:
            entry = self.entries[serial]
            if self._RANK[part] < self._RANK[entry.part]:
                entry.part = part
            return serial
        serial = len(self.entries)
        self.tick += 1
        on_host = on_host or (self.device_type is not None and tensor.device.type != self.device_type)
        entry = _Storage(0 if on_host else self._size(storage, nbytes), self.tick, part)
        self.entries.append(entry)
        self.serial[storage] = serial
        weakref.finalize(storage, self._free, serial)
        self.live += entry.nbytes
        self._check_peak()
        return serial

    def _free(self, serial: int) -> None:
        entry = self.entries[serial]
        if entry.died is None:
            self.tick += 1
            entry.died = self.tick
            self.live -= entry.nbytes

    def _check_peak(self) -> None:
        if self.live > self.peak:
            self.peak = self.live
            self.peak_tick = self.tick
            self.peak_phase = self.phase

    def live_at(self, tick: int) -> list[_Storage]:
        return [e for e in self.entries if e.born <= tick and (e.died is None or e.died > tick)]

    def parts_at(self, tick: int) -> dict[str, int]:
        parts = dict.fromkeys(PARTS, 0)
        for entry in self.live_at(tick):
            parts[entry.part] += entry.nbytes
        return parts


def _dispatch_mode(ledger: _Ledger, fake_target: str | None = None) -> Any:
    """A dispatch mode that records the outputs of every op (storages freed are noticed by
    their finalizers). ``fake_target``: the tensors are fake, modelling this device."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    batch_norms = {
        torch.ops.aten.native_batch_norm.default,
        torch.ops.aten._native_batch_norm_legit.default,
        torch.ops.aten._batch_norm_with_update.default,
    }
    low_precision = (torch.float16, torch.bfloat16)

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            result = func(*args, **(kwargs or {}))
            if fake_target is not None and func in batch_norms and args[0].dtype in low_precision:
                _batch_norm_statistics(ledger, result, args[1], fake_target)
            for leaf in tree_leaves(result):
                if isinstance(leaf, torch.Tensor):
                    ledger.add(leaf)
            return result

    return Recorder()


def _batch_norm_statistics(ledger: _Ledger, result: Any, weight: Any, target: str) -> None:
    """torch's fake batch norm gives the saved mean and inverse std of a 16-bit input the
    input's dtype. The real kernels keep them in float32 on CUDA, and on the CPU in the
    weight's dtype (float32 under autocast)."""
    import torch

    wide = torch.float32 if target == "cuda" or weight is None else weight.dtype
    for statistic in result[1:3]:
        if statistic.dtype != wide and statistic.numel():
            ledger.add(statistic, nbytes=statistic.numel() * wide.itemsize)


# --------------------------------------------------------------------------- pieces of a step


def default_loss(output: Any) -> Any:
    """Cross-entropy on the first floating tensor of the output (classes in the last dimension
    for 1-, 2- and 3-D outputs: classifiers and language models; in dimension 1 for 4-D and
    more: segmentation), plus the sum of every other floating tensor (auxiliary heads), so that
    backward reaches all of them. Targets are zeros: values do not change the cost."""
    import torch

    tensors = [t for t in _tensors(output) if t.is_floating_point()]
    if not tensors:
        raise TrainingStepError(
            "the model's output holds no floating tensor to compute a loss from", "pass a loss function"
        )
    first, *rest = tensors
    if first.dim() == 0:
        loss = first.float()
    elif first.dim() <= 3:
        logits = first.reshape(-1, first.shape[-1])
        target = torch.zeros(logits.shape[0], dtype=torch.long, device=first.device)
        loss = torch.nn.functional.cross_entropy(logits, target)
    else:
        target = torch.zeros((first.shape[0], *first.shape[2:]), dtype=torch.long, device=first.device)
        loss = torch.nn.functional.cross_entropy(first, target)
    for other in rest:
        loss = loss + other.float().sum()
    return loss


def _tensors(value: Any) -> Iterator[Any]:
    import torch

    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
    elif hasattr(value, "__dataclass_fields__") or hasattr(value, "to_tuple"):  # ModelOutput-like
        for item in vars(value).values():
            yield from _tensors(item)


def make_optimizer(name: str, parameters: list[Any], *, foreach: bool | None) -> Any:
    """The optimizer a training recipe would use: AdamW/Adam with torch's defaults, SGD with
    momentum 0.9 (one state tensor per parameter, as recipes use it)."""
    import torch

    if name == "adamw":
        return torch.optim.AdamW(parameters, foreach=foreach)
    if name == "adam":
        return torch.optim.Adam(parameters, foreach=foreach)
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=0.01, momentum=SGD_MOMENTUM, foreach=foreach)
    raise BadInputError(f"unknown optimizer {name!r}; choose one of: {', '.join(OPTIMIZERS)}")


def _extra_flop_formulas() -> dict[Any, Any]:
    """torch's counter, completed and corrected for the backward pass:

    - the summary's CPU attention formulas, plus the CPU flash-attention backward, which
      torch's counter would count as zero;
    - convolution backward: each of grad_input and grad_weight takes exactly the forward's
      multiply-accumulates (every product x * w of the forward has one g * w and one x * g).
      torch's formula for grad_weight ignores ``groups``, so it counts a depthwise
      convolution's weight gradient ``groups`` times over.
    """
    import torch
    from torch.utils.flop_counter import conv_flop_count, sdpa_backward_flop_count

    from ptools.core.summary import _extra_flop_formulas as forward_formulas

    def convolution_backward(
        grad_out_shape: Any,
        x_shape: Any,
        w_shape: Any,
        _bias: Any,
        _stride: Any,
        _padding: Any,
        _dilation: Any,
        transposed: bool,
        _output_padding: Any,
        _groups: Any,
        output_mask: Any,
        **kwargs: Any,
    ) -> int:
        forward = conv_flop_count(list(x_shape), list(w_shape), list(grad_out_shape), transposed)
        return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))

    formulas = dict(forward_formulas())
    formulas[torch.ops.aten.convolution_backward] = convolution_backward
    kernel = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if kernel is not None:

        def cpu_flash_attention_backward(
            grad_out_shape: Any, query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any
        ) -> int:
            return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)

        formulas[kernel] = cpu_flash_attention_backward
    return formulas


class _Fake:
    """Fake copies of a model's tensors and of the inputs, on the CPU device of FakeTensorMode."""

    def __init__(self) -> None:
        from torch._subclasses.fake_tensor import FakeTensorMode

        self.mode = FakeTensorMode(allow_non_fake_inputs=False)

    def like(self, tensor: Any, dtype: Any = None) -> Any:
        import torch

        with self.mode:
            return torch.empty_strided(
                tuple(tensor.shape), tuple(tensor.stride()), dtype=dtype or tensor.dtype, device="cpu"
            )


def _convert_inputs(value: Any, convert: Callable[[Any], Any]) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        return convert(value)
    if isinstance(value, dict):
        return {k: _convert_inputs(v, convert) for k, v in value.items()}
    if isinstance(value, list):
        return [_convert_inputs(v, convert) for v in value]
    if isinstance(value, tuple):
        return tuple(_convert_inputs(v, convert) for v in value)
    return value


def _module_tracker(model: Any, names: dict[Any, str]) -> tuple[list[str], list[Any]]:
    """A stack of the modules whose forward is running (hooks; the caller removes them)."""
    stack: list[str] = []

    def enter(module: Any, _inputs: Any) -> None:
        stack.append(names[module])

    def leave(module: Any, _inputs: Any, _output: Any) -> None:
        if stack and stack[-1] == names[module]:
            stack.pop()

    handles = []
    for module in model.modules():
        if module in names:
            handles.append(module.register_forward_pre_hook(enter))
            handles.append(module.register_forward_hook(leave, always_call=True))
    return stack, handles


# --------------------------------------------------------------------------- the step


def estimate_training_step(
    model: Any,
    args: list[Any],
    kwargs: dict[str, Any] | None = None,
    *,
    optimizer: Optimizer = "adamw",
    dtype: Any = None,
    amp: Any = None,
    device: str = "meta",
    target: Target | None = None,
    loss: Callable[[Any], Any] | None = None,
    name: str | None = None,
    restore: bool = True,
) -> TrainingStepReport:
    """Memory and FLOPs of one training step of ``model(*args, **kwargs)``.

    Args:
        optimizer: ``adamw``, ``adam`` (torch defaults) or ``sgd`` (momentum 0.9).
        dtype: the parameters' (and floating inputs') dtype; default: as they are.
        amp: an autocast dtype (``torch.bfloat16``/``torch.float16``): the forward pass and the
            loss run under ``torch.autocast``; parameters keep ``dtype``.
        device: ``meta``: trace with fake tensors (no memory, any size); ``cpu`` or ``cuda``:
            run the step for real on the model's own device (after one warm-up step).
        target: the device a meta trace models: ``cuda`` (default for meta: the allocator's
            512-byte rounding, the foreach optimizer kernels torch picks there) or ``cpu``.
            Autocast on meta follows the CPU autocast policy (see README).
        loss: ``output -> scalar``; default :func:`default_loss`.
        restore: for a real step, put the weights, buffers and modes back afterwards (a copy
            of the parameters and buffers is held in host memory meanwhile).

    Raises:
        TrainingStepError: the forward, loss, backward or optimizer step failed.
    """
    import torch

    if optimizer not in OPTIMIZERS:
        raise BadInputError(f"unknown optimizer {optimizer!r}; choose one of: {', '.join(OPTIMIZERS)}")
    if device not in ("meta", "cpu") and not device.startswith("cuda"):
        raise BadInputError(f"unknown device {device!r}; choose meta, cpu or cuda")
    kwargs = kwargs or {}
    real = device != "meta"
    target = target or ("cpu" if device == "cpu" else "cuda")
    first = next(iter(model.parameters()), None)
    if first is None:
        raise TrainingStepError("the model has no parameters: a training step would change nothing")
    param_dtype = dtype or first.dtype
    notes: list[str] = []
    if real:
        return _real_step(
            model, args, kwargs, optimizer, param_dtype, amp, device, loss or default_loss, name, restore, notes
        )

    fake = _Fake()
    names = {module: module_name for module_name, module in model.named_modules()}
    tensors: dict[str, Any] = {}
    for key, parameter in model.named_parameters():
        wanted = param_dtype if parameter.is_floating_point() else None
        tensors[key] = torch.nn.Parameter(fake.like(parameter, wanted), requires_grad=parameter.requires_grad)
    for key, buffer in model.named_buffers():
        wanted = param_dtype if buffer.is_floating_point() and dtype is not None else None
        tensors[key] = fake.like(buffer, wanted)

    def fake_input(tensor: Any) -> Any:
        wanted = param_dtype if tensor.is_floating_point() and amp is None and dtype is not None else None
        return fake.like(tensor, wanted)

    fake_args = _convert_inputs(list(args), fake_input)
    fake_kwargs = _convert_inputs(dict(kwargs), fake_input)
    parameters = [t for t in tensors.values() if isinstance(t, torch.nn.Parameter) and t.requires_grad]

    def forward() -> Any:
        return torch.func.functional_call(model, tensors, tuple(fake_args), fake_kwargs)

    started = time.perf_counter()
    modes = {module: module.training for module in model.modules()}
    try:
        with fake.mode:
            opt = make_optimizer(optimizer, parameters, foreach=target == "cuda")
            _create_state(opt, parameters)
            ledger = _ledger_at_start(
                _Ledger(CUDA_BLOCK if target == "cuda" else 1),
                [t for t in tensors.values() if isinstance(t, torch.nn.Parameter)],
                [t for t in tensors.values() if not isinstance(t, torch.nn.Parameter)],
                [fake_args, fake_kwargs],
                opt,
                host_steps=target == "cuda",
            )
            result = _traced_step(
                model,
                names,
                forward,
                opt,
                ledger,
                amp,
                "cpu",
                loss or default_loss,
                host_steps=target == "cuda",
                fake_target=target,
            )
    finally:
        restore_state(model, modes, {})
    seconds = time.perf_counter() - started
    if amp is not None:
        notes.append(
            "autocast on the meta device follows the CPU autocast policy; CUDA's also keeps "
            "layer_norm, softmax and losses in float32 (see README)"
        )
    return _report(
        model, name, "meta", target, param_dtype, amp, optimizer, args, kwargs, ledger, result, seconds, notes
    )


def _create_state(opt: Any, parameters: list[Any]) -> None:
    """Make the optimizer state exist, as after a first step, without a forward pass."""
    import torch

    for parameter in parameters:
        parameter.grad = torch.zeros_like(parameter)
    opt.step()
    opt.zero_grad(set_to_none=True)


def _ledger_at_start(
    ledger: _Ledger, parameters: list[Any], buffers: list[Any], inputs: Any, opt: Any, *, host_steps: bool = False
) -> _Ledger:
    """``ledger`` holding what lives before the step: parameters, buffers, the batch, and the
    optimizer state."""
    for value in parameters:
        ledger.add(value, "parameters")
    for value in buffers:
        ledger.add(value, "buffers")
    for value in _tensors(inputs):
        ledger.add(value, "inputs")
    _mark_state(ledger, opt, host_steps=host_steps)
    return ledger


def _mark_state(ledger: _Ledger, opt: Any, *, host_steps: bool = False) -> None:
    """Classify the optimizer's state. ``host_steps``: the modelled device keeps the step
    counters on the host (CUDA, unless the optimizer is capturable)."""
    for group in opt.param_groups:
        capturable = group.get("capturable", False)
        for parameter in group["params"]:
            for key, value in opt.state.get(parameter, {}).items():
                on_host = host_steps and key == "step" and not capturable and getattr(value, "dim", lambda: 1)() == 0
                ledger.add(value, "optimizer_state", on_host=on_host)


@dataclass
class _StepResult:
    forward_counts: dict[str, int]
    backward_counts: dict[str, int]
    saved: dict[str, int]
    at_start: int


def _traced_step(
    model: Any,
    names: dict[Any, str],
    forward: Callable[[], Any],
    opt: Any,
    ledger: _Ledger,
    amp: Any,
    autocast_device: str,
    loss_fn: Callable[[Any], Any],
    *,
    host_steps: bool = False,
    fake_target: str | None = None,
) -> _StepResult:
    """forward + loss + backward + step under the ledger and a FLOP counter."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False, depth=None, custom_mapping=_extra_flop_formulas())  # type: ignore[arg-type]
    saved: dict[str, int] = {}
    stack, handles = _module_tracker(model, names)
    counted: set[int] = set()

    def pack(tensor: Any) -> Any:
        serial = ledger.add(tensor, "activations")
        if serial is not None and serial not in counted and ledger.entries[serial].part == "activations":
            counted.add(serial)
            for module_name in {*stack}:
                saved[module_name] = saved.get(module_name, 0) + ledger.entries[serial].nbytes
        return tensor

    autocast = torch.autocast(autocast_device, dtype=amp) if amp is not None else contextlib.nullcontext()
    at_start = ledger.live
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # the fused path is opaque to the counter
    model.train()
    try:
        with counter, _dispatch_mode(ledger, fake_target):
            ledger.phase = "forward"
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), autocast:
                output = forward()
                ledger.phase = "loss"
                loss = loss_fn(output)
            forward_counts = _flops_by_module(counter)
            if not (isinstance(loss, torch.Tensor) and loss.numel() == 1 and loss.requires_grad):
                raise TrainingStepError(
                    "the loss is not a scalar that requires grad", "check the loss function and the model's output"
                )
            del output
            ledger.phase = "backward"
            loss.backward()
            del loss
            for group in opt.param_groups:
                for parameter in group["params"]:
                    if parameter.grad is not None:
                        ledger.add(parameter.grad, "gradients")
            ledger.phase = "optimizer"
            opt.step()
            _mark_state(ledger, opt, host_steps=host_steps)
            opt.zero_grad(set_to_none=True)
        backward_counts = _flops_by_module(counter)
    except TrainingStepError:
        raise
    except Exception as failure:
        needs_values = fake_target is not None and _needs_values(failure)
        error = TrainingStepError(
            f"the training step failed in its {ledger.phase} phase: {type(failure).__name__}: {str(failure)[:300]}",
            "the model needs values (data-dependent shapes), which the meta device has not: run it with `device` cpu"
            if needs_values
            else "check the inputs and the loss",
        )
        error.needs_values = needs_values
        raise error from failure
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for handle in handles:
            handle.remove()
    backward = {key: backward_counts.get(key, 0) - forward_counts.get(key, 0) for key in backward_counts}
    return _StepResult(forward_counts, backward, saved, at_start)


def _flops_by_module(counter: Any) -> dict[str, int]:
    return {key: int(sum(ops.values())) for key, ops in counter.get_flop_counts().items()}


def _report(
    model: Any,
    name: str | None,
    device: str,
    target: str,
    param_dtype: Any,
    amp: Any,
    optimizer: str,
    args: list[Any],
    kwargs: dict[str, Any],
    ledger: _Ledger,
    result: _StepResult,
    seconds: float,
    notes: list[str],
    measured: dict[str, Any] | None = None,
) -> TrainingStepReport:
    from ptools.core.models import module_type
    from ptools.core.summary import describe

    root = type(model).__name__
    rows = []
    for module_name, module in model.named_modules():
        key = f"{root}.{module_name}" if module_name else root
        rows.append(
            TrainingRow(
                name=module_name,
                type=module_type(model, module_name, module),
                depth=module_name.count(".") + 1 if module_name else 0,
                parameters=sum(p.numel() for p in module.parameters()),
                saved_activation_bytes=result.saved.get(module_name, 0),
                forward_flops=result.forward_counts.get(key, 0),
                backward_flops=result.backward_counts.get(key, 0),
            )
        )
    at_peak = ledger.parts_at(ledger.peak_tick)
    return TrainingStepReport(
        model=name or root,
        device=device,
        target=target,
        dtype=str(param_dtype).removeprefix("torch."),
        amp=None if amp is None else str(amp).removeprefix("torch."),
        optimizer=optimizer,
        inputs=describe([args, kwargs]),
        peak_bytes=ledger.peak,
        peak_phase=ledger.peak_phase,
        at_peak=at_peak,
        at_start_bytes=result.at_start,
        step_growth_bytes=ledger.peak - result.at_start,
        forward_flops=result.forward_counts.get("Global", 0),
        backward_flops=result.backward_counts.get("Global", 0),
        rows=rows,
        seconds=seconds,
        measured=measured,
        notes=notes,
    )


def _real_step(
    model: Any,
    args: list[Any],
    kwargs: dict[str, Any],
    optimizer: str,
    param_dtype: Any,
    amp: Any,
    device: str,
    loss_fn: Callable[[Any], Any],
    name: str | None,
    restore: bool,
    notes: list[str],
) -> TrainingStepReport:
    """A warm-up step, then the measured one, on the model's own device."""
    import torch

    first = next(iter(model.parameters()))
    if first.device.type != torch.device(device).type:
        raise BadInputError(f"the model is on {first.device}, not {device}: move it first, or trace on meta")
    if param_dtype != first.dtype:
        raise BadInputError(f"the model is in {first.dtype}, not {param_dtype}: cast it first, or trace on meta")
    names = {module: module_name for module_name, module in model.named_modules()}
    saved_state = (
        {key: value.detach().to("cpu", copy=True) for key, value in model.state_dict(keep_vars=True).items()}
        if restore
        else {}
    )
    modes = {module: module.training for module in model.modules()}
    parameters = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(optimizer, parameters, foreach=None)
    autocast_device = first.device.type
    cuda = first.device.type == "cuda"

    def forward() -> Any:
        return model(*args, **kwargs)

    try:
        # The warm-up step: optimizer state, kernels' caches and workspaces exist afterwards.
        model.train()
        autocast = torch.autocast(autocast_device, dtype=amp) if amp is not None else contextlib.nullcontext()
        try:
            with autocast:
                warm_loss = loss_fn(forward())
            warm_loss.backward()
            opt.step()
        except Exception as failure:
            raise TrainingStepError(
                f"the training step failed: {type(failure).__name__}: {str(failure)[:300]}",
                "check the inputs and the loss",
            ) from failure
        del warm_loss
        opt.zero_grad(set_to_none=True)
        ledger = _ledger_at_start(
            _Ledger(CUDA_BLOCK if cuda else 1, device_type=first.device.type),
            list(model.parameters()),
            list(model.buffers()),
            [args, kwargs],
            opt,
        )
        if cuda:
            torch.cuda.synchronize(first.device)
            torch.cuda.reset_peak_memory_stats(first.device)
            allocated_before = torch.cuda.memory_allocated(first.device)
        started = time.perf_counter()
        result = _traced_step(model, names, forward, opt, ledger, amp, autocast_device, loss_fn)
        measured = None
        if cuda:
            torch.cuda.synchronize(first.device)
            measured = {
                "max_memory_allocated": torch.cuda.max_memory_allocated(first.device),
                "memory_allocated_before": allocated_before,
            }
        seconds = time.perf_counter() - started
    finally:
        restore_state(model, modes, saved_state)
    notes.append("a real step, measured after one warm-up step (the step ran under the ledger, so it was slower)")
    return _report(
        model,
        name,
        device,
        first.device.type,
        param_dtype,
        amp,
        optimizer,
        args,
        kwargs,
        ledger,
        result,
        seconds,
        notes,
        measured,
    )


# --------------------------------------------------------------------------- sweeps and fits


def fit_batch_size(peak_at: Callable[[int], int], budget: int, *, limit: int = FIT_LIMIT) -> tuple[int, dict[int, int]]:
    """The largest batch size whose peak fits ``budget`` bytes, and every peak measured.

    Memory grows about linearly with the batch once activations dominate, so each probe is
    the batch where a line meets the budget (a secant step: through the ends of the bracket
    known so far, or while no batch has failed, through the two largest measured), and a
    probe the line lands on is confirmed at once by its successor; after two steps in a row
    that did not halve the bracket, a bisection step. The answer holds for any growth that is
    monotonic in the batch, in a number of probes logarithmic in the answer (while no batch
    has failed yet, each probe at least doubles). 0 when batch 1 does not fit; ``limit`` when
    that fits.
    """
    peaks: dict[int, int] = {}

    def fits(batch: int) -> bool:
        if batch not in peaks:
            peaks[batch] = peak_at(batch)
        return peaks[batch] <= budget

    if not fits(1):
        return 0, peaks
    low, high = 1, None  # low fits; high (when known) does not
    slow_steps = 0  # steps in a row that did not halve the bracket
    while (high is None and low < limit) or (high is not None and high - low > 1):
        predicted = False  # the probe is where the line says the answer is
        if high is not None and slow_steps >= 2:
            probe = (low + high) // 2
        else:
            # The line through the bracket's ends, or while nothing has failed, through the
            # two largest batches measured (both fit).
            a, b = (low, high) if high is not None else (sorted(peaks)[-2:] if len(peaks) > 1 else (low, low))
            probe = 2 * low
            slope = (peaks[b] - peaks[a]) / (b - a) if b > a else 0.0
            if slope > 0:
                probe, predicted = a + int((budget - peaks[a]) // slope), True
            if high is None and len(peaks) > 2 and probe < 2 * low:
                probe, predicted = 2 * low, False  # the line fell short before: at least double
        ceiling = high - 1 if high is not None else limit
        if not low < probe <= ceiling:
            probe, predicted = max(low + 1, min(probe, ceiling)), False
        width = None if high is None else high - low
        if fits(probe):
            low = probe
            if predicted and low < limit and (high is None or high > low + 1):  # confirm a landing at once
                if fits(low + 1):
                    low += 1
                else:
                    high = low + 1
        else:
            high = probe
        slow = width is not None and high is not None and (high - low) * 2 > width
        slow_steps = slow_steps + 1 if slow else 0
    return low, peaks


def parse_fit(text: str) -> int | None:
    """``--fit``: a memory budget in bytes (``24GiB``), or None for ``auto``."""
    from ptools.core.units import parse_size

    if text.strip().lower() == "auto":
        return None
    budget = parse_size(text)
    if budget <= 0:
        raise BadInputError(f"`fit` {text!r} must be a size above zero, like 24GiB")
    return budget


def parse_sweep(text: str) -> tuple[str, list[Any]]:
    """``batch=1,8,32`` -> ("batch", [1, 8, 32]); ``input=3x224x224,3x384x384`` -> input sizes."""
    from ptools.core.summary import parse_input_size

    what, sep, values_text = text.partition("=")
    what = what.strip()
    if not sep or what not in ("batch", "input"):
        raise BadInputError(f"`sweep` {text!r} is not batch=N,N,... or input=CxHxW,CxHxW,...", "e.g. batch=1,8,32,128")
    parts = [part.strip() for part in values_text.split(",") if part.strip()]
    if not parts:
        raise BadInputError(f"`sweep` {text!r} lists no values")
    if len(parts) > 64:
        raise BadInputError(f"`sweep` lists {len(parts)} points; give 64 or fewer")
    if what == "input":
        return what, [parse_input_size(part) for part in parts]
    batches = []
    for part in parts:
        if not part.isdigit() or not 0 < int(part) <= FIT_LIMIT:
            raise BadInputError(f"`sweep` batch {part!r} must be a whole number from 1 to {FIT_LIMIT}")
        batches.append(int(part))
    return what, batches
