"""``ptools inspect-state-dict`` through CliRunner and as a real process."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ptools.cli.app import app
from tests.checkpoint_fixtures import save_safetensors, save_zip, tiny_net, training_checkpoint

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, ["inspect-state-dict", *map(str, args)])


@pytest.fixture
def training_file(tmp_path: Path) -> Path:
    return save_zip(training_checkpoint(tiny_net(), "plain"), tmp_path / "train.pt")


def test_human_listing(training_file: Path) -> None:
    result = run(training_file)
    assert result.exit_code == 0, result.output
    for text in ("Checkpoint structure", "model_state_dict", "optimizer state", "State dict (9 tensors)",
                 "conv.weight", "4×3×3×3", "float32", "bn.num_batches_tracked", "buffer", "Totals",
                 "(inferred from names)"):
        assert text in result.stdout, text
    assert "\x1b[" not in result.stdout
    assert result.stderr.startswith("state dict: model_state_dict — a conventional key for model weights")


def test_json_is_the_listing(training_file: Path) -> None:
    data = json.loads(run(training_file, "--json").stdout)
    model = tiny_net()
    assert data["format"] == "torch-zip"
    assert data["state_dict"]["key"] == "model_state_dict"
    assert [t["name"] for t in data["tensors"]] == list(model.state_dict())
    conv = data["tensors"][0]
    assert (conv["shape"], conv["dtype"], conv["numel"], conv["bytes"], conv["device"]) == (
        [4, 3, 3, 3], "float32", 108, 432, "cpu")
    assert data["totals"]["tensors"] == 9
    assert data["totals"]["parameters"]["numel"] == sum(p.numel() for p in model.parameters())
    assert {e["key"] for e in data["structure"]} == {"model_state_dict", "optimizer_state_dict", "epoch", "loss"}


def test_ndjson_filter_and_key(training_file: Path) -> None:
    result = run(training_file, "--ndjson", "--filter", r"^bn\.")
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["name"] for r in rows] == ["bn.weight", "bn.bias", "bn.running_mean", "bn.running_var",
                                          "bn.num_batches_tracked"]
    optimizer = json.loads(run(training_file, "--json", "--key", "optimizer_state_dict.state").stdout)
    assert optimizer["state_dict"] == {"key": "optimizer_state_dict.state", "how": "given with --key"}
    assert len(optimizer["tensors"]) == 18


def test_tree(training_file: Path) -> None:
    data = json.loads(run(training_file, "--json", "--tree", "--depth", "1").stdout)
    groups = {g["prefix"]: g["tensors"] for g in data["tree"]}
    assert groups == {"conv": 2, "bn": 5, "head": 2}
    human = run(training_file, "--tree")
    assert "Tensors by module prefix" in human.stdout


def test_stats_and_check_finite(tmp_path: Path) -> None:
    path = save_zip({"ok": torch.tensor([1.0, 2.0, 3.0]), "bad": torch.tensor([1.0, float("nan"), float("inf")]),
                     "ints": torch.arange(4)}, tmp_path / "nan.pt")
    data = json.loads(run(path, "--json", "--stats").stdout)
    stats = {t["name"]: t["stats"] for t in data["tensors"]}
    assert stats["ok"] == {"min": 1.0, "max": 3.0, "mean": 2.0, "std": 1.0, "nan": 0, "inf": 0}
    assert (stats["bad"]["nan"], stats["bad"]["inf"]) == (1, 1)
    checked = run(path, "--check-finite")
    assert checked.exit_code == 1
    assert "error: 1 of 3 tensors hold NaN or Inf: bad (1 NaN, 1 Inf)" in checked.stderr
    assert "bad" in checked.stdout  # the listing is still printed
    good = run(path, "--check-finite", "--filter", "ok|ints")
    assert good.exit_code == 0 and "all 2 tensors are finite" in good.stderr


def test_streaming_stats_as_ndjson(tmp_path: Path) -> None:
    path = save_zip({f"w{i}": torch.full((3,), float(i)) for i in range(4)}, tmp_path / "w.pt")
    lines = [json.loads(line) for line in run(path, "--ndjson", "--stats").stdout.splitlines()]
    assert [line["stats"]["mean"] for line in lines] == [0.0, 1.0, 2.0, 3.0]


def test_diff_detects_prefix_and_shows_fix(tmp_path: Path) -> None:
    model = tiny_net()
    ddp = save_zip(collections.OrderedDict((f"module.{k}", v) for k, v in model.state_dict().items()),
                   tmp_path / "ddp.pt")
    plain = save_zip(model.state_dict(), tmp_path / "plain.pt")
    result = run(ddp, "--diff", plain, "--values")
    assert result.exit_code == 0, result.output
    assert f"Fix: ptools convert-ckpt {ddp} OUT --strip-prefix module." in result.stdout
    assert "Values: 0 of 9 compared tensors differ" in result.stdout
    data = json.loads(run(ddp, "--diff", plain, "--json").stdout)
    # Equal once `module.` is removed, which is not the same keys: two fields say which.
    assert data["prefix"]["prefix"] == "module." and data["common"] == 9
    assert data["identical_after_prefix"] and not data["identical"]
    assert "after removing the prefix 'module.' from A" in result.stdout
    assert data["compared"] == "bytes" and [v["equal"] for v in data["values"]] == [True] * 9


def test_diff_compares_values_by_default(tmp_path: Path) -> None:
    """Same keys, shapes and dtypes but one value changed: not identical, and it says what it compared."""
    a = save_zip({"w": torch.ones(64, 64), "b": torch.zeros(3)}, tmp_path / "a.pt")
    changed = torch.ones(64, 64)
    changed[63, 63] = 1 + 2**-20
    b = save_safetensors({"w": changed, "b": torch.zeros(3)}, tmp_path / "b.safetensors")
    human = run(a, "--diff", b)
    assert human.exit_code == 0, human.output
    assert "identical        │ no (compared: keys, shapes, dtypes and the bytes of every common tensor)" in human.stdout
    assert "Values differ in 1 of 2 compared tensors" in human.stdout
    data = json.loads(run(a, "--diff", b, "--json").stdout)
    assert (data["identical"], data["values_differ"]) == (False, 1)
    assert data["values"] == [{"name": "w", "equal": False}, {"name": "b", "equal": True}]
    keys = json.loads(run(a, "--diff", b, "--json", "--keys-only").stdout)
    assert (keys["compared"], keys["values"], keys["identical"]) == ("keys", None, True)
    numbers = json.loads(run(a, "--diff", b, "--json", "--values").stdout)
    w = numbers["values"][0]
    assert w["max_abs_diff"] == pytest.approx(2**-20) and w["max_rel_diff"] == pytest.approx(2**-20 / (1 + 2**-20))


def test_diff_bytes_are_bit_exact(tmp_path: Path) -> None:
    """-0.0 and 0.0 are equal numbers but not the same bytes; a strided view compares by element."""
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    a = save_zip({"z": torch.zeros(4), "view": base.t()}, tmp_path / "a.pt")
    b = save_zip({"z": -torch.zeros(4), "view": base.t().contiguous()}, tmp_path / "b.pt")
    data = json.loads(run(a, "--diff", b, "--json").stdout)
    assert {v["name"]: v["equal"] for v in data["values"]} == {"z": False, "view": True}


def test_diff_across_formats_as_ndjson(tmp_path: Path) -> None:
    a = save_zip({"w": torch.ones(2, 2), "only_a": torch.ones(1)}, tmp_path / "a.pt")
    b = save_safetensors({"w": torch.zeros(2, 2), "only_b": torch.ones(1)}, tmp_path / "b.safetensors")
    lines = [json.loads(line) for line in run(a, "--diff", b, "--values", "--ndjson").stdout.splitlines()]
    assert {"change": "only_in_a", "name": "only_a"} in lines
    assert {"change": "only_in_b", "name": "only_b"} in lines
    assert {"change": "values", "name": "w", "equal": False, "max_abs_diff": 1.0, "max_rel_diff": 1.0} in lines


@pytest.mark.parametrize(("args", "message"), [
    (["--json", "--ndjson"], "error: choose one of --json and --ndjson"),
    (["--values"], "error: --values needs --diff OTHER"),
    (["--filter", "(("], "error: --filter '((' is not a valid regular expression"),
    (["--key", "nope"], "error: --key 'nope': no key 'nope' at the top level"),
])
def test_bad_options(training_file: Path, args: list[str], message: str) -> None:
    result = run(training_file, *args)
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1].startswith(message)


def test_bad_files_give_one_line(tmp_path: Path) -> None:
    lfs = tmp_path / "model.bin"
    lfs.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 9\n")
    result = run(lfs)
    assert result.exit_code == 1
    assert result.stderr == f"error: {lfs}: this is a Git LFS pointer, not the checkpoint itself (run `git lfs pull` to download the real file)\n"
    missing = run(tmp_path / "missing.pt")
    assert (missing.exit_code, missing.stderr) == (1, f"error: {tmp_path / 'missing.pt'}: no such file\n")


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_unsafe_file_is_refused_with_the_trust_hint(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = save_zip({"w": torch.ones(1), "x": Payload(marker)}, tmp_path / "evil.pt")
    result = run(path)
    assert result.exit_code == 1
    assert "needs globals that are not known to be safe: posix.system" in result.stderr
    assert "pass --trust only if you made this file" in result.stderr
    assert not marker.exists()


def test_real_process_lists_without_importing_torch(tmp_path: Path) -> None:
    path = save_zip(training_checkpoint(tiny_net(), "timm"), tmp_path / "timm.pth")
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "ptools", "inspect-state-dict",
                             str(path), "--json"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["state_dict"]["key"] == "state_dict"
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0]
                for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert not imported & {"torch", "numpy"}


def test_shipped_examples() -> None:
    root = Path(__file__).resolve().parents[2] / "examples"
    listing = json.loads(run(root / "ddp_checkpoint.pt", "--json").stdout)
    assert listing["state_dict"]["key"] == "model_state_dict"
    assert all(t["name"].startswith("module.") for t in listing["tensors"])
    diff = json.loads(run(root / "ddp_checkpoint.pt", "--diff", root / "plain_weights.safetensors",
                          "--values", "--json").stdout)
    assert diff["prefix"]["prefix"] == "module." and diff["identical_after_prefix"] and not diff["identical"]


def test_filter_matching_nothing_says_so(tmp_path: Path) -> None:
    path = save_zip(tiny_net().state_dict(), tmp_path / "m.pt")
    result = run(path, "--filter", "^attn")
    assert result.exit_code == 0
    assert "warning: --filter '^attn' matches none of the 9 tensor names" in result.stderr


def test_narrow_terminal_never_cuts_names_shapes_or_numbers(tmp_path: Path) -> None:
    long_name = "encoder.layers.0.self_attention.in_proj_weight_with_a_long_name"
    path = save_zip({long_name: torch.zeros(1024, 2048), "lstm.weight_hh_l0_reverse": torch.zeros(4096, 1024)},
                    tmp_path / "long.pt")
    result = runner.invoke(app, ["inspect-state-dict", str(path)], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    assert "…" not in result.stdout
    assert "lstm.weight_hh_l0_reverse" in result.stdout and "1024×2048" in result.stdout
    cells = [line.split("│")[1].strip() for line in result.stdout.splitlines() if line.startswith("│")]
    assert long_name in "".join(cells)  # folded onto two lines, whole
    assert "not shown at 80 columns: Shares storage with, Device, Kind, Elements" in " ".join(result.stdout.split())
    wide = runner.invoke(app, ["inspect-state-dict", str(path)], env={"COLUMNS": "200"})
    assert "not shown" not in wide.stdout and "4,194,304" in wide.stdout
