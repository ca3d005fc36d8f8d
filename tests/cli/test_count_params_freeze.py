"""``ptools count-params`` and ``ptools freeze`` through CliRunner and as real processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
import torchvision
from typer.testing import CliRunner

from ptools.cli.app import app
from tests.checkpoint_fixtures import save_zip

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [*map(str, args)])


def test_count_params_model_json_and_table() -> None:
    data = json.loads(invoke("count-params", "resnet50", "--json", "--depth", "1").stdout)
    assert data["total"] == 25_557_032 and data["buffers"] == 53_173 and data["source"] == "model"
    assert {m["name"] for m in data["modules"]} >= {"conv1", "layer1", "fc"}
    human = invoke("count-params", "resnet50")
    assert "25,557,032 (25.6 M)" in human.stdout


def test_count_params_checkpoint_reads_no_data(tmp_path: Path) -> None:
    path = save_zip({"model": torchvision.models.resnet18().state_dict(), "epoch": 3}, tmp_path / "r18.pt")
    result = invoke("count-params", path, "--json")
    data = json.loads(result.stdout)
    assert data["total"] == 11_689_512 and data["source"] == "checkpoint" and data["inferred_from_names"]
    process = subprocess.run([sys.executable, "-X", "importtime", "-m", "ptools", "count-params", str(path)],
                             capture_output=True, text=True, timeout=120)
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0]
                for line in process.stderr.splitlines() if line.startswith("import time:")}
    assert process.returncode == 0 and "torch" not in imported
    assert "parameters vs buffers inferred from names" in process.stderr


def test_count_params_errors() -> None:
    unknown = invoke("count-params", "resnt50")
    assert unknown.exit_code == 1 and "did you mean: resnet50" in unknown.stderr


def test_freeze_report_outputs_and_errors(tmp_path: Path) -> None:
    names = tmp_path / "trainable.json"
    out = tmp_path / "frozen.pt"
    result = invoke("freeze", "resnet18", "--layers", "conv1,bn1", "--layers", "layer1", "--except", "layer1.1",
                    "--trainable-out", names, "--out", out, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [m["name"] for m in data["frozen_modules"]] == ["conv1", "bn1", "layer1"]
    trainable = json.loads(names.read_text())
    assert "layer1.1.conv1.weight" in trainable and "conv1.weight" not in trainable
    model = torch.load(out, weights_only=False)
    assert not model.conv1.weight.requires_grad and type(model.bn1).__name__ == "FrozenBatchNorm"
    missing = invoke("freeze", "resnet18", "--layers", "layer10")
    assert missing.exit_code == 1 and "pattern 'layer10' matches no module" in missing.stderr
    clash = invoke("freeze", "resnet18", "--layers", "layer1", "--dry-run", "--out", out)
    assert clash.exit_code == 1 and "--dry-run writes nothing" in clash.stderr


def test_freeze_with_weights(tmp_path: Path) -> None:
    source = torchvision.models.resnet18()
    path = save_zip({f"module.{k}": v for k, v in source.state_dict().items()}, tmp_path / "ddp.pt")
    result = invoke("freeze", "resnet18", "--weights", path, "--layers", "layer4", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "weights " in result.stdout and "122 loaded, 0 missing, 0 unexpected" in result.stdout


def test_weights_mismatch_names_are_shown(tmp_path: Path) -> None:
    state = torchvision.models.resnet18().state_dict()
    state["fc.weight"] = torch.zeros(10, 512)
    del state["fc.bias"]
    state["extra.weight"] = torch.ones(1)
    path = save_zip({f"module.{k}": v for k, v in state.items()}, tmp_path / "ft.pt")
    result = invoke("freeze", "resnet18", "--weights", path, "--layers", "layer1", "--dry-run")
    assert "(prefix 'module.' stripped)" in result.stdout
    assert "missing: fc.bias" in result.stdout and "unexpected: extra.weight" in result.stdout
    assert "shape-mismatched: fc.weight [10, 512] vs model [1000, 512]" in result.stdout
    strict = invoke("freeze", "resnet18", "--weights", path, "--layers", "layer1", "--strict")
    assert strict.exit_code == 1 and "--strict: 1 missing, 1 unexpected, 1 shape-mismatched" in strict.stderr
