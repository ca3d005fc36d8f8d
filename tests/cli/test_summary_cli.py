"""``ptools summary`` through CliRunner."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ptools.cli.app import app

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, ["summary", *map(str, args)])


def test_table_and_json() -> None:
    human = invoke("resnet18", "--input-size", "3,224,224", "--depth", "1")
    assert human.exit_code == 0, human.output
    assert "layer1" in human.stdout and "1×64×56×56" in human.stdout
    assert "1,814,073,344 (1.814 G)" in human.stdout
    data = json.loads(invoke("resnet18", "--input-size", "3,224,224", "--json").stdout)
    assert data["totals"]["macs"] == 1_814_073_344 and data["totals"]["parameters"] == 11_689_512
    assert data["units"]["flops"].startswith("2 x MACs")


def test_meta_device_and_batch() -> None:
    data = json.loads(invoke("vit_h_14", "--input-size", "3,518,518", "--device", "meta", "--batch-size", "2",
                             "--kwargs", '{"image_size": 518}', "--json").stdout)
    assert data["device"] == "meta"
    assert data["totals"]["macs"] / 2e9 == pytest.approx(1016.717, rel=0.02)


def test_torchsummary_format() -> None:
    result = invoke("resnet18", "--input-size", "3,32,32", "--format", "torchsummary")
    assert result.exit_code == 0 and "Total params: 11,689,512" in result.stdout


@pytest.mark.parametrize(("args", "message"), [
    (["torchvision:raft_small"], "give --input-size (e.g. 3,224,224) or --input-spec (no input size is published"),
    (["resnet18", "--input-size", "5,32,32"], "the forward pass failed"),
    (["resnet18", "--input-spec", "{bad"], "--input-spec is not valid JSON"),
])
def test_errors(args: list[str], message: str) -> None:
    result = invoke(*args)
    assert result.exit_code == 1 and message in result.stderr, result.output


@pytest.mark.cuda
def test_cuda_device_counts_what_cpu_counts() -> None:
    on_gpu = json.loads(invoke("vit_b_16", "--input-size", "3,224,224", "--device", "cuda", "--json").stdout)
    on_cpu = json.loads(invoke("vit_b_16", "--input-size", "3,224,224", "--json").stdout)
    assert on_gpu["device"].startswith("cuda")
    assert on_gpu["totals"]["macs"] == on_cpu["totals"]["macs"]


def test_published_input_size_is_the_default() -> None:
    result = invoke("resnet18", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["totals"]["macs"] == 1_814_073_344  # 224 px, as its weights
    assert "input: 3x224x224, the crop size of ResNet18_Weights.IMAGENET1K_V1" in result.stderr
    inception = invoke("inception_v3", "--device", "meta", "--kwargs", '{"aux_logits": false, "init_weights": false}',
                       "--json")
    assert "3x299x299" in inception.stderr and json.loads(inception.stdout)["inputs"][0][0] == [1, 3, 299, 299]
    vit = invoke("vit_h_14", "--device", "meta", "--json")  # built for 224: the weights made for 224 are used
    assert "3x224x224, the crop size of ViT_H_14_Weights.IMAGENET1K_SWAG_LINEAR_V1" in vit.stderr


class Twice(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = torch.nn.Conv2d(3, 3, 3, padding=1)
        self.pool = torch.nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.pool(self.block(x)))


def test_module_called_twice_shows_each_shape() -> None:
    from ptools.core.summary import summarize

    data = summarize(Twice(), [torch.randn(1, 3, 8, 8)]).to_dict()
    block = next(row for row in data["rows"] if row["name"] == "block")
    assert block["calls"] == 2 and block["outputs"] == [[1, 3, 8, 8], [1, 3, 4, 4]]
    from ptools.cli.summary import render

    text = str(render(data, 1)[0].columns[2]._cells)
    assert "1×3×8×8 | 1×3×4×4 (2 calls)" in text


@pytest.fixture
def scripted_and_exported(tmp_path: Path) -> tuple[Path, Path]:
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(8 * 6 * 6, 4)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(model).save(str(tmp_path / "m.jit"))
    torch.export.save(torch.export.export(model, (torch.randn(2, 3, 8, 8),)), str(tmp_path / "m.pt2"))
    return tmp_path / "m.jit", tmp_path / "m.pt2"


def test_torchscript_is_summarised_with_what_can_be_known(scripted_and_exported) -> None:
    scripted, _ = scripted_and_exported
    result = invoke(scripted, "--input-size", "3,8,8", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    expected_macs = 8 * 27 * 36 + 288 * 4
    assert data["totals"]["macs"] == expected_macs and data["totals"]["parameters"] == 8 * 28 + 289 * 4
    rows = {row["name"]: row for row in data["rows"]}
    assert rows["0"]["type"] == "Conv2d" and rows["0"]["parameters"] == 224 and rows["0"]["macs"] is None
    assert data["output"] == [1, 4] and "take no forward hooks" in data["notes"][0]
    human = invoke(scripted, "--input-size", "3,8,8")
    assert human.exit_code == 0 and "note: TorchScript" in human.stderr


def test_exported_program_runs_on_its_example_inputs(scripted_and_exported) -> None:
    _, exported = scripted_and_exported
    result = invoke(exported, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    rows = {row["name"]: row for row in data["rows"]}
    assert rows["0"]["type"] == "Conv2d" and rows["0"]["output"] == [2, 8, 6, 6]
    assert data["totals"]["macs"] == 2 * (8 * 27 * 36 + 288 * 4)
    assert "the example inputs stored in the exported program" in result.stderr


def test_library_models_are_measured_on_meta_by_default_and_match_the_cpu() -> None:
    auto = json.loads(invoke("resnet18", "--input-size", "3,64,64", "--json").stdout)
    cpu = json.loads(invoke("resnet18", "--input-size", "3,64,64", "--device", "cpu", "--json").stdout)
    assert (auto["device"], cpu["device"]) == ("meta", "cpu")
    for field in ("rows", "totals", "output"):
        assert auto[field] == cpu[field], field


def test_models_that_need_values_fall_back_to_the_cpu_without_downloading() -> None:
    result = invoke("torchvision:fasterrcnn_mobilenet_v3_large_320_fpn", "--input-size", "3,320,320", "--json")
    assert result.exit_code == 0, result.output  # no network here: the backbone weights are not fetched
    assert "does not run on the meta device" in result.stderr and "Downloading" not in result.stderr
    assert json.loads(result.stdout)["device"] == "cpu"


def test_an_input_the_model_refuses_is_one_line_without_blaming_the_meta_device() -> None:
    """`summary resnet18 --input-size 224,224` printed a note blaming the meta device first."""
    result = subprocess.run([sys.executable, "-m", "ptools", "summary", "resnet18", "--input-size", "224,224"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: the forward pass failed"), lines
    assert "meta device" not in result.stderr


def test_the_totals_mention_tied_weights_only_when_there_are_some() -> None:
    from ptools.core.summary import summarize
    from tests.checkpoint_fixtures import TiedLM

    tied = summarize(TiedLM(), [torch.zeros(1, 4, dtype=torch.long)]).totals
    untied = summarize(torch.nn.Linear(3, 2), [torch.zeros(1, 3)]).totals
    assert tied["tied_names"] == 1 and untied["tied_names"] == 0
    from ptools.cli.summary import render

    def parameters_row(totals: dict) -> str:
        from rich.console import Console

        console = Console(width=200, record=True)
        data = {"model": "m", "mode": "eval", "device": "cpu", "dtype": "float32", "inputs": [], "output": [],
                "rows": [], "totals": totals, "notes": []}
        for renderable in render(data, 1):
            console.print(renderable)
        return next(line for line in console.export_text().splitlines() if "parameters " in line)

    assert "tied" not in parameters_row(untied) and "1 tied name(s)" in parameters_row(tied)
