"""DCP as an output (read back by torch.distributed.checkpoint itself) and averaging checkpoints
(against a float64 reference average computed with torch)."""

from __future__ import annotations

import collections
import os
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ptools.core.checkpoint import open_checkpoint
from ptools.core.convert import convert_checkpoint
from ptools.errors import BadInputError
from tests.checkpoint_fixtures import TiedLM, save_dcp, save_safetensors, save_zip, tiny_net, varied_state_dict


def _bits(tensor: torch.Tensor) -> bytes:
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _dcp_load(folder: Path, like: dict) -> dict:
    """What an FSDP run does with a DCP folder: load it into a state dict of the right shapes."""
    import torch.distributed.checkpoint as dcp

    target = {k: torch.empty_like(v) if isinstance(v, torch.Tensor) else v for k, v in like.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(target, checkpoint_id=str(folder))
    return target


# ---------------------------------------------------------------- DCP output


def test_plain_to_dcp_to_plain_is_bit_exact(tmp_path: Path) -> None:
    state = collections.OrderedDict(
        (k, v) for k, v in varied_state_dict().items() if v.is_contiguous() and not k.startswith("f8.")
    )
    source = save_zip(state, tmp_path / "plain.pt")
    report = convert_checkpoint(source, tmp_path / "dcp", format="dcp", verify=True)
    assert report.verified and report.output_format == "dcp"
    loaded = _dcp_load(tmp_path / "dcp", dict(state))  # torch's own reader
    for name, tensor in state.items():
        assert loaded[name].dtype == tensor.dtype and _bits(loaded[name]) == _bits(tensor), name
    convert_checkpoint(tmp_path / "dcp", tmp_path / "back.pt")
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    assert set(back) == set(state)
    for name, tensor in state.items():
        assert back[name].dtype == tensor.dtype and _bits(back[name]) == _bits(tensor), name


def test_dcp_output_keeps_a_training_checkpoints_nesting(tmp_path: Path) -> None:
    model = tiny_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    optimizer.step()
    source = save_zip({"model": model.state_dict(), "optim": optimizer.state_dict(), "epoch": 4}, tmp_path / "t.pt")
    convert_checkpoint(source, tmp_path / "dcp", format="dcp", verify=True)
    reread = open_checkpoint(tmp_path / "dcp")
    assert list(reread.root) == ["model", "optim", "epoch"]
    assert list(reread.root["model"]) == list(model.state_dict())
    only_model = tmp_path / "model.safetensors"
    report = convert_checkpoint(tmp_path / "dcp", only_model, extract="model")
    assert report.state_dict_key == "model"
    written = load_file(only_model)
    for name, tensor in model.state_dict().items():
        assert _bits(written[name]) == _bits(tensor), name


def test_dcp_output_with_bf16_cast_and_ties(tmp_path: Path) -> None:
    model = TiedLM()
    source = save_zip(model.state_dict(), tmp_path / "lm.pt")  # embed.weight and head.weight: one storage
    convert_checkpoint(source, tmp_path / "dcp", format="dcp", dtype="bf16", verify=True)
    loaded = _dcp_load(tmp_path / "dcp", {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()})
    assert set(loaded) == {"embed.weight", "head.weight"}
    for name, tensor in loaded.items():
        assert _bits(tensor) == _bits(model.state_dict()[name].to(torch.bfloat16)), name


def test_dcp_output_never_replaces_what_it_did_not_write(tmp_path: Path) -> None:
    source = save_zip(tiny_net().state_dict(), tmp_path / "m.pt")
    other = tmp_path / "notes"
    other.mkdir()
    (other / "readme.txt").write_text("mine")
    with pytest.raises(BadInputError, match="not a DCP checkpoint folder"):
        convert_checkpoint(source, other, format="dcp", force=True)
    assert (other / "readme.txt").read_text() == "mine"
    convert_checkpoint(source, tmp_path / "dcp", format="dcp")
    with pytest.raises(BadInputError, match="already holds a DCP checkpoint"):
        convert_checkpoint(source, tmp_path / "dcp", format="dcp")
    convert_checkpoint(source, tmp_path / "dcp", format="dcp", force=True)
    assert sorted(os.listdir(tmp_path / "dcp"))[0] == ".metadata"
    # A folder named like a shard is not DCP output, so the folder holding it is not either.
    (tmp_path / "dcp" / "__9_0.distcp").mkdir()
    (tmp_path / "dcp" / "__9_0.distcp" / "mine.txt").write_text("mine")
    with pytest.raises(BadInputError, match="not a DCP checkpoint folder"):
        convert_checkpoint(source, tmp_path / "dcp", format="dcp", force=True)
    assert (tmp_path / "dcp" / "__9_0.distcp" / "mine.txt").read_text() == "mine"
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".ptools-tmp")]
    with pytest.raises(BadInputError, match="cannot go with `format` dcp"):
        convert_checkpoint(source, tmp_path / "x", format="dcp", shard_size=100)


def test_dcp_input_folder_is_not_an_output(tmp_path: Path) -> None:
    folder = save_dcp({"w": torch.ones(3)}, tmp_path / "dcp")
    with pytest.raises(BadInputError, match="is the input"):
        convert_checkpoint(folder, folder, format="dcp", force=True)


# ---------------------------------------------------------------- averaging


def _three(tmp_path: Path) -> tuple[list[Path], list[dict[str, torch.Tensor]]]:
    torch.manual_seed(0)
    states = []
    for index in range(3):
        states.append(collections.OrderedDict(
            w=torch.randn(64, 9) * 10 ** index, h=torch.randn(33).half(), b=torch.randn(17).bfloat16(),
            d=torch.randn(5, dtype=torch.float64), steps=torch.tensor(7), mask=torch.tensor([True, False]),
        ))
    paths = [save_zip(states[0], tmp_path / "a.pt"), save_safetensors(states[1], tmp_path / "b.safetensors"),
             save_zip({"state_dict": states[2], "epoch": 9}, tmp_path / "c.ckpt")]
    return paths, states


@pytest.mark.parametrize("output", ["avg.safetensors", "avg.pt"])
def test_average_equals_a_float64_reference(tmp_path: Path, output: str) -> None:
    paths, states = _three(tmp_path)
    report = convert_checkpoint(paths, tmp_path / output, average=True, verify=True)
    assert report.verified and report.input_format == "average"
    written = load_file(tmp_path / output) if output.endswith(".safetensors") else torch.load(tmp_path / output)
    for name, first in states[0].items():
        if first.is_floating_point():
            reference = (sum(state[name].double() for state in states) / len(states)).to(first.dtype)
        else:
            reference = first
        assert written[name].dtype == first.dtype and _bits(written[name]) == _bits(reference), name


def test_average_refuses_differing_integers_unless_take_last(tmp_path: Path) -> None:
    paths, states = _three(tmp_path)
    states[1]["steps"] = torch.tensor(8)
    save_safetensors(states[1], paths[1])
    with pytest.raises(BadInputError, match="'steps' is a int64 tensor that differs"):
        convert_checkpoint(paths, tmp_path / "avg.safetensors", average=True)
    assert not (tmp_path / "avg.safetensors").exists()
    report = convert_checkpoint(paths, tmp_path / "avg.safetensors", average=True, take_last=True)
    assert load_file(tmp_path / "avg.safetensors")["steps"].item() == 7  # the last input's
    assert any("last checkpoint's taken" in note for note in report.notes)


def test_average_refuses_different_keys_shapes_and_dtypes(tmp_path: Path) -> None:
    paths, states = _three(tmp_path)
    extra = save_zip({**states[0], "new": torch.ones(2)}, tmp_path / "extra.pt")
    with pytest.raises(BadInputError, match="different keys: 'new'"):
        convert_checkpoint([paths[0], extra], tmp_path / "x.pt", average=True)
    wide = save_zip({**states[0], "w": torch.ones(3)}, tmp_path / "wide.pt")
    with pytest.raises(BadInputError, match="cannot average 'w'"):
        convert_checkpoint([paths[0], wide], tmp_path / "x.pt", average=True)
    with pytest.raises(BadInputError, match="several checkpoints are only read to be averaged"):
        convert_checkpoint(paths, tmp_path / "x.pt")
    with pytest.raises(BadInputError, match="at least two"):
        convert_checkpoint(paths[:1], tmp_path / "x.pt", average=True)
    with pytest.raises(BadInputError, match="is the input"):
        convert_checkpoint(paths, paths[2], average=True, force=True)


def test_average_holds_one_tensor_of_each_input_at_a_time(tmp_path: Path) -> None:
    """The averaged tensor is computed when the writer asks for it; only the last tensor's
    inputs are kept."""
    from ptools.core.average import open_average

    paths, _ = _three(tmp_path)
    checkpoint = open_average(paths)
    reader = checkpoint.read_record.__closure__  # type: ignore[union-attr]
    assert reader is not None
    for name in ("w", "h"):
        tensor = checkpoint.root[name]
        checkpoint.read(tensor.storage, 0, tensor.nbytes)
    kept = [cell.cell_contents for cell in reader if hasattr(cell.cell_contents, "inputs")][0].inputs
    assert kept[0] == "h" and len(kept[1]) == len(paths)  # 'w' was let go


def test_average_keeps_ties_that_every_input_has(tmp_path: Path) -> None:
    torch.manual_seed(1)
    tied = [save_zip(TiedLM().state_dict(), tmp_path / f"tied{i}.pt") for i in range(2)]
    report = convert_checkpoint(tied, tmp_path / "avg.safetensors", average=True, verify=True)
    assert report.aliases == {"head.weight": "embed.weight"}  # written once
    untied_state = {k: v.clone() for k, v in TiedLM().state_dict().items()}
    untied = save_zip(untied_state, tmp_path / "untied.pt")
    report = convert_checkpoint([tied[0], untied], tmp_path / "avg2.safetensors", average=True, verify=True)
    assert report.aliases == {}  # tied in one input only: two tensors
    written = load_file(tmp_path / "avg2.safetensors")
    first = torch.load(tied[0], weights_only=True)
    for name in ("embed.weight", "head.weight"):
        reference = ((first[name].double() + untied_state[name].double()) / 2).float()
        assert _bits(written[name]) == _bits(reference), name


def test_a_real_two_rank_dcp_checkpoint_is_assembled_exactly(tmp_path: Path) -> None:
    """Chunks by rows, by columns, uneven and replicated, as torch writes them from two ranks:
    the tiling check accepts them and the assembled tensors are the whole ones, bit for bit."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "data" / "dcp" / "make_dcp.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(script), str(tmp_path / "ck")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    chunked = open_checkpoint(tmp_path / "ck")
    assert len(chunked.root["cols"].chunks) == 2 and len(chunked.root["uneven"].chunks) == 2
    convert_checkpoint(tmp_path / "ck", tmp_path / "whole.pt")
    whole = torch.load(tmp_path / "whole.pt", weights_only=True)
    full = torch.load(tmp_path / "full.pt", weights_only=True)
    assert set(whole) == set(full)
    for name, tensor in full.items():
        assert _bits(whole[name]) == _bits(tensor), name
