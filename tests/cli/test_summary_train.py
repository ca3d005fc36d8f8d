"""``ptools summary --train`` through CliRunner: the report, sweeps, fits, and refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ptools.cli.app import app
from ptools.core import gpu
from tests.fake_nvml import GIB, FakeNvml, make_gpu

runner = CliRunner()

TAGGER = '''
import torch
class Tagger(torch.nn.Module):
    def __init__(self, vocab=50, dim=16):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, dim)
        self.head = torch.nn.Linear(dim, vocab, bias=False)
    def forward(self, ids, mask=None):
        return self.head(self.emb(ids))
'''
SPEC = '{"args": [{"shape": [2, 12], "dtype": "int64", "fill": "randint", "high": 50}]}'


def invoke(*args: str):
    return runner.invoke(app, ["summary", *map(str, args)])


def test_json_report_has_every_part_and_both_directions() -> None:
    result = invoke("resnet18", "--train", "--input-size", "3,64,64", "--batch-size", "2", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    step = data["step"]
    assert data["sweep"] is None and data["fit"] is None
    assert step["device"] == "meta" and step["target"] == "cuda" and step["optimizer"] == "adamw"
    assert set(step["at_peak"]) == {
        "parameters", "buffers", "inputs", "gradients", "optimizer_state", "activations", "temporaries"}
    assert sum(step["at_peak"].values()) == step["peak_bytes"]
    assert step["peak_phase"] in ("forward", "loss", "backward", "optimizer")
    assert step["at_peak"]["parameters"] >= 11_689_512 * 4
    assert step["forward_macs"] * 2 == step["forward_flops"] > 0
    assert step["backward_flops"] > step["forward_flops"]
    rows = {row["name"]: row for row in step["rows"]}
    assert rows["layer1"]["saved_activation_bytes"] > 0 and rows["layer1"]["backward_flops"] > 0


def test_human_report() -> None:
    result = invoke("resnet18", "--train", "--input-size", "3,64,64", "--depth", "1", "--optimizer", "sgd")
    assert result.exit_code == 0, result.output
    for text in ("one training step (sgd, float32, meta (traced), modelling cuda)", "Saved for backward",
                 "Bwd FLOPs", "optimizer state", "in the ", "the step adds", "layer4"):
        assert text in result.stdout, text


def test_amp_and_dtype_and_target() -> None:
    amp = json.loads(invoke("resnet18", "--train", "--input-size", "3,64,64", "--amp", "--json").stdout)["step"]
    assert amp["amp"] == "bfloat16" and amp["dtype"] == "float32"
    half = json.loads(invoke("resnet18", "--train", "--input-size", "3,64,64", "--amp", "--dtype", "fp16",
                             "--json").stdout)["step"]
    assert half["amp"] == "float16"
    pure = json.loads(invoke("resnet18", "--train", "--input-size", "3,64,64", "--dtype", "bf16",
                             "--target", "cpu", "--json").stdout)["step"]
    assert pure["amp"] is None and pure["dtype"] == "bfloat16" and pure["target"] == "cpu"
    assert pure["at_peak"]["parameters"] * 2 == 11_689_512 * 4


def test_a_real_cpu_step_matches_the_meta_trace_of_the_cpu() -> None:
    args = ["resnet18", "--train", "--input-size", "3,64,64", "--batch-size", "2", "--json"]
    real = json.loads(invoke(*args, "--device", "cpu").stdout)["step"]
    traced = json.loads(invoke(*args, "--device", "meta", "--target", "cpu").stdout)["step"]
    assert real["device"] == "cpu"
    assert real["at_peak"] == traced["at_peak"] and real["backward_flops"] == traced["backward_flops"]


def test_user_model_with_input_spec_and_batch_sweep(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "tagger.py").write_text(TAGGER)
    monkeypatch.chdir(tmp_path)
    result = invoke("tagger.py:Tagger", "--train", "--input-spec", SPEC, "--sweep", "batch=1,4", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["step"]["device"] == "cpu"  # your own code runs on the CPU, as in summary
    assert [row["batch"] for row in data["sweep"]] == [1, 4]
    assert data["sweep"][1]["forward_flops"] == 4 * data["sweep"][0]["forward_flops"]
    assert data["step"]["inputs"][0][0] == [2, 12]


def test_input_sweep() -> None:
    result = invoke("resnet18", "--train", "--input-size", "3,64,64", "--batch-size", "2", "--sweep",
                    "input=3x32x32,3x64x64", "--json")
    data = json.loads(result.stdout)
    assert [row["input_size"] for row in data["sweep"]] == [[3, 32, 32], [3, 64, 64]]
    assert data["sweep"][1]["forward_flops"] > 3.5 * data["sweep"][0]["forward_flops"]
    human = invoke("resnet18", "--train", "--input-size", "3,64,64", "--sweep", "batch=1,2", "--depth", "1")
    assert "Sweep" in human.stdout and "step adds" in human.stdout


def test_fit_finds_the_largest_batch() -> None:
    args = ["resnet18", "--train", "--input-size", "3,64,64", "--json"]
    result = invoke(*args, "--fit", "500MiB")
    assert result.exit_code == 0, result.output
    fit = json.loads(result.stdout)["fit"]
    batch = fit["batch_size"]
    assert fit["budget_bytes"] == 500 << 20 and fit["budget_from"] == "--fit"
    assert fit["peak_bytes"] <= 500 << 20 < fit["next_peak_bytes"]
    points = {p["batch_size"]: p["peak_bytes"] for p in fit["points"]}
    assert points[batch] == fit["peak_bytes"] and points[batch + 1] == fit["next_peak_bytes"]
    # The same peaks as one estimate at that batch.
    alone = json.loads(invoke(*args, "--batch-size", str(batch)).stdout)["step"]
    assert alone["peak_bytes"] == fit["peak_bytes"]
    human = invoke("resnet18", "--train", "--input-size", "3,64,64", "--fit", "500MiB", "--depth", "1")
    assert f"the largest batch that fits 500.0 MiB (--fit) is {batch}" in human.stdout


def test_fit_when_nothing_fits() -> None:
    result = invoke("resnet18", "--train", "--input-size", "3,64,64", "--fit", "1MiB", "--json")
    assert json.loads(result.stdout)["fit"]["batch_size"] == 0
    human = invoke("resnet18", "--train", "--input-size", "3,64,64", "--fit", "1MiB", "--depth", "1")
    assert "not even batch 1 fits" in human.stdout


def test_fit_auto_uses_the_gpu_select_would_pick(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    nvml = FakeNvml([make_gpu(0, total_gib=80, used_gib=79.9), make_gpu(1, total_gib=80, used_gib=78)])
    monkeypatch.setattr(gpu, "load_nvml", lambda: nvml)
    result = invoke("resnet18", "--train", "--input-size", "3,64,64", "--fit", "auto", "--json")
    assert result.exit_code == 0, result.output
    fit = json.loads(result.stdout)["fit"]
    assert fit["budget_bytes"] == 2 * GIB
    assert fit["budget_from"].startswith("GPU 1 (NVIDIA H100 80GB HBM3, GPU-00000001")
    assert fit["peak_bytes"] <= 2 * GIB < fit["next_peak_bytes"]


def test_fit_auto_without_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu, "load_nvml", lambda: None)
    result = invoke("resnet18", "--train", "--input-size", "3,64,64", "--fit", "auto")
    assert result.exit_code == 3
    assert "--fit auto" in result.stderr and "--fit 24GiB" in result.stderr


@pytest.mark.parametrize(("args", "code", "text"), [
    (["--train", "--fit", "0"], 2, "above zero"),
    (["--train", "--fit", "lots"], 2, "invalid size"),
    (["--train", "--sweep", "batch=0"], 2, "from 1 to"),
    (["--train", "--sweep", "depth=3"], 2, "batch=N"),
    (["--train", "--optimizer", "lion"], 2, "lion"),
    (["--optimizer", "sgd"], 1, "add --train"),
    (["--amp"], 1, "add --train"),
    (["--train", "--device", "cpu", "--target", "cuda"], 1, "--target"),
    (["--train", "--device", "cpu", "--fit", "1GiB"], 1, "meta device"),
    (["--train", "--device", "cpu", "--sweep", "input=3x100000x100000"], 1, "cannot make the inputs"),
])
def test_refusals_are_one_line(args: list[str], code: int, text: str) -> None:
    result = invoke("resnet18", "--input-size", "3,64,64", *args)
    assert result.exit_code == code, result.output
    assert text in " ".join(result.output.replace("│", " ").split())  # usage errors come in a box
    if code == 1:
        assert result.stdout == "" and len(result.stderr.strip().splitlines()) == 1


def test_help_shows_the_training_options() -> None:
    result = runner.invoke(app, ["summary", "--help"], env={"COLUMNS": "200"})
    for option in ("--train", "--optimizer", "--amp", "--target", "--sweep", "--fit"):
        assert option in result.stdout
