"""``ptools summary`` through CliRunner."""

from __future__ import annotations

import json

import pytest
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
    (["resnet18"], "give --input-size"),
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
