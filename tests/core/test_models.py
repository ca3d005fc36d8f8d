"""Model specs, parameter counts against torchvision's published numbers, and freezing."""

from __future__ import annotations

import collections
import textwrap
from pathlib import Path

import pytest
import torch
import torchvision

from ptools.core import models
from ptools.errors import BadInputError, UnsafeFileError
from tests.checkpoint_fixtures import TiedLM, save_zip, tiny_net

CLASSIFICATION = torchvision.models.list_models(module=torchvision.models)
# Built the way their published weights are: googlenet's weights drop the aux heads, and
# vit_h_14's are for 518-pixel images (a larger position embedding).
WEIGHTS_KWARGS = {"googlenet": {"aux_logits": False}, "vit_h_14": {"image_size": 518}}


@pytest.mark.parametrize("name", CLASSIFICATION)
def test_count_equals_published_num_params(name: str) -> None:
    weights = torchvision.models.get_model_weights(name)
    published = next(iter(weights)).meta["num_params"]
    model = models.load_model(name, WEIGHTS_KWARGS.get(name, {}), device="meta")
    assert models.count_model(model).total == published


def test_tied_parameters_count_once() -> None:
    count = models.count_model(TiedLM())
    assert count.total == 1600
    assert {m["name"]: m["parameters"] for m in count.modules} == {"embed": 1600, "head": 1600}


def test_checkpoint_count_matches_model_without_reading_data(tmp_path: Path) -> None:
    model = torchvision.models.resnet18()
    path = save_zip(model.state_dict(), tmp_path / "r18.pt")
    from_file = models.count_checkpoint(str(path), depth=1)
    from_model = models.count_model(model, depth=1)
    assert (from_file.total, from_file.buffers) == (from_model.total, from_model.buffers)
    assert from_file.inferred_from_names
    assert {m["name"]: m["parameters"] for m in from_file.modules} == \
        {m["name"]: m["parameters"] for m in from_model.modules if m["parameters"]}


def test_frozen_counts_and_dtypes() -> None:
    model = tiny_net()
    model.conv.weight.requires_grad_(False)
    model.head.half()
    count = models.count_model(model)
    assert count.frozen == model.conv.weight.numel()
    assert count.by_dtype == {"float32": 4 * 3 * 3 * 3 + 4 + 4 + 4, "float16": 4 * 2 + 2}
    assert count.parameter_bytes == (4 * 27 + 12) * 4 + 10 * 2


# ---------------------------------------------------------------- specs


def test_user_file_factory_with_kwargs(tmp_path: Path) -> None:
    source = tmp_path / "mynet.py"
    source.write_text(textwrap.dedent("""
        import torch

        class Net(torch.nn.Module):
            def __init__(self, width=4):
                super().__init__()
                self.fc = torch.nn.Linear(3, width)

        def broken():
            raise ValueError("no config")
    """))
    model = models.load_model(f"{source}:Net", {"width": 7})
    assert model.fc.out_features == 7
    with pytest.raises(BadInputError, match=r"error inside .*:broken: ValueError: no config"):
        models.load_model(f"{source}:broken")
    with pytest.raises(BadInputError, match="has no class or function 'Missing'"):
        models.load_model(f"{source}:Missing")


def test_module_factory_and_torchscript_and_pickled(tmp_path: Path) -> None:
    model = models.load_model("torchvision.models:resnet18", {"num_classes": 3})
    assert model.fc.out_features == 3
    scripted = tmp_path / "scripted.pt"
    torch.jit.script(tiny_net()).save(str(scripted))
    assert models.count_model(models.load_model(str(scripted))).total == models.count_model(tiny_net()).total
    pickled = tmp_path / "whole.pt"
    torch.save(tiny_net(), pickled)
    with pytest.raises(UnsafeFileError, match="`trust=True`"):
        models.load_model(str(pickled))
    assert isinstance(models.load_model(str(pickled), trust=True), torch.nn.Module)
    weights_only = save_zip(tiny_net().state_dict(), tmp_path / "sd.pt")
    with pytest.raises(BadInputError, match="is a checkpoint .* not a model.*`weights`"):
        models.load_model(str(weights_only))


def test_exported_program(tmp_path: Path) -> None:
    model = tiny_net().eval()
    program = torch.export.export(model, (torch.randn(1, 3, 8, 8),))
    path = tmp_path / "net.pt2"
    torch.export.save(program, str(path))
    loaded = models.load_model(str(path))
    assert models.count_model(loaded).total == models.count_model(model).total


def test_unknown_names_suggest_close_matches() -> None:
    with pytest.raises(BadInputError, match="unknown model 'resnet5O'.*did you mean: resnet50"):
        models.load_model("resnet5O")
    with pytest.raises(BadInputError, match="`kwargs` must be a JSON object"):
        models.parse_kwargs("[1]")


def test_load_weights_reports_mismatches(tmp_path: Path) -> None:
    state = tiny_net(seed=1).state_dict()
    ddp = collections.OrderedDict((f"module.{k}", v) for k, v in state.items())
    ddp["module.head.weight"] = torch.zeros(5, 4)
    ddp["module.extra"] = torch.ones(1)
    del ddp["module.bn.bias"]
    path = save_zip({"model": ddp, "epoch": 1}, tmp_path / "ddp.pt")
    model = tiny_net(seed=2)
    report = models.load_weights(model, str(path))
    assert report.stripped_prefix == "module."
    assert report.missing == ["bn.bias"] and report.unexpected == ["extra"]
    assert report.shape_mismatched == [{"name": "head.weight", "checkpoint": [5, 4], "model": [2, 4]}]
    assert torch.equal(model.conv.weight, state["conv.weight"])
    with pytest.raises(BadInputError, match="`strict=True`: 1 missing, 1 unexpected, 1 shape-mismatched"):
        models.load_weights(tiny_net(), str(path), strict=True)


# ---------------------------------------------------------------- freeze


def test_glob_boundaries_and_wrapper_prefix() -> None:
    assert models._matches("layer1.0.conv1", "layer1")
    assert not models._matches("layer10.conv", "layer1")
    assert models._matches("backbone.body.layer2", "backbone.*")
    assert models._matches("layer3.1.bn2", "*.bn*")
    assert models._matches("module.layer1.0", "layer1") and models._matches("layer1.0", "module.layer1")


def test_freeze_counts_except_and_empty_match() -> None:
    model = torchvision.models.resnet18()
    frozen = sum(p.numel() for name, p in model.named_parameters()
                 if name.startswith(("layer1", "layer2", "layer3")))
    report = models.freeze(model, ["layer*"], except_=["layer4"])
    assert report.trainable_before - report.trainable_after == frozen
    assert all(p.requires_grad for p in model.layer4.parameters())
    assert report.trainable_after == sum(p.numel() for p in models.trainable_parameters(model))
    with pytest.raises(BadInputError, match="pattern 'layer10' matches no module"):
        models.freeze(torchvision.models.resnet18(), ["layer10"])


def test_dry_run_changes_nothing() -> None:
    model = tiny_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = models.freeze(model, ["conv", "bn"], dry_run=True)
    assert report.trainable_after < report.trainable_before
    assert all(p.requires_grad for p in model.parameters())
    assert isinstance(model.bn, torch.nn.BatchNorm2d)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_frozen_batchnorm_survives_train_and_optimizer_steps() -> None:
    model = tiny_net()
    model.bn.running_var.uniform_(0.5, 2.0)
    reference = tiny_net()
    reference.load_state_dict(model.state_dict())
    models.freeze(model, ["conv", "bn"], bn="frozen")
    frozen_before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("head")}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)  # all params: the
    model.train()                                                                         # usual mistake
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(4, 3, 8, 8)).sum().backward()
        optimizer.step()
    for name, tensor in model.state_dict().items():
        if not name.startswith("head"):
            assert torch.equal(tensor, frozen_before[name]), name
    assert not torch.equal(model.head.weight, reference.head.weight)
    reference.eval()  # the frozen model computes what the original computes in eval mode
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(model.bn(model.conv(x)), reference.bn(reference.conv(x)))


def test_bn_eval_and_none_modes() -> None:
    model = tiny_net()
    report = models.freeze(model, ["bn"], bn="eval")
    assert report.batchnorm_eval == ["bn"] and not model.bn.training
    assert not model.bn.weight.requires_grad
    untouched = tiny_net()
    models.freeze(untouched, ["bn"], bn="none")
    assert isinstance(untouched.bn, torch.nn.BatchNorm2d) and untouched.bn.training


def test_unfreeze() -> None:
    model = tiny_net()
    models.freeze(model, ["conv"], bn="none")
    assert models.unfreeze(model, ["conv"]) == model.conv.weight.numel() + model.conv.bias.numel()
    assert all(p.requires_grad for p in model.parameters())


def test_frozen_batchnorm_for_1d_and_3d() -> None:
    for layer, shape in ((torch.nn.BatchNorm1d(5), (4, 5, 7)), (torch.nn.BatchNorm3d(5), (2, 5, 3, 3, 3))):
        layer.running_mean.uniform_()
        layer.eval()
        x = torch.randn(shape)
        torch.testing.assert_close(models.frozen_batchnorm(layer)(x), layer(x))


def test_default_input_size_comes_from_what_was_published() -> None:
    from ptools.core.models import default_input_size

    class TimmStyle(torch.nn.Module):
        pretrained_cfg = {"input_size": (3, 288, 288), "crop_pct": 0.95}

    assert default_input_size("timm:anything", TimmStyle()) == ((3, 288, 288), "timm's pretrained_cfg input_size "
                                                                                "for TimmStyle")
    assert default_input_size("efficientnet_b3", torch.nn.Module())[0] == (3, 300, 300)
    assert default_input_size("deeplabv3_resnet50", torch.nn.Module())[0] == (3, 520, 520)
    assert default_input_size("fasterrcnn_resnet50_fpn", torch.nn.Module()) is None
    assert default_input_size("r3d_18", torch.nn.Module()) is None
    assert default_input_size("models.py:Net", torch.nn.Module()) is None
