"""DeepSpeed ZeRO checkpoints: real ones made by DeepSpeed (tests/data/zero, see make_zero.py
there), read without DeepSpeed and compared bit for bit with DeepSpeed's own consolidation
(``expected.pt`` beside each, written by ``get_fp32_state_dict_from_zero_checkpoint``)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ptools.core.checkpoint import list_checkpoint, open_checkpoint, read_tensor
from ptools.core.convert import convert_checkpoint
from ptools.errors import BadInputError

DATA = Path(__file__).resolve().parents[1] / "data" / "zero"
CONFIGS = ("1-fp32", "2-fp32", "3-fp32", "1-bf16", "2-bf16", "3-bf16", "2-fp16", "3-fp16")
# The same model on 3 ranks: other cuts and other padding.
ALL_CONFIGS = (*CONFIGS, "world3/2-bf16", "world3/3-fp32")
# The model make_zero.py trains: embed (37x12, tied to head), proj (12->13), norm (13), a frozen
# Linear(13, 12); buffers scale (13, float) and seen (int64); scratch is not persistent.
MODEL_PARAMETERS = 37 * 12 + (12 * 13 + 13) + 2 * 13 + (13 * 12 + 12)
FROZEN = ("frozen.weight", "frozen.bias")


def _torch_bits(tensor: object) -> bytes:
    import torch

    assert isinstance(tensor, torch.Tensor)
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _ptools_bits(checkpoint: object, name: str) -> bytes:
    values = read_tensor(checkpoint, checkpoint.root[name])  # type: ignore[attr-defined]
    tensor = checkpoint.root[name]  # type: ignore[attr-defined]
    if tensor.dtype == "bfloat16":  # read_tensor widens bf16 to fp32: the top halves are the bits
        return (np.ascontiguousarray(values).view(np.uint32) >> 16).astype("<u2").tobytes()
    return np.ascontiguousarray(values).tobytes()


def _expected(config: str) -> dict[str, object]:
    return _expected_at(DATA / config)


def _module(config: str) -> dict[str, object]:
    """The module weights DeepSpeed saved (stage 1-2 model-states file; weights_only loads it)."""
    import torch

    return torch.load(DATA / config / "global_step2" / "mp_rank_00_model_states.pt", weights_only=True)["module"]


@pytest.mark.parametrize("config", ALL_CONFIGS)
def test_master_weights_equal_deepspeeds_consolidation_bit_for_bit(config: str) -> None:
    checkpoint = open_checkpoint(DATA / config)
    expected = _expected(config)
    assert checkpoint.format == "deepspeed"
    for name, tensor in expected.items():
        info = checkpoint.root[name]
        assert info.dtype == str(tensor.dtype).removeprefix("torch."), name
        assert info.shape == tuple(tensor.shape), name
        assert _ptools_bits(checkpoint, name) == _torch_bits(tensor), name
    extra = set(checkpoint.root) - set(expected)
    if config.startswith("1-"):
        # ZeRO-1 records no frozen parameters and DeepSpeed's consolidation drops them; ptools
        # reads them from the module, where they are whole.
        assert extra == set(FROZEN)
        module = _module(config)
        for name in FROZEN:
            assert _ptools_bits(checkpoint, name) == _torch_bits(module[name])
    else:
        assert not extra


@pytest.mark.parametrize("config", ALL_CONFIGS)
def test_layout_is_read_from_metadata_alone(config: str) -> None:
    checkpoint = open_checkpoint(DATA / config)
    details = checkpoint.details["deepspeed"]
    stage, dtype = config.rsplit("/", 1)[-1].split("-")
    assert details["zero_stage"] == int(stage)
    assert details["world_size"] == (3 if config.startswith("world3/") else 2)
    assert details["tag"] == "global_step2"
    assert details["training_dtype"] == {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype]
    assert details["tied"] == {"head.weight": "embed.weight"}
    assert details["buffers"] == ["scale", "seen"]
    # The model's own state_dict order; the tied name is the very same tensor.
    assert list(checkpoint.root) == [
        "scale", "seen", "embed.weight", "proj.weight", "proj.bias", "norm.weight", "norm.bias",
        "frozen.weight", "frozen.bias", "head.weight",
    ]  # fmt: skip
    assert checkpoint.root["head.weight"] is checkpoint.root["embed.weight"]
    assert checkpoint.root["frozen.weight"].requires_grad is False
    assert checkpoint.root["proj.weight"].requires_grad is True
    listing = list_checkpoint(checkpoint)
    kinds = {row.name: row.kind for row in listing.rows}
    assert kinds["scale"] == kinds["seen"] == "buffer" and kinds["head.weight"] == "parameter"
    assert listing.totals()["storage_bytes"] < listing.totals()["bytes"]  # the tie counted once


def test_run_folder_step_folder_and_tag_open_the_same_step(tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(DATA / "2-fp32", run)
    shutil.copytree(run / "global_step2", run / "global_step1")
    by_run = open_checkpoint(run)
    by_step = open_checkpoint(run / "global_step2")
    by_tag = open_checkpoint(run, tag="global_step1")
    assert by_tag.details["deepspeed"]["tag"] == "global_step1"
    for name in by_run.root:
        assert _ptools_bits(by_run, name) == _ptools_bits(by_step, name) == _ptools_bits(by_tag, name)
    (run / "latest").unlink()
    with pytest.raises(BadInputError, match=r"without a `latest` file \(step folders here: global_step1, global_step2\)"):
        open_checkpoint(run)
    with pytest.raises(BadInputError, match="no step folder 'global_step9'"):
        open_checkpoint(run, tag="global_step9")
    with pytest.raises(BadInputError, match="`tag` applies to DeepSpeed"):
        open_checkpoint(DATA / "2-fp32" / "expected.pt", tag="global_step2")


@pytest.mark.parametrize("config", ["1-bf16", "2-bf16", "2-fp16", "2-fp32"])
def test_module_weights_are_the_saved_16_bit_weights(config: str) -> None:
    checkpoint = open_checkpoint(DATA / config, weights="module")
    module = _module(config)
    assert list(checkpoint.root) == list(module)
    for name, tensor in module.items():
        assert _ptools_bits(checkpoint, name) == _torch_bits(tensor), name
    if config == "2-fp32":  # trained in fp32, the module holds the master weights themselves
        master = open_checkpoint(DATA / config)
        assert all(_ptools_bits(master, n) == _ptools_bits(checkpoint, n) for n in module)


def test_stage3_module_weights_are_refused_with_what_to_do_instead() -> None:
    with pytest.raises(BadInputError, match="ZeRO-3 saves no module weights") as failure:
        open_checkpoint(DATA / "3-bf16", weights="module")
    assert "bfloat16" in failure.value.hint


def test_missing_rank_file_and_mismatched_runs_fail_cleanly(tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(DATA / "3-bf16", run)
    (run / "global_step2" / "zero_pp_rank_1_mp_rank_00_model_states.pt").unlink()
    with pytest.raises(BadInputError, match="model-states file.* of rank.*1 are missing"):
        open_checkpoint(run)
    mixed = tmp_path / "mixed"
    shutil.copytree(DATA / "2-fp32", mixed)
    shutil.copy(
        DATA / "3-fp32" / "global_step2" / "zero_pp_rank_1_mp_rank_00_optim_states.pt",
        mixed / "global_step2" / "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    )
    with pytest.raises(BadInputError, match="from another run"):
        open_checkpoint(mixed)


@pytest.mark.parametrize("config", ["2-bf16", "3-fp32", "3-bf16"])
@pytest.mark.parametrize("output", ["model.safetensors", "model.pt", "shards"])
def test_convert_writes_the_consolidated_weights(config: str, output: str, tmp_path: Path) -> None:
    import torch

    destination = tmp_path / output
    report = convert_checkpoint(
        DATA / config, destination, verify=True, shard_size=1000 if output == "shards" else None
    )
    assert report.verified
    expected = _expected(config)
    if output == "model.safetensors":
        from safetensors import safe_open

        with safe_open(destination, "pt") as handle:
            written = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
            assert handle.metadata()["head.weight"] == "embed.weight"  # the tie, stored once
        assert "head.weight" not in written
        written["head.weight"] = written["embed.weight"]
    elif output == "model.pt":
        written = torch.load(destination, weights_only=True)
        assert written["head.weight"].data_ptr() == written["embed.weight"].data_ptr()
    else:
        index = json.loads((destination / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1
        written = dict(open_checkpoint(destination).root)
        checkpoint = open_checkpoint(destination)
        for name, tensor in expected.items():
            assert _ptools_bits(checkpoint, name) == _torch_bits(tensor), name
        return
    assert set(written) == set(expected)
    for name, tensor in expected.items():
        assert _torch_bits(written[name]) == _torch_bits(tensor), name


def test_convert_casts_the_master_weights_like_torch(tmp_path: Path) -> None:
    import torch

    destination = tmp_path / "bf16.safetensors"
    convert_checkpoint(DATA / "3-fp32", destination, dtype="bf16", verify=True)
    from safetensors.torch import load_file

    written = load_file(destination)
    for name, tensor in _expected("3-fp32").items():
        if name == "head.weight":
            continue
        want = tensor.to(torch.bfloat16) if tensor.is_floating_point() else tensor
        assert _torch_bits(written[name]) == _torch_bits(want), name


def test_counts_and_diff_match_the_model(tmp_path: Path) -> None:
    from ptools.core.models import count_checkpoint

    for config in ALL_CONFIGS:
        counts = count_checkpoint(str(DATA / config)).to_dict()
        assert counts["total"] == MODEL_PARAMETERS, config
        assert counts["trainable"] == MODEL_PARAMETERS - (13 * 12 + 12), config
    destination = tmp_path / "model.safetensors"
    convert_checkpoint(DATA / "2-bf16", destination)
    from ptools.core.checkpoint import diff_state_dicts

    a = open_checkpoint(DATA / "2-bf16")
    b = open_checkpoint(destination)
    result = diff_state_dicts(list_checkpoint(a), a, list_checkpoint(b), b).to_dict()
    assert result["identical"], result
    c = open_checkpoint(DATA / "2-fp32")
    result = diff_state_dicts(list_checkpoint(a), a, list_checkpoint(c), c).to_dict()
    assert not result["identical"]


def test_cli_inspect_shows_the_run_and_json_carries_it() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "ptools", "inspect-state-dict", str(DATA / "3-bf16"), "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    data = json.loads(run.stdout)
    assert data["format"] == "deepspeed"
    assert data["deepspeed"]["zero_stage"] == 3 and data["deepspeed"]["world_size"] == 2
    assert [t["name"] for t in data["tensors"]][-1] == "head.weight"
    human = subprocess.run(
        [sys.executable, "-m", "ptools", "inspect-state-dict", str(DATA / "3-bf16")],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "COLUMNS": "160"},
    )
    assert "DeepSpeed ZeRO-3 · world size 2 · step global_step2 · trained in bfloat16" in human.stdout


# ----------------------------------------------------------------------------- with DeepSpeed


@pytest.mark.deepspeed
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed")
def test_fresh_deepspeed_checkpoints_match_deepspeeds_consolidation(tmp_path: Path) -> None:
    """Regenerate every fixture with the DeepSpeed installed here and compare again: the
    committed fixtures are from one DeepSpeed version; this catches a layout change."""
    subprocess.run([sys.executable, str(DATA / "make_zero.py"), str(tmp_path)], check=True, capture_output=True)
    for config in CONFIGS:
        checkpoint = open_checkpoint(tmp_path / config)
        expected = _expected_at(tmp_path / config)
        for name, tensor in expected.items():
            assert _ptools_bits(checkpoint, name) == _torch_bits(tensor), (config, name)


def _expected_at(folder: Path) -> dict[str, object]:
    import torch

    return torch.load(folder / "expected.pt", weights_only=True)


def test_alignment_paddings_of_a_group_past_64_parameters(tmp_path: Path) -> None:
    """``param_alignment_paddings`` is one count per parameter, not a shape: a group of 70
    parameters (most real models) is read, each parameter after its padding."""
    import struct

    from tests.hostile.corpus import zero_run

    count = 70
    shapes = {f"p{index}": (1,) for index in range(count)}
    paddings = [[1] * count]  # one padding element after every parameter
    world, total = 2, 2 * count  # 70 values + 70 paddings, split over 2 ranks
    run = zero_run(tmp_path, shapes=shapes, partitions=[total // world] * world, paddings=paddings)
    values = [float(index if position % 2 == 0 else -1) for position, index in
              ((position, position // 2) for position in range(total))]
    step = run / "global_step1"
    import zipfile
    for rank in range(world):
        path = step / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
        with zipfile.ZipFile(path) as archive:
            members = {info.filename: archive.read(info) for info in archive.infolist()}
        half = values[rank * count:(rank + 1) * count]
        members["archive/data/0"] = struct.pack(f"<{count}f", *half)
        with zipfile.ZipFile(path, "w") as archive:
            for name, data in members.items():
                archive.writestr(zipfile.ZipInfo(name), data)
    checkpoint = open_checkpoint(run)
    assert [float(read_tensor(checkpoint, checkpoint.root[f"p{index}"])[0]) for index in range(count)] == [
        float(index) for index in range(count)
    ]
