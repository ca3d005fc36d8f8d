"""Summaries: MACs against torchvision's published numbers, outputs of every shape, modes."""

from __future__ import annotations

import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import torchvision

from ptools.core import models
from ptools.core.summary import make_inputs, shape_text, summarize, torchsummary_text
from ptools.errors import BadInputError
from tests.checkpoint_fixtures import TiedLM
from tests.core.test_models import CLASSIFICATION, WEIGHTS_KWARGS


def published(name: str) -> tuple[float, int]:
    weights = next(iter(torchvision.models.get_model_weights(name)))
    return weights.meta["_ops"], weights.transforms().crop_size[0]


@pytest.mark.parametrize("name", CLASSIFICATION)
def test_macs_within_two_percent_of_published(name: str) -> None:
    gmacs, crop = published(name)
    model = models.load_model(name, WEIGHTS_KWARGS.get(name, {}), device="meta")
    device = next(model.parameters()).device
    args, kwargs = make_inputs([(3, crop, crop)], 1, None, device, torch.float32)
    result = summarize(model, args, kwargs)
    assert result.totals["macs"] / 1e9 == pytest.approx(gmacs, rel=0.02)
    assert result.totals["flops"] == 2 * result.totals["macs"]
    assert result.totals["parameters"] == next(iter(torchvision.models.get_model_weights(name))).meta["num_params"]


def test_resnet50_rows_and_totals() -> None:
    model = torchvision.models.resnet50()
    result = summarize(model, [torch.randn(1, 3, 224, 224)])
    rows = {row.name: row for row in result.rows}
    assert rows["layer1"].output == [1, 256, 56, 56] and rows["fc"].output == [1, 1000]
    assert rows["conv1"].macs == 64 * 3 * 7 * 7 * 112 * 112
    assert sum(rows[n].macs for n in ("conv1", "layer1", "layer2", "layer3", "layer4", "fc")) == result.totals["macs"]
    assert result.totals["macs"] == 4_089_184_256
    assert result.totals["input_bytes"] == 3 * 224 * 224 * 4


def test_batchnorm_statistics_and_modes_are_left_alone() -> None:
    model = torchvision.models.resnet18()
    model.train()
    model.layer1.eval()  # a mixed-mode model must come back mixed
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for mode in ("eval", "train"):
        summarize(model, [torch.randn(2, 3, 64, 64)], mode=mode)
        for key, value in model.state_dict().items():
            assert torch.equal(value, before[key]), (mode, key)
        assert model.training and not model.layer1.training and model.layer2.training


def test_tuple_outputs_of_googlenet_and_inception_in_train_mode() -> None:
    googlenet = torchvision.models.googlenet(aux_logits=True, init_weights=False)
    result = summarize(googlenet, [torch.randn(2, 3, 224, 224)], mode="train")
    assert result.output == [[2, 1000], [2, 1000], [2, 1000]]  # logits, aux2, aux1
    inception = torchvision.models.inception_v3(aux_logits=True, init_weights=False)
    result = summarize(inception, [torch.randn(2, 3, 299, 299)], mode="train")
    assert result.output == [[2, 1000], [2, 1000]]
    assert "(2×1000, 2×1000)" == shape_text(result.output)


def test_dict_outputs_of_detection_and_segmentation() -> None:
    segmentation = torchvision.models.segmentation.fcn_resnet50(weights=None, weights_backbone=None, num_classes=3)
    result = summarize(segmentation, [torch.randn(1, 3, 64, 64)])
    assert result.output == {"out": [1, 3, 64, 64]}
    detector = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=5)
    args, kwargs = make_inputs([], 1, '{"args": [[{"shape": [3, 160, 160]}]]}', torch.device("cpu"), torch.float32)
    result = summarize(detector, args, kwargs)
    assert isinstance(result.output, list) and set(result.output[0]) == {"boxes", "labels", "scores"}
    assert result.totals["macs"] > 0


def test_tied_weights_count_once() -> None:
    args, kwargs = make_inputs([], 1, '{"args": [{"shape": [2, 5], "dtype": "int64", "fill": "randint", "high": 100}]}',
                               torch.device("cpu"), torch.float32)
    result = summarize(TiedLM(), args, kwargs)
    assert result.totals["parameters"] == 1600
    assert result.totals["macs"] == 2 * 5 * 16 * 100


def test_user_model_with_kwargs_forward(tmp_path: Path) -> None:
    source = tmp_path / "tagger.py"
    source.write_text(textwrap.dedent("""
        import torch

        class Tagger(torch.nn.Module):
            def __init__(self, vocab=1000, width=32):
                super().__init__()
                self.embed = torch.nn.Embedding(vocab, width)
                self.attention = torch.nn.MultiheadAttention(width, 4, batch_first=True)
                self.out = torch.nn.Linear(width, 5)

            def forward(self, ids, mask=None, extra=None):
                x = self.embed(ids)
                x, _ = self.attention(x, x, x, key_padding_mask=mask, need_weights=False)
                return {"logits": self.out(x), "extra": extra}
    """))
    model = models.load_model(f"{source}:Tagger", {"width": 32})
    spec = ('{"args": [{"shape": [2, 12], "dtype": "int64", "fill": "randint", "high": 1000}], '
            '"kwargs": {"mask": {"shape": [2, 12], "dtype": "bool", "fill": "zeros"}, "extra": 3}}')
    args, kwargs = make_inputs([], 1, spec, torch.device("cpu"), torch.float32)
    result = summarize(model, args, kwargs)
    assert result.output == {"logits": [2, 12, 5], "extra": 3}
    projections = 2 * 12 * 32 * 32 * 4  # q, k, v, out
    attention = 2 * 2 * 12 * 12 * 32  # scores and weighted sum
    assert result.totals["macs"] == projections + attention + 2 * 12 * 32 * 5


def test_forward_errors_are_explained() -> None:
    with pytest.raises(BadInputError, match="the forward pass failed: RuntimeError"):
        summarize(torchvision.models.resnet18(), [torch.randn(1, 5, 32, 32)])
    with pytest.raises(BadInputError, match="give `input_size`"):
        make_inputs([], 1, None, torch.device("cpu"), torch.float32)
    with pytest.raises(BadInputError, match="'shape' must be a list"):
        make_inputs([], 1, '{"args": [{"shape": "big"}]}', torch.device("cpu"), torch.float32)


def test_torchsummary_format_leaves_batchnorm_alone() -> None:
    model = torchvision.models.resnet18()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    text = torchsummary_text(model, [(3, 64, 64)], 1, "cpu")
    assert "Total params: 11,689,512" in text
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert model.training
    with pytest.raises(BadInputError, match="torchsummary cannot summarize this model"):
        torchsummary_text(torchvision.models.segmentation.fcn_resnet50(weights=None, weights_backbone=None),
                          [(3, 64, 64)], 1, "cpu")


@pytest.mark.parametrize("name", ["vit_b_16", "swin_t", "maxvit_t"])
def test_real_cpu_pass_counts_what_the_meta_pass_counts(name: str) -> None:
    """On the CPU, attention runs through kernels (fused MHA, CPU flash SDPA) that torch's
    counter alone would count as zero; the summary must still count them."""
    _, crop = published(name)
    cpu = summarize(models.load_model(name), [torch.randn(1, 3, crop, crop)])
    meta = summarize(models.load_model(name, device="meta"), [torch.randn(1, 3, crop, crop, device="meta")])
    assert cpu.totals["macs"] == meta.totals["macs"]
    assert torch.backends.mha.get_fastpath_enabled()  # restored


def test_two_inputs_and_bfloat16(tmp_path: Path) -> None:
    source = tmp_path / "pair.py"
    source.write_text(textwrap.dedent("""
        import torch

        class Pair(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.a = torch.nn.Linear(8, 4)
                self.b = torch.nn.Linear(6, 4)

            def forward(self, x, y):
                return self.a(x) + self.b(y)
    """))
    model = models.load_model(f"{source}:Pair").to(torch.bfloat16)
    args, kwargs = make_inputs([(8,), (6,)], 3, None, torch.device("cpu"), torch.bfloat16)
    result = summarize(model, args, kwargs)
    assert result.output == [3, 4] and result.dtype == "bfloat16"
    assert result.totals["macs"] == 3 * 8 * 4 + 3 * 6 * 4
    assert result.totals["input_bytes"] == (3 * 8 + 3 * 6) * 2


def test_timm_models_when_timm_is_installed() -> None:
    pytest.importorskip("timm")
    model = models.load_model("timm:resnet18", device="meta")
    assert models.count_model(model).total == 11_689_512
    with pytest.raises(BadInputError, match="unknown timm model"):
        models.load_model("timm:resnet18x")


def _recurrent_macs(module: torch.nn.Module, tokens: int) -> int:
    """Analytic MACs of a recurrent module: every token of every layer and direction multiplies
    by W_ih and W_hh (and W_hr with proj_size)."""
    return tokens * sum(p.numel() for n, p in module.named_parameters() if n.startswith(("weight_ih", "weight_hh",
                                                                                         "weight_hr")))


@pytest.mark.parametrize("case", ["lstm-2-layers-batch-first", "lstm-bidirectional", "lstm-proj", "gru", "rnn",
                                  "lstm-packed"])
def test_recurrent_layers_are_counted_on_the_cpu_as_on_meta(case: str) -> None:
    """On the CPU an nn.LSTM runs as one opaque mkldnn_rnn_layer kernel that torch's flop
    counter has no formula for: it counted 0 MACs (meta and GRU/RNN were right)."""
    from torch.nn.utils.rnn import pack_padded_sequence

    from ptools.core.summary import summarize

    torch.manual_seed(0)
    module = {
        "lstm-2-layers-batch-first": lambda: torch.nn.LSTM(8, 16, 2, batch_first=True),
        "lstm-bidirectional": lambda: torch.nn.LSTM(8, 16, 1, bidirectional=True),
        "lstm-proj": lambda: torch.nn.LSTM(8, 16, 2, proj_size=4),
        "gru": lambda: torch.nn.GRU(8, 16, 2, bidirectional=True),
        "rnn": lambda: torch.nn.RNN(8, 16, 3),
        "lstm-packed": lambda: torch.nn.LSTM(8, 16, 2),
    }[case]()
    inputs = torch.randn(3, 5, 8) if "batch-first" in case else torch.randn(5, 3, 8)
    tokens = 15
    if case == "lstm-packed":
        inputs = pack_padded_sequence(inputs, torch.tensor([5, 3, 2]))
        tokens = 10
    expected = _recurrent_macs(module, tokens)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "LSTM with projections is not supported with oneDNN"
        assert summarize(module, [inputs]).totals["macs"] == expected
        if case != "lstm-packed":  # a packed sequence does not go to the meta device
            assert summarize(module.to("meta"), [inputs.to("meta")]).totals["macs"] == expected
