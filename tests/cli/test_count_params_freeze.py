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


def test_freeze_never_overwrites_without_force_nor_an_input(tmp_path: Path) -> None:
    names, out = tmp_path / "trainable.json", tmp_path / "frozen.pt"
    names.write_text("mine")
    out.write_bytes(b"mine too")
    for flag, path in (("--trainable-out", names), ("--out", out)):
        refused = invoke("freeze", "resnet18", "--layers", "layer1", flag, path)
        assert refused.exit_code == 1 and f"{flag} {path} exists" in refused.stderr and "--force" in refused.stderr
    assert names.read_text() == "mine" and out.read_bytes() == b"mine too"
    replaced = invoke("freeze", "resnet18", "--layers", "layer1", "--trainable-out", names, "--force")
    assert replaced.exit_code == 0 and "layer4.1.bn2.bias" in json.loads(names.read_text())
    weights = save_zip(torchvision.models.resnet18().state_dict(), tmp_path / "weights.pt")
    before = weights.read_bytes()
    own_input = invoke("freeze", "resnet18", "--weights", weights, "--layers", "layer1", "--out", weights, "--force")
    assert own_input.exit_code == 1 and "is an input; ptools never overwrites its input" in own_input.stderr
    assert weights.read_bytes() == before
    same = invoke("freeze", "resnet18", "--layers", "layer1", "--out", tmp_path / "x", "--trainable-out", tmp_path / "x")
    assert same.exit_code == 1 and "name the same file" in same.stderr
    folder = invoke("freeze", "resnet18", "--layers", "layer1", "--out", tmp_path, "--force")
    assert folder.exit_code == 1 and "folder" in folder.stderr


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


def test_state_dict_count_does_not_claim_what_it_cannot_know(tmp_path: Path) -> None:
    path = save_zip(torch.nn.Linear(4, 2).state_dict(), tmp_path / "sd.pt")
    data = json.loads(invoke("count-params", path, "--json").stdout)
    assert (data["total"], data["trainable"], data["frozen"]) == (10, None, None)
    human = invoke("count-params", path)
    assert "unknown (a state dict does not record requires_grad)" in human.stdout and "10 (10)" not in human.stdout


USER_MODEL = '''
import torch


class Net(torch.nn.Module):
    def __init__(self, width=4):
        super().__init__()
        self.backbone = torch.nn.Sequential(torch.nn.Conv2d(3, width, 3), torch.nn.BatchNorm2d(width))
        self.head = torch.nn.Linear(width, 2)

    def forward(self, x):
        return self.head(self.backbone(x).mean((2, 3)))
'''


def _user_model_file(folder: Path, stem: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stem}.py"
    path.write_text(USER_MODEL)
    return path


def test_whole_pickled_module_with_trust_is_counted_and_listed(tmp_path: Path) -> None:
    """The error without --trust says to pass it; with it, the module's parameters are counted."""
    source = _user_model_file(tmp_path / "code", "trustme_models")
    script = (f"import sys, torch; sys.path.insert(0, {str(source.parent)!r}); import trustme_models; "
              f"m = trustme_models.Net(); m.head.weight.requires_grad_(False); "
              f"torch.save(m, {str(tmp_path / 'm.pt')!r})")
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    refused = subprocess.run([sys.executable, "-m", "ptools", "count-params", str(tmp_path / "m.pt")],
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1 and "pass --trust" in refused.stderr
    missing = subprocess.run([sys.executable, "-m", "ptools", "count-params", str(tmp_path / "m.pt"), "--trust"],
                             capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert missing.returncode == 1 and "trustme_models.Net, which Python cannot import here" in missing.stderr
    counted = subprocess.run([sys.executable, "-m", "ptools", "count-params", str(tmp_path / "m.pt"), "--trust",
                              "--json"], capture_output=True, text=True, timeout=120, cwd=source.parent)
    assert counted.returncode == 0, counted.stderr
    data = json.loads(counted.stdout)
    assert (data["total"], data["trainable"], data["frozen"], data["buffers"]) == (130, 122, 8, 9)
    listed = subprocess.run([sys.executable, "-m", "ptools", "inspect-state-dict", str(tmp_path / "m.pt"), "--trust",
                             "--json"], capture_output=True, text=True, timeout=120, cwd=source.parent)
    assert listed.returncode == 0, listed.stderr
    names = [t["name"] for t in json.loads(listed.stdout)["tensors"]]
    assert names[:2] == ["backbone.0.weight", "backbone.0.bias"] and len(names) == 9
    assert "1 whole pickled module(s) (read with --trust)" in listed.stderr


def test_freeze_saves_a_model_from_a_user_file_that_loads_back(tmp_path: Path) -> None:
    source = _user_model_file(tmp_path / "code", "freeze_user_models")
    out = tmp_path / "frozen.pt"
    result = invoke("freeze", f"{source}:Net", "--layers", "backbone", "--out", out)
    assert result.exit_code == 0, result.output
    assert f"with {source.parent} on sys.path" in result.stderr
    script = (f"import sys, torch; sys.path.insert(0, {str(source.parent)!r}); "
              f"m = torch.load({str(out)!r}, weights_only=False); "
              "print(type(m).__module__, type(m).__name__, m.backbone[0].weight.requires_grad, "
              "m.head.weight.requires_grad)")
    loaded = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert loaded.stdout.split() == ["freeze_user_models", "Net", "False", "True"], loaded.stderr


def test_freeze_out_refused_up_front_when_the_module_name_is_taken(tmp_path: Path) -> None:
    source = _user_model_file(tmp_path / "code", "json")  # `import json` means the standard library
    out = tmp_path / "frozen.pt"
    result = invoke("freeze", f"{source}:Net", "--layers", "backbone", "--out", out)
    assert result.exit_code == 1 and "a pickled model could not be loaded back" in result.stderr
    assert "--trainable-out" in result.stderr and not out.exists()
    assert invoke("freeze", f"{source}:Net", "--layers", "backbone", "--dry-run").exit_code == 0


LAZY_MODEL = """
import torch


def build():
    return torch.nn.Sequential(torch.nn.LazyLinear(10), torch.nn.ReLU(), torch.nn.Linear(10, 2),
                               torch.nn.LazyBatchNorm1d())
"""


def test_lazy_modules_are_counted_once_initialised_and_reported_unknown_before(tmp_path: Path) -> None:
    """count-params crashed with a raw ValueError on nn.LazyLinear: the initialised part is
    counted, the rest named; with --input-size one forward pass gives the real counts."""
    from ptools.core.models import count_model

    spec = f"{tmp_path / 'lazy.py'}:build"
    (tmp_path / "lazy.py").write_text(LAZY_MODEL)
    before = runner.invoke(app, ["count-params", spec, "--json"])
    assert before.exit_code == 0, before.stderr
    data = json.loads(before.stdout)
    assert data["total"] == 22 and data["uninitialized"] == ["0.weight", "0.bias", "3.weight", "3.bias",
                                                             "3.running_mean", "3.running_var"]
    human = runner.invoke(app, ["count-params", spec])
    assert "6 tensor(s) of lazy modules are not initialised" in human.stderr and "--input-size" in human.stderr
    after = runner.invoke(app, ["count-params", spec, "--input-size", "7", "--json"])
    assert after.exit_code == 0, after.stderr
    expected = torch.nn.Sequential(torch.nn.Linear(7, 10), torch.nn.ReLU(), torch.nn.Linear(10, 2),
                                   torch.nn.BatchNorm1d(2))
    counted = json.loads(after.stdout)
    assert counted["uninitialized"] == [] and counted["total"] == count_model(expected).total == 106
    assert counted["buffers"] == count_model(expected).buffers
    wrong = runner.invoke(app, ["count-params", spec, "--input-size", "3,5,5"])
    assert wrong.exit_code == 1 and "initialising the lazy modules" in wrong.stderr
    assert len(wrong.stderr.strip().splitlines()) == 1
