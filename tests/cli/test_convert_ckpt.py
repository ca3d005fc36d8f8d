"""``ptools convert-ckpt`` through CliRunner and as a real process."""

from __future__ import annotations

import collections
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ptools.cli.app import app
from tests.checkpoint_fixtures import save_zip, tiny_net, training_checkpoint

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, ["convert-ckpt", *map(str, args)])


@pytest.fixture
def ddp_file(tmp_path: Path) -> Path:
    model = tiny_net()
    checkpoint = training_checkpoint(model, "plain")
    checkpoint["model_state_dict"] = collections.OrderedDict(
        (f"module.{k}", v) for k, v in checkpoint["model_state_dict"].items())
    return save_zip(checkpoint, tmp_path / "ddp.pt")


def test_summary_on_stderr_and_nothing_on_stdout(ddp_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "weights.safetensors"
    result = run(ddp_file, out, "--extract", "auto", "--strip-prefix", "auto", "--dtype", "bf16",
                 "--keep-dtype", "bn", "--verify")
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    assert f"wrote {out} (safetensors): 9 tensors" in result.stderr
    assert "stripped prefix 'module.'" in result.stderr
    assert "verified: every tensor matches the input" in result.stderr
    from safetensors.torch import load_file

    loaded = load_file(str(out))
    assert loaded["conv.weight"].dtype == torch.bfloat16 and loaded["bn.weight"].dtype == torch.float32


def test_json_report(ddp_file: Path, tmp_path: Path) -> None:
    data = json.loads(run(ddp_file, tmp_path / "slim.pt", "--drop-optimizer", "--map-location", "cuda:0",
                          "--json").stdout)
    assert data["dropped_entries"] == ["optimizer_state_dict"]
    assert data["devices"] == {"cpu": "cuda:0"}
    assert data["output_format"] == "torch" and data["tensors"] == 9
    assert "plan" not in data


def test_dry_run_prints_the_plan(ddp_file: Path, tmp_path: Path) -> None:
    result = run(ddp_file, tmp_path / "x.pt", "--strip-prefix", "auto", "--drop", "head", "--dry-run")
    assert result.exit_code == 0
    assert "nothing written" in result.stdout
    assert "model_state_dict.module.conv.weight" in result.stdout and "(dropped)" in result.stdout
    assert not (tmp_path / "x.pt").exists()
    plan = json.loads(run(ddp_file, tmp_path / "x.pt", "--dry-run", "--json").stdout)["plan"]
    assert len(plan) == 9 + 18  # the state dict and the optimizer's tensors


@pytest.mark.parametrize(("args", "message"), [
    (["{src}", "{src}", "--force"], "is the input (or part of it); ptools never overwrites its input"),
    (["{src}", "{tmp}/out.onnx"], "cannot tell the output format"),
    (["{src}", "{tmp}/o.pt", "--rename", "(="], "--rename '(=': invalid regular expression"),
    (["{src}", "{tmp}/missing/o.pt"], "does not exist"),
    (["{tmp}/nope.pt", "{tmp}/o.pt"], "nope.pt: no such file"),
    (["{src}", "{tmp}/o.safetensors"], "safetensors holds only a flat dict of tensors"),
])
def test_errors_are_one_line_exit_1(ddp_file: Path, tmp_path: Path, args: list[str], message: str) -> None:
    result = run(*[a.format(src=ddp_file, tmp=tmp_path) for a in args])
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp.pt"]


def test_real_process_copies_without_importing_torch(ddp_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "plain.pt"
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "ptools", "convert-ckpt", str(ddp_file),
                             str(out), "--strip-prefix", "auto", "--map-location", "cpu"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0]
                for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert "torch" not in imported
    loaded = torch.load(out, weights_only=True)
    tiny_net(seed=2).load_state_dict(loaded["model_state_dict"])


def test_inspect_fix_suggestion_works(tmp_path: Path) -> None:
    """The fix inspect-state-dict --diff prints is a command that really fixes the file."""
    state = tiny_net().state_dict()
    plain = save_zip(state, tmp_path / "plain.pt")
    ddp_file = save_zip({"model_state_dict": collections.OrderedDict((f"module.{k}", v) for k, v in state.items()),
                         "epoch": 1}, tmp_path / "ddp.pt")
    diff = json.loads(runner.invoke(app, ["inspect-state-dict", str(ddp_file), "--diff", str(plain),
                                          "--json"]).stdout)
    fix = diff["prefix"]["fix"].replace("OUT", str(tmp_path / "fixed.pt")).split()
    assert fix[:2] == ["ptools", "convert-ckpt"]
    assert runner.invoke(app, fix[1:]).exit_code == 0
    again = json.loads(runner.invoke(app, ["inspect-state-dict", str(tmp_path / "fixed.pt"), "--diff",
                                           str(plain), "--values", "--json"]).stdout)
    assert again["a"]["state_dict_key"] == "model_state_dict"
    assert again["prefix"] is None and again["identical"]


def test_cast_warns_about_lost_values_and_skips_optimizer_state(tmp_path: Path) -> None:
    state = collections.OrderedDict(w=torch.tensor([1.0, 1e-9, 7e4, 2.0]))
    checkpoint = {"state_dict": state, "optimizer": {"state": {0: {"exp_avg_sq": torch.full((4,), 1e-10)}},
                                                     "param_groups": [{"params": [0]}]}}
    source = save_zip(checkpoint, tmp_path / "train.ckpt")
    result = run(source, tmp_path / "half.ckpt", "--dtype", "fp16")
    assert result.exit_code == 0, result.output
    assert "1 tensor(s) cast; 0 kept their dtype (--keep-dtype); 1 outside the model weights not cast" \
        in result.stderr
    assert ("warning: the cast lost values in 1 of 1 cast tensor(s): 1 non-zero value(s) became 0 and 1 finite "
            "value(s) became ±inf (most in state_dict.w: 1 to 0, 1 to inf of 4)") in result.stderr
    loaded = torch.load(tmp_path / "half.ckpt", weights_only=True)
    assert loaded["optimizer"]["state"][0]["exp_avg_sq"].dtype == torch.float32
    data = json.loads(run(source, tmp_path / "all.ckpt", "--dtype", "fp16", "--cast-scope", "all", "--json").stdout)
    assert [(loss["names"], loss["to_zero"]) for loss in data["cast_losses"]] == [
        (["state_dict.w"], 1), (["optimizer.state.0.exp_avg_sq"], 4)]


def test_a_safetensors_output_with_tied_names_says_load_file_will_not_restore_them(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from tests.checkpoint_fixtures import TiedLM

    source = save_zip(TiedLM().state_dict(), tmp_path / "tied.pt")
    result = CliRunner().invoke(app, ["convert-ckpt", str(source), str(tmp_path / "out.safetensors")])
    assert result.exit_code == 0, result.stderr
    assert "load_file does not restore them (head.weight is missing" in result.stderr
    assert "head.weight" not in load_file(tmp_path / "out.safetensors")  # what the note says is so
