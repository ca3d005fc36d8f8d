"""``estimate_training_step``: the meta trace against a real CPU step, FLOPs against torch's
counter (and where it is wrong, against the arithmetic), exact memory on models small enough
to add up by hand, and the batch-size fit against a linear scan."""

from __future__ import annotations

import math
import random

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ptools.core.training import (
    TrainingStepError,
    default_loss,
    estimate_training_step,
    fit_batch_size,
    parse_fit,
    parse_sweep,
)
from ptools.errors import BadInputError


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
    )


class TinyLM(nn.Module):
    """Embedding, two transformer layers (SDPA inside), and a head tied to the embedding."""

    def __init__(self, vocab: int = 100, dim: int = 32) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        layer = nn.TransformerEncoderLayer(dim, 4, 64, batch_first=True, dropout=0.0)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(self.emb(ids)))


def lm_inputs(batch: int = 3, length: int = 16) -> list[torch.Tensor]:
    return [torch.randint(0, 100, (batch, length))]


def cnn_inputs(batch: int = 4) -> list[torch.Tensor]:
    return [torch.randn(batch, 3, 16, 16)]


CASES = [
    ("cnn", small_cnn, cnn_inputs),
    ("lm", TinyLM, lm_inputs),
]


@pytest.mark.parametrize(("label", "build", "inputs"), CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("optimizer", ["adamw", "adam", "sgd"])
@pytest.mark.parametrize("amp", [None, torch.bfloat16], ids=["fp32", "bf16-autocast"])
def test_meta_trace_equals_a_real_cpu_step(label, build, inputs, optimizer, amp) -> None:
    """The fake trace (modelling the CPU) sees exactly the storages a real CPU step allocates."""
    torch.manual_seed(0)
    model = build()
    args = inputs()
    traced = estimate_training_step(model, args, optimizer=optimizer, amp=amp, target="cpu")
    real = estimate_training_step(model, args, optimizer=optimizer, amp=amp, device="cpu")
    assert traced.device == "meta" and real.device == "cpu"
    assert traced.at_peak == real.at_peak
    assert (traced.peak_bytes, traced.peak_phase, traced.at_start_bytes) == (
        real.peak_bytes, real.peak_phase, real.at_start_bytes)
    assert (traced.forward_flops, traced.backward_flops) == (real.forward_flops, real.backward_flops)
    assert [(r.name, r.saved_activation_bytes, r.backward_flops) for r in traced.rows] == [
        (r.name, r.saved_activation_bytes, r.backward_flops) for r in real.rows]
    assert sum(traced.at_peak.values()) == traced.peak_bytes
    assert traced.step_growth_bytes == traced.peak_bytes - traced.at_start_bytes


def test_a_real_step_leaves_the_model_as_it_was() -> None:
    model = small_cnn()
    model.eval()
    model[1].train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    estimate_training_step(model, cnn_inputs(), device="cpu")
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [m.training for m in model.modules()] == [False, False, True] + [False] * 6
    assert all(p.grad is None for p in model.parameters())


def test_a_meta_trace_touches_nothing() -> None:
    model = small_cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    estimate_training_step(model, cnn_inputs())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_memory_adds_up_by_hand() -> None:
    """An MLP small enough to list every storage of its step."""
    batch, n_in, n_hidden, n_out = 16, 256, 512, 128
    model = nn.Sequential(nn.Linear(n_in, n_hidden, bias=False), nn.ReLU(), nn.Linear(n_hidden, n_out, bias=False))
    parameters = (n_in * n_hidden + n_hidden * n_out) * 4
    for optimizer, states in (("sgd", 1), ("adamw", 2)):
        report = estimate_training_step(model, [torch.randn(batch, n_in)], optimizer=optimizer, target="cpu")
        steps = 0 if optimizer == "sgd" else 2 * 4  # AdamW's step counters: one float32 scalar per parameter
        assert report.at_peak["parameters"] == parameters
        assert report.at_peak["inputs"] == batch * n_in * 4
        assert report.at_start_bytes == parameters + batch * n_in * 4 + states * parameters + steps
        rows = {row.name: row for row in report.rows}
        # ReLU saves its output (the second Linear saves the same tensor: counted once, at ReLU);
        # the first Linear saves the input and its weight, which are not activations.
        assert rows["1"].saved_activation_bytes == batch * n_hidden * 4
        assert rows["0"].saved_activation_bytes == 0
        assert rows["2"].saved_activation_bytes == 0
        # The model's total; the loss (outside the model) also saves its log-softmax output.
        assert rows[""].saved_activation_bytes == batch * n_hidden * 4
        assert report.at_peak["activations"] in (0, batch * n_hidden * 4, batch * n_hidden * 4 + batch * n_out * 4)
        assert report.forward_flops == 2 * batch * (n_in * n_hidden + n_hidden * n_out)
        # grad of both weights, and grad of the hidden activation (the input needs none)
        assert report.backward_flops == 2 * batch * (n_in * n_hidden + 2 * n_hidden * n_out)


def test_cuda_target_rounds_to_allocator_blocks_and_keeps_step_counters_on_the_host() -> None:
    model = nn.Sequential(nn.Linear(3, 5), nn.Linear(5, 2))  # every tensor is far below 512 bytes
    report = estimate_training_step(model, [torch.randn(2, 3)], optimizer="adamw")  # target cuda
    assert report.target == "cuda"
    assert report.at_peak["parameters"] == 4 * 512  # four tensors, one block each
    assert report.at_start_bytes == (4 + 8 + 1) * 512  # parameters, exp_avg(_sq), input; no step counters
    assert all(value % 512 == 0 for value in report.at_peak.values())


def test_backward_flops_equal_torchs_counter_around_backward() -> None:
    """The issue's oracle: FlopCounterMode wrapped around loss.backward() on a real step."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    x = torch.randn(2, 3, 64, 64)
    report = estimate_training_step(model, [x])
    model.train()
    loss = default_loss(model(x))
    with FlopCounterMode(display=False) as counter:
        loss.backward()
    assert report.backward_flops == counter.get_total_flops() > 0
    with FlopCounterMode(display=False) as forward_counter:
        model(x)
    assert report.forward_flops == forward_counter.get_total_flops()


def test_grouped_convolution_backward_is_counted_once_per_product() -> None:
    """torch's formula counts a grouped convolution's weight gradient ``groups`` times over.
    Every product x*w of the forward has one g*w (grad_input) and one x*g (grad_weight)."""
    model = nn.Sequential(nn.Conv2d(4, 16, 3, padding=1), nn.Conv2d(16, 16, 5, padding=2, groups=16, bias=False))
    x = torch.randn(2, 4, 12, 12)
    report = estimate_training_step(model, [x], target="cpu")
    rows = {row.name: row for row in report.rows}
    depthwise_macs = 2 * 16 * 12 * 12 * 1 * 5 * 5  # N * C_out * H * W * (C_in / groups) * k * k
    assert rows["1"].forward_flops == 2 * depthwise_macs
    assert rows["1"].backward_flops == 2 * 2 * depthwise_macs  # grad_input + grad_weight
    assert rows["0"].backward_flops == rows["0"].forward_flops  # the input needs no gradient
    # torch's own counter, for contrast: the weight gradient counted 16 times.
    model.train()
    loss = default_loss(model(x))
    with FlopCounterMode(display=False) as counter:
        loss.backward()
    first_macs = 2 * 16 * 12 * 12 * 4 * 3 * 3
    assert counter.get_total_flops() == 2 * first_macs + 2 * depthwise_macs * (1 + 16)
    assert report.backward_flops == 2 * first_macs + 2 * depthwise_macs * 2


def test_cpu_flash_attention_backward_is_counted() -> None:
    """torch's counter has no formula for the CPU flash-attention kernels (it counts 0). The
    math path computes the same gradients with four batched matmuls; flash attention also
    recomputes the scores (one more), which the backward formula counts."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    model = TinyLM()
    ids = lm_inputs(batch=3, length=16)
    report = estimate_training_step(model, ids, target="cpu")
    model.train()
    with sdpa_kernel(SDPBackend.MATH):
        loss = default_loss(model(*ids))
        with FlopCounterMode(display=False) as counter:
            loss.backward()
        with FlopCounterMode(display=False) as forward_counter:
            model(*ids)
    batch, heads, length, head_dim, layers = 3, 4, 16, 8, 2
    recompute = 2 * batch * heads * length * length * head_dim
    assert report.backward_flops == counter.get_total_flops() + layers * recompute
    assert report.forward_flops == forward_counter.get_total_flops()


def test_activations_grow_with_the_batch_and_parameters_do_not() -> None:
    model = small_cnn()
    one = estimate_training_step(model, cnn_inputs(8), target="cpu")
    two = estimate_training_step(model, cnn_inputs(16), target="cpu")
    assert two.at_peak["parameters"] == one.at_peak["parameters"]
    assert one.at_peak["activations"] > 0
    rows_one = {r.name: r.saved_activation_bytes for r in one.rows}
    rows_two = {r.name: r.saved_activation_bytes for r in two.rows}
    assert rows_one["2"] == 8 * 8 * 16 * 16 * 4  # ReLU saves its output
    assert all(rows_two[name] == 2 * rows_one[name] for name in ("2", "4"))
    assert 2 * rows_one[""] - rows_two[""] == 2 * 8 * 4  # BatchNorm's saved statistics do not grow
    assert two.forward_flops == 2 * one.forward_flops


def test_pure_16_bit_training_halves_parameters() -> None:
    model = small_cnn()
    full = estimate_training_step(model, cnn_inputs(), target="cpu")
    half = estimate_training_step(model, cnn_inputs(), target="cpu", dtype=torch.bfloat16)
    assert half.dtype == "bfloat16" and full.dtype == "float32"
    assert half.at_peak["parameters"] * 2 == full.at_peak["parameters"]


def test_frozen_parameters_get_no_gradient_and_no_optimizer_state() -> None:
    model = nn.Sequential(nn.Linear(64, 64, bias=False), nn.ReLU(), nn.Linear(64, 10, bias=False))
    model[0].weight.requires_grad_(False)
    report = estimate_training_step(model, [torch.randn(4, 64)], optimizer="sgd", target="cpu")
    assert report.at_start_bytes == (64 * 64 + 64 * 10) * 4 + 4 * 64 * 4 + 64 * 10 * 4  # params, input, momentum
    assert report.at_peak["gradients"] in (0, 64 * 10 * 4)
    assert {r.name: r.backward_flops for r in report.rows}["0"] == 0  # nothing flows into a frozen first layer


def test_a_loss_function_can_be_given() -> None:
    model = small_cnn()
    report = estimate_training_step(model, cnn_inputs(), loss=lambda out: out.pow(2).mean(), target="cpu")
    assert report.backward_flops > 0


def test_errors_are_one_line_and_name_the_phase() -> None:
    with pytest.raises(TrainingStepError, match="no parameters"):
        estimate_training_step(nn.ReLU(), [torch.randn(2, 2)])

    class NeedsValues(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.linear(x[x > 0].reshape(-1, 4))

    with pytest.raises(TrainingStepError, match="forward phase.*device` cpu") as failure:
        estimate_training_step(NeedsValues(), [torch.randn(4, 4)])
    assert failure.value.needs_values
    assert estimate_training_step(NeedsValues(), [torch.ones(4, 4)], device="cpu").forward_flops > 0
    with pytest.raises(TrainingStepError, match="per channel") as failure:
        estimate_training_step(small_cnn(), cnn_inputs(1)[:1] and [torch.randn(1, 3, 1, 1)])
    assert not failure.value.needs_values

    class Indices(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.linear(x).argmax(dim=1)

    with pytest.raises(TrainingStepError, match="no floating tensor"):
        estimate_training_step(Indices(), [torch.randn(4, 4)])
    with pytest.raises(TrainingStepError, match="not a scalar"):
        estimate_training_step(small_cnn(), cnn_inputs(), loss=lambda out: out)
    with pytest.raises(BadInputError, match="unknown optimizer"):
        estimate_training_step(small_cnn(), cnn_inputs(), optimizer="lion")  # type: ignore[arg-type]


def test_default_loss_shapes() -> None:
    assert default_loss(torch.randn(4, 10, requires_grad=True)).dim() == 0
    assert default_loss(torch.randn(2, 7, 50, requires_grad=True)).dim() == 0  # language model
    assert default_loss({"out": torch.randn(2, 5, 8, 8), "aux": torch.randn(2, 5, 8, 8)}).dim() == 0
    assert default_loss(torch.randn((), requires_grad=True)).dim() == 0


def linear_scan(peak, budget: int, limit: int) -> int:
    best = 0
    for batch in range(1, limit + 1):
        if peak(batch) > budget:
            break
        best = batch
    return best


@pytest.mark.parametrize("shape", ["linear", "quadratic", "stairs", "sqrt", "optimizer-bound", "long-flat"])
def test_fit_batch_size_against_a_linear_scan(shape: str) -> None:
    rng = random.Random(shape)
    for _ in range(300):
        base, slope = rng.randint(0, 10**6), rng.randint(1, 10**4)
        peak = {
            "linear": lambda b: base + slope * b,
            "quadratic": lambda b: base + slope * b * b,
            "stairs": lambda b: base + slope * (b // 16) * 16,
            "sqrt": lambda b: base + int(slope * math.sqrt(b)),
            "optimizer-bound": lambda b: base + max(10 * slope, slope * b),
            "long-flat": lambda b: base + max(1000 * slope, slope * b),
        }[shape]
        budget = rng.randint(0, 10**7)
        limit = rng.choice([1, 7, 3000])
        got, seen = fit_batch_size(peak, budget, limit=limit)
        assert got == linear_scan(peak, budget, limit)
        assert all(seen[b] == peak(b) for b in seen)
        assert len(seen) <= 3 * math.log2(limit + 1) + 6


def test_fit_batch_size_on_a_real_trace_is_exact() -> None:
    model = small_cnn()

    def peak(batch: int) -> int:
        return estimate_training_step(model, cnn_inputs(batch), target="cpu").peak_bytes

    budget = peak(40) + 1
    got, seen = fit_batch_size(peak, budget)
    assert peak(got) <= budget < peak(got + 1)
    assert len(seen) <= 8


@pytest.mark.parametrize(("text", "expected"), [
    ("batch=1,8,32", ("batch", [1, 8, 32])),
    (" batch = 4 ", ("batch", [4])),
    ("input=3x224x224,3x384x384", ("input", [(3, 224, 224), (3, 384, 384)])),
])
def test_parse_sweep(text: str, expected) -> None:
    assert parse_sweep(text) == expected


@pytest.mark.parametrize("text", [
    "batch", "batch=", "batch=0", "batch=-1", "batch=1.5", "batch=99999999999999999999", "size=1,2",
    "input=3x0x2", "batch=" + ",".join(["1"] * 65),
])
def test_parse_sweep_refuses(text: str) -> None:
    with pytest.raises(BadInputError):
        parse_sweep(text)


def test_parse_fit() -> None:
    assert parse_fit("24GiB") == 24 << 30
    assert parse_fit("auto") is None
    for bad in ("0", "-1GiB", "lots", "nan", "1e9"):
        with pytest.raises(BadInputError):
            parse_fit(bad)


@pytest.mark.cuda
@pytest.mark.parametrize("amp", [None, torch.bfloat16], ids=["fp32", "bf16-autocast"])
def test_a_real_cuda_step_against_max_memory_allocated(amp) -> None:
    """The issue's GPU bound: the meta estimate's peak within 10 % of the allocator's own
    max_memory_allocated over a real step (after a warm-up step, peak statistics reset)."""
    import torchvision

    model = torchvision.models.resnet18().cuda()
    x = torch.randn(16, 3, 224, 224, device="cuda")
    real = estimate_training_step(model, [x], device="cuda", amp=amp)
    traced = estimate_training_step(model, [x], amp=amp)  # meta, modelling CUDA
    measured = real.measured["max_memory_allocated"]
    assert abs(traced.peak_bytes - measured) <= 0.10 * measured, (traced.peak_bytes, measured)
    assert abs(real.peak_bytes - measured) <= 0.10 * measured, (real.peak_bytes, measured)
