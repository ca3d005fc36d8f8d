"""``ptools summary --train``: what one training step costs, swept over batch or input sizes,
and the largest batch that fits a memory budget."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ptools.cli import output
from ptools.core.units import format_bytes
from ptools.errors import BadInputError, RequirementNotMetError


@dataclass
class TrainRequest:
    model_spec: str
    factory_kwargs: dict[str, Any]
    device: str
    sizes: list[tuple[int, ...]]
    batch_size: int
    input_spec: str | None
    dtype: str
    optimizer: str
    amp: bool
    target: str | None
    sweep: str | None
    fit: str | None
    weights: str | None
    strict: bool
    trust: bool


class _Stepper:
    """The model, built once, and one estimate per (batch, input sizes)."""

    def __init__(self, request: TrainRequest, device: str):
        import torch

        from ptools.core import models
        from ptools.core import summary as core

        self.request = request
        self.device = core.model_device(device)
        self.meta = self.device == "meta"
        dtype = core.torch_dtype(request.dtype)
        # --amp: autocast to a 16-bit --dtype (bf16 unless fp16 is asked for); weights stay float32.
        self.amp = None
        if request.amp:
            self.amp = dtype if dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
            dtype = torch.float32
        self.dtype = dtype
        model = models.load_model(
            request.model_spec, request.factory_kwargs, trust=request.trust, device="meta" if self.meta else None
        )
        self.weights = (
            models.load_weights(model, request.weights, strict=request.strict, trust=request.trust)
            if request.weights
            else None
        )
        if not self.meta:
            model = model.to(device=self.device, dtype=dtype)  # ptools made this model: it may move it
        self.model = model
        self.input_note: str | None = None

    def inputs(
        self, batch: int, sizes: list[tuple[int, ...]], spec_batch: int | None
    ) -> tuple[list[Any], dict[str, Any]]:
        import torch

        from ptools.cli.summary import _default_inputs
        from ptools.core.summary import make_inputs

        device = torch.device(self.device)
        floats = torch.float32 if self.meta or self.amp is not None else self.dtype
        try:
            if not sizes and self.request.input_spec is None:
                args, kwargs, where = _default_inputs(self.request.model_spec, self.model, batch, device, floats)
                self.input_note = where
                return args, kwargs
            return make_inputs(sizes, batch, self.request.input_spec, device, floats, spec_batch=spec_batch)
        except RuntimeError as failure:  # e.g. the allocator refusing a batch too large for this machine
            raise BadInputError(
                f"cannot make the inputs for batch {batch} on {self.device}: {str(failure).splitlines()[0][:200]}",
                "use a smaller batch or input size, or trace on the meta device",
            ) from None

    def estimate(self, batch: int, sizes: list[tuple[int, ...]], spec_batch: int | None = None) -> Any:
        from ptools.core.training import estimate_training_step

        args, kwargs = self.inputs(batch, sizes, spec_batch)
        return estimate_training_step(
            self.model,
            args,
            kwargs,
            optimizer=self.request.optimizer,  # type: ignore[arg-type]
            dtype=self.dtype,
            amp=self.amp,
            device=self.device,
            target=self.request.target if self.meta else None,  # type: ignore[arg-type]
            name=self.request.model_spec,
            restore=False,  # ptools built this model for the estimate alone
        )


def run(request: TrainRequest, depth: int, json_output: bool) -> None:
    from ptools.core import models
    from ptools.core.summary import ForwardPassError
    from ptools.core.training import TrainingStepError

    device = request.device
    if request.target is not None and device not in ("auto", "meta"):
        raise BadInputError("--target names the device a meta trace models; a real step runs on --device itself")
    if request.fit is not None and device not in ("auto", "meta"):
        raise BadInputError("--fit bisects on the meta device: leave --device out or give --device meta")
    chosen = device
    if device == "auto":
        real = request.weights is not None or not models.is_library_model(request.model_spec)
        chosen = "cpu" if real and request.fit is None else "meta"
    try:
        data = _measure(request, chosen)
    except (TrainingStepError, ForwardPassError) as failure:
        fallback = isinstance(failure, ForwardPassError) or getattr(failure, "needs_values", False)
        if not (device == "auto" and chosen == "meta" and request.fit is None and fallback):
            raise
        from ptools.cli.summary import META_FALLBACK_NOTE

        data = _measure(request, "cpu")  # fails too: the model's own error, without the note
        output.info(META_FALLBACK_NOTE)
    output.emit(data, json_output, lambda shown: render(shown, depth))
    if not json_output:
        for note in data["step"]["notes"]:
            output.info(f"note: {note}")


def _measure(request: TrainRequest, device: str) -> dict[str, Any]:
    from ptools.core.training import TrainingStepError, fit_batch_size, parse_fit, parse_sweep

    stepper = _Stepper(request, device)
    spec_batch = request.batch_size if request.input_spec is not None and request.batch_size != 1 else None
    step = stepper.estimate(request.batch_size, request.sizes, spec_batch)
    if stepper.input_note:
        output.info(f"input: {stepper.input_note} (--input-size or --input-spec to choose another)")
    data: dict[str, Any] = {"step": step.to_dict(), "sweep": None, "fit": None}
    if stepper.weights is not None:
        data["weights"] = stepper.weights.to_dict()
    if request.sweep is not None:
        what, points = parse_sweep(request.sweep)
        rows = []
        if what == "input" and request.input_spec is not None:
            raise BadInputError("--sweep input=… replaces --input-size; with --input-spec, sweep batch=…")
        for point in output.progress(points, len(points), "sweep"):
            try:
                if what == "batch":
                    report = stepper.estimate(point, request.sizes, point if request.input_spec is not None else None)
                else:
                    report = stepper.estimate(request.batch_size, [point, *request.sizes[1:]], spec_batch)
            except TrainingStepError as failure:
                shown = point if what == "batch" else "x".join(map(str, point))
                raise TrainingStepError(f"sweep {what} {shown}: {failure.message}", failure.hint) from failure
            rows.append(_sweep_row(what, point, report))
        data["sweep"] = rows
    if request.fit is not None:
        budget = parse_fit(request.fit)
        where = None
        if budget is None:
            budget, where = _free_gpu_memory()
        batch, peaks = fit_batch_size(
            lambda b: int(stepper.estimate(b, request.sizes, b if request.input_spec is not None else None).peak_bytes),
            budget,
        )
        data["fit"] = {
            "budget_bytes": budget,
            "budget_from": where or "--fit",
            "batch_size": batch,
            "peak_bytes": peaks.get(batch),
            "next_peak_bytes": peaks.get(batch + 1),
            "points": [{"batch_size": b, "peak_bytes": p} for b, p in sorted(peaks.items())],
        }
    return data


def _sweep_row(what: str, point: Any, report: Any) -> dict[str, Any]:
    return {
        what if what == "batch" else "input_size": point if what == "batch" else list(point),
        "peak_bytes": report.peak_bytes,
        "peak_phase": report.peak_phase,
        "step_growth_bytes": report.step_growth_bytes,
        "activations_bytes": report.at_peak["activations"],
        "forward_flops": report.forward_flops,
        "backward_flops": report.backward_flops,
        "seconds": report.seconds,
    }


def _free_gpu_memory() -> tuple[int, str]:
    """The free memory of the GPU ``gpu-info --select 1`` would pick, and which it is."""
    from ptools.core import gpu

    report = gpu.query_devices(use_torch=False)
    try:
        chosen = gpu.select_devices(report, 1)[0]
    except RequirementNotMetError as failure:
        raise RequirementNotMetError(f"--fit auto: {failure}", "give a size instead, e.g. --fit 24GiB") from None
    if chosen.memory_free_bytes is None:
        raise RequirementNotMetError(
            f"--fit auto: the free memory of GPU {chosen.cuda_index} is unknown", "give a size, e.g. --fit 24GiB"
        )
    name = f"GPU {chosen.cuda_index} ({chosen.name}, {chosen.uuid}): {format_bytes(chosen.memory_free_bytes)} free"
    return chosen.memory_free_bytes, name


def render(data: dict[str, Any], depth: int) -> list[Any]:
    """Rich renderables for a training step (the same data --json prints)."""
    from ptools.cli.summary import _count

    step = data["step"]
    rows = []
    for row in step["rows"]:
        if not (
            0 < row["depth"] <= depth and (row["forward_flops"] or row["saved_activation_bytes"] or row["parameters"])
        ):
            continue
        rows.append(
            (
                "  " * (row["depth"] - 1) + row["name"],
                row["type"],
                _count(row["parameters"]),
                format_bytes(row["saved_activation_bytes"]),
                _count(row["forward_flops"]),
                _count(row["backward_flops"]),
            )
        )
    amp = f", autocast {step['amp']}" if step["amp"] else ""
    where = "meta (traced)" if step["device"] == "meta" else f"{step['device']} (a real step)"
    renderables: list[Any] = [
        output.make_table(
            f"{step['model']}: one training step ({step['optimizer']}, {step['dtype']}{amp}, {where}, "
            f"modelling {step['target']})",
            [
                "Module",
                "Type",
                ("Params", "right"),
                ("Saved for backward", "right"),
                ("Fwd FLOPs", "right"),
                ("Bwd FLOPs", "right"),
            ],
            rows,
            optional=("Type",),
        )
    ]
    parts = step["at_peak"]
    totals = [(part.replace("_", " "), format_bytes(parts[part])) for part in parts]
    totals += [
        (
            "peak",
            f"{format_bytes(step['peak_bytes'])} ({step['peak_bytes']:,} bytes), in the {step['peak_phase']} phase",
        ),
        ("live before the step", format_bytes(step["at_start_bytes"])),
        ("the step adds", format_bytes(step["step_growth_bytes"])),
        ("forward FLOPs", f"{step['forward_flops']:,} ({step['forward_flops'] / 1e9:.3f} G)"),
        ("backward FLOPs", f"{step['backward_flops']:,} ({step['backward_flops'] / 1e9:.3f} G)"),
    ]
    if step["measured"]:
        totals.append(("torch.cuda.max_memory_allocated", format_bytes(step["measured"]["max_memory_allocated"])))
    renderables.append(
        output.make_table("Memory at the peak, by part (KiB, MiB, GiB = 2^10, 2^20, 2^30 bytes)", ["", "value"], totals)
    )
    if data["sweep"]:
        first = data["sweep"][0]
        label = "batch" if "batch" in first else "input_size"
        renderables.append(
            output.make_table(
                "Sweep",
                [
                    label.replace("_", " "),
                    ("peak", "right"),
                    "phase",
                    ("step adds", "right"),
                    ("activations", "right"),
                    ("fwd FLOPs", "right"),
                    ("bwd FLOPs", "right"),
                ],
                [
                    (
                        row[label] if label == "batch" else "x".join(map(str, row[label])),
                        format_bytes(row["peak_bytes"]),
                        row["peak_phase"],
                        format_bytes(row["step_growth_bytes"]),
                        format_bytes(row["activations_bytes"]),
                        _count(row["forward_flops"]),
                        _count(row["backward_flops"]),
                    )
                    for row in data["sweep"]
                ],
            )
        )
    fit = data["fit"]
    if fit:
        budget = f"{format_bytes(fit['budget_bytes'])} ({fit['budget_from']})"
        if fit["batch_size"] == 0:
            renderables.append(
                f"fit: not even batch 1 fits {budget}: it needs {format_bytes(fit['points'][0]['peak_bytes'])}"
            )
        else:
            after = (
                f"; batch {fit['batch_size'] + 1} needs {format_bytes(fit['next_peak_bytes'])}"
                if fit["next_peak_bytes"] is not None
                else ""
            )
            renderables.append(
                f"fit: the largest batch that fits {budget} is {fit['batch_size']} "
                f"(peak {format_bytes(fit['peak_bytes'])}{after})"
            )
    renderables += output.weights_report_lines(data.get("weights"))
    return renderables
