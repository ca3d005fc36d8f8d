"""convert_checkpoint and the key transforms, against torch.load and safetensors."""

from __future__ import annotations

import collections
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ptools.core import convert
from ptools.core.checkpoint import writers
from ptools.core import keys
from ptools.core.convert import convert_checkpoint
from ptools.core.keys import (
    add_prefix,
    cast_floating,
    detect_wrapper_prefix,
    rename_keys,
    select_keys,
    strip_prefix,
)
from ptools.errors import BadInputError, UnsafeFileError
from tests.checkpoint_fixtures import (
    TiedLM,
    as_numpy,
    contiguous_copy,
    retag_devices,
    save_dcp,
    save_legacy,
    save_safetensors,
    save_sharded_bin,
    save_sharded_safetensors,
    save_zip,
    tiny_net,
    training_checkpoint,
    varied_state_dict,
)


def assert_same_tensors(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert list(actual) == list(expected)
    for name, tensor in expected.items():
        got = actual[name]
        assert got.dtype == tensor.dtype, name
        assert got.shape == tensor.shape, name
        np.testing.assert_array_equal(as_numpy(got), as_numpy(tensor), err_msg=name)


def read_output(path: Path) -> dict[str, torch.Tensor]:
    """What a user would load: torch.load (weights_only) or safetensors, shards through the index."""
    if path.is_dir():
        import json

        index = json.loads((path / "model.safetensors.index.json").read_text())
        result = {}
        for name, shard in index["weight_map"].items():
            result[name] = load_file(str(path / shard))[name]
        return result
    if path.suffix == ".safetensors":
        return load_file(str(path))
    return torch.load(path, weights_only=True)


# ---------------------------------------------------------------- every format to every format


def _legacy_safe(state):
    return collections.OrderedDict((k, v) for k, v in state.items() if not k.startswith("f8."))


INPUTS = {
    "zip": lambda state, tmp: save_zip(state, tmp / "in.pt"),
    "legacy": lambda state, tmp: save_legacy(_legacy_safe(state), tmp / "in.pt"),
    "safetensors": lambda state, tmp: save_safetensors(state, tmp / "in.safetensors"),
    "sharded-safetensors": lambda state, tmp: save_sharded_safetensors(state, tmp / "in", shards=3),
    "sharded-bin": lambda state, tmp: save_sharded_bin(state, tmp / "in", shards=2),
    "dcp": lambda state, tmp: save_dcp(dict(state), tmp / "dcp"),
}
OUTPUTS = {"torch": "out.pt", "safetensors": "out.safetensors", "sharded": "out_shards"}


@pytest.mark.parametrize("output", list(OUTPUTS))
@pytest.mark.parametrize("source", list(INPUTS))
def test_round_trip_every_format(tmp_path: Path, source: str, output: str) -> None:
    state = varied_state_dict()
    state.pop("head.weight")  # tied weights have their own test
    if source in ("safetensors", "sharded-safetensors", "dcp"):
        state = contiguous_copy(state)
    if source == "legacy":
        state = _legacy_safe(state)
    if source == "dcp":
        state = collections.OrderedDict((k, v) for k, v in state.items() if not k.startswith("f8."))
    path = INPUTS[source](state, tmp_path)
    destination = tmp_path / OUTPUTS[output]
    report = convert_checkpoint(path, destination, shard_size=300 if output == "sharded" else None,
                                verify=True)
    assert report.verified and report.tensors == len(state)
    result = read_output(destination)
    if source in ("zip", "legacy") and output == "torch":
        assert_same_tensors(result, state)  # key order kept too
    else:  # safetensors, shards and DCP order keys their own way
        assert_same_tensors(dict(sorted(result.items())), dict(sorted(state.items())))
    if output == "sharded":
        assert report.shards > 1


def test_torch_output_loads_with_mmap_and_keeps_views_and_ties(tmp_path: Path) -> None:
    state = varied_state_dict()
    path = save_zip(state, tmp_path / "in.pt")
    convert_checkpoint(path, tmp_path / "out.pt")
    for loaded in (torch.load(tmp_path / "out.pt", weights_only=True),
                   torch.load(tmp_path / "out.pt", weights_only=True, mmap=True)):
        assert_same_tensors(loaded, state)
        assert loaded["view.transposed"].stride() == state["view.transposed"].stride()
        assert loaded["view.rows"].storage_offset() == state["view.rows"].storage_offset()
        assert loaded["embed.weight"].data_ptr() == loaded["head.weight"].data_ptr()
    with zipfile.ZipFile(tmp_path / "out.pt") as archive:
        for info in archive.infolist():
            if "/data/" in info.filename:
                header = info.header_offset + 30 + len(info.filename) + len(info.extra)
                assert header % 64 == 0, info.filename  # aligned like torch.save


def test_parameters_numbers_and_metadata_survive(tmp_path: Path) -> None:
    model = tiny_net()
    state = model.state_dict()
    obj = {"model": state, "param": torch.nn.Parameter(torch.ones(2)), "epoch": 4, "size": torch.Size([2, 3]),
           "device": torch.device("cuda", 1), "dtype": torch.bfloat16, "names": ("a", "b"), "lr": 1e-3}
    convert_checkpoint(save_zip(obj, tmp_path / "in.pt"), tmp_path / "out.pt")
    loaded = torch.load(tmp_path / "out.pt", weights_only=True)
    assert isinstance(loaded["param"], torch.nn.Parameter) and loaded["param"].requires_grad
    assert loaded["size"] == torch.Size([2, 3]) and isinstance(loaded["size"], torch.Size)
    assert loaded["device"] == torch.device("cuda", 1)
    assert loaded["dtype"] is torch.bfloat16
    assert (loaded["epoch"], loaded["names"], loaded["lr"]) == (4, ("a", "b"), 1e-3)
    assert loaded["model"]._metadata == state._metadata
    tiny_net(seed=5).load_state_dict(loaded["model"])


# ---------------------------------------------------------------- devices


def test_cuda_tagged_checkpoint_remapped_to_cpu(tmp_path: Path) -> None:
    state = varied_state_dict()
    path = save_zip(state, tmp_path / "gpu.pt")
    with zipfile.ZipFile(path) as archive:
        keys = {n.rsplit("/", 1)[-1] for n in archive.namelist() if "/data/" in n}
    retag_devices(path, {key: f"cuda:{int(key) % 2}" for key in keys})
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(path, weights_only=True)
    report = convert_checkpoint(path, tmp_path / "cpu.pt", map_location="cpu", verify=True)
    assert report.devices == {"cuda:0": "cpu", "cuda:1": "cpu"}
    assert not any("device tags" in note for note in report.notes)
    assert_same_tensors(torch.load(tmp_path / "cpu.pt", weights_only=True), state)
    # Without map_location the tags are kept, and one note says how to load anywhere.
    kept = convert_checkpoint(path, tmp_path / "still_gpu.pt")
    assert [note for note in kept.notes if "device tags" in note] == [
        "tensors keep their device tags (cuda:0, cuda:1): `map_location='cpu'` writes a file that loads anywhere"
    ]


@pytest.mark.parametrize(("spec", "expected"), [
    ("cuda", {"cpu": "cuda", "cuda:1": "cuda"}),
    ("cuda:1=cuda:0,cuda:2=cuda:0", {"cpu": "cpu", "cuda:1": "cuda:0", "cuda:2": "cuda:0"}),
])
def test_map_location_specs(spec: str, expected: dict[str, str]) -> None:
    relocate = keys.parse_map_location(spec)
    assert {k: relocate(k) for k in expected} == expected


@pytest.mark.parametrize("spec", ["gpu 0", "cuda:x", "cuda:1=", "=cpu", "cuda:1:cpu,"])
def test_bad_map_location(spec: str) -> None:
    with pytest.raises(BadInputError, match="`map_location`"):
        keys.parse_map_location(spec)


@pytest.mark.parametrize(("spec", "hint"), [("gpu", "did you mean 'cuda'"), ("foo=bar", "'foo'"),
                                           ("cuda:1=gpu:0", "did you mean 'cuda'")])
def test_device_types_torch_does_not_know_are_refused(spec: str, hint: str) -> None:
    """`gpu` and `foo=bar` were accepted and written into a file torch.load cannot load."""
    with pytest.raises(BadInputError, match=f"not a device type torch knows.*{hint}|{hint}.*not a device type"):
        keys.parse_map_location(spec)
    for name in keys.TORCH_DEVICE_TYPES:  # every name the table holds is one torch accepts
        torch.device(name)


def test_remap_to_cuda_on_a_cpu_machine(tmp_path: Path) -> None:
    path = save_zip({"w": torch.ones(3)}, tmp_path / "cpu.pt")
    convert_checkpoint(path, tmp_path / "gpu.pt", map_location="cuda:1")
    from ptools.core.checkpoint import list_checkpoint, open_checkpoint

    assert list_checkpoint(open_checkpoint(tmp_path / "gpu.pt")).rows[0].tensor.device == "cuda:1"
    loaded = torch.load(tmp_path / "gpu.pt", map_location="cpu", weights_only=True)
    assert torch.equal(loaded["w"], torch.ones(3))


# ---------------------------------------------------------------- keys


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "_orig_mod.module.", "module._orig_mod."])
def test_wrapper_prefixes_are_stripped(tmp_path: Path, prefix: str) -> None:
    model = tiny_net()
    wrapped = collections.OrderedDict((prefix + k, v) for k, v in model.state_dict().items())
    wrapped._metadata = collections.OrderedDict(
        (prefix + k if k else prefix.rstrip("."), v) for k, v in model.state_dict()._metadata.items())
    report = convert_checkpoint(save_zip(wrapped, tmp_path / "in.pt"), tmp_path / "out.pt", strip="auto")
    assert report.stripped_prefix == prefix
    loaded = torch.load(tmp_path / "out.pt", weights_only=True)
    assert list(loaded) == list(model.state_dict())
    assert loaded._metadata == model.state_dict()._metadata
    tiny_net(seed=3).load_state_dict(loaded)


def test_transforms_on_torch_state_dicts() -> None:
    state = tiny_net().state_dict()
    ddp = add_prefix(state, "module.")
    assert next(iter(ddp)) == "module.conv.weight" and "module" in ddp._metadata
    stripped, prefix = strip_prefix(ddp)
    assert prefix == "module." and list(stripped) == list(state) and stripped._metadata == state._metadata
    renamed = rename_keys(state, [r"^conv\.=stem.", r"^head\.(\w+)$=classifier.\1"])
    assert list(renamed)[:2] == ["stem.weight", "stem.bias"] and "classifier.bias" in renamed
    assert list(select_keys(state, keep=r"^bn\.", drop="running")) == ["bn.weight", "bn.bias",
                                                                       "bn.num_batches_tracked"]
    half = cast_floating(state, "bf16", keep_dtype=r"running_var")
    assert half["conv.weight"].dtype == torch.bfloat16
    assert half["bn.running_var"].dtype == torch.float32
    assert half["bn.num_batches_tracked"].dtype == torch.int64
    assert detect_wrapper_prefix(["module.a", "b"]) == ""


def test_rename_collision_names_both_keys(tmp_path: Path) -> None:
    path = save_zip({"enc.a": torch.ones(1), "dec.a": torch.ones(1)}, tmp_path / "in.pt")
    with pytest.raises(BadInputError, match="makes 'enc.a' and 'dec.a' both 'a'"):
        convert_checkpoint(path, tmp_path / "out.pt", rename=[r"^(enc|dec)\.="])
    assert not (tmp_path / "out.pt").exists()


def test_strip_collision(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="'module.a' and 'a' both 'a'|'a' and 'module.a' both 'a'"):
        strip_prefix({"a": 1, "module.a": 2}, "module.")


@pytest.mark.parametrize("rule", ["no-equals", "=x", "(unclosed=x"])
def test_bad_rename_rules(rule: str) -> None:
    with pytest.raises(BadInputError, match="`rename`"):
        rename_keys({"a": 1}, [rule])


# ---------------------------------------------------------------- structure


@pytest.mark.parametrize(("layout", "key", "prefix"), [("lightning", "state_dict", "model."),
                                                       ("timm", "state_dict", "")])
def test_extract_auto_from_training_checkpoints(tmp_path: Path, layout: str, key: str, prefix: str) -> None:
    model = tiny_net()
    path = save_zip(training_checkpoint(model, layout), tmp_path / "train.ckpt")
    report = convert_checkpoint(path, tmp_path / "weights.safetensors", extract="auto", strip=prefix or None,
                                verify=True)
    assert report.state_dict_key == key
    loaded = load_file(str(tmp_path / "weights.safetensors"))
    assert set(loaded) == set(model.state_dict())
    tiny_net(seed=9).load_state_dict(loaded)


def test_drop_optimizer_keeps_the_rest(tmp_path: Path) -> None:
    model = tiny_net()
    path = save_zip(training_checkpoint(model, "lightning"), tmp_path / "train.ckpt")
    report = convert_checkpoint(path, tmp_path / "slim.ckpt", drop_optimizer=True)
    assert report.dropped_entries == ["optimizer_states", "lr_schedulers"]
    loaded = torch.load(tmp_path / "slim.ckpt", weights_only=True)
    assert "optimizer_states" not in loaded
    assert loaded["epoch"] == 3 and loaded["hyper_parameters"] == {"lr": 1e-3, "layers": [64, 64]}
    assert len(loaded["state_dict"]) == len(model.state_dict())
    assert report.bytes_out < report.bytes_in


def test_nested_input_to_safetensors_needs_extract_or_flatten(tmp_path: Path) -> None:
    path = save_zip({"model": {"w": torch.ones(2)}, "step": 3, "ema": {"w": torch.zeros(2)}}, tmp_path / "in.pt")
    with pytest.raises(BadInputError, match="not tensors: model, step, ema.*`extract='auto'`.*`flatten=True`"):
        convert_checkpoint(path, tmp_path / "out.safetensors")
    report = convert_checkpoint(path, tmp_path / "flat.safetensors", flatten=True)
    assert set(load_file(str(tmp_path / "flat.safetensors"))) == {"model.w", "ema.w"}
    assert any("1 non-tensor value(s) left out" in note for note in report.notes)


def test_tied_embeddings_to_safetensors_and_back(tmp_path: Path) -> None:
    model = TiedLM()
    source = save_zip(model.state_dict(), tmp_path / "lm.pt")
    report = convert_checkpoint(source, tmp_path / "lm.safetensors", verify=True)
    assert report.aliases == {"head.weight": "embed.weight"}
    from safetensors import safe_open

    with safe_open(str(tmp_path / "lm.safetensors"), framework="pt") as handle:
        assert list(handle.keys()) == ["embed.weight"]
        assert handle.metadata()["head.weight"] == "embed.weight"
    convert_checkpoint(tmp_path / "lm.safetensors", tmp_path / "back.pt", verify=True)
    loaded = torch.load(tmp_path / "back.pt", weights_only=True)
    assert set(loaded) == {"embed.weight", "head.weight"}
    assert loaded["embed.weight"].data_ptr() == loaded["head.weight"].data_ptr()
    fresh = TiedLM()
    fresh.load_state_dict(loaded)
    assert fresh.head.weight is fresh.embed.weight
    assert torch.equal(fresh.embed.weight, model.embed.weight)


def test_partial_view_is_written_as_its_own_data(tmp_path: Path) -> None:
    base = torch.randn(1000, 100)
    path = save_zip({"small": base[10:12], "strided": base[:, 3]}, tmp_path / "views.pt")
    convert_checkpoint(path, tmp_path / "views.safetensors", verify=True)
    loaded = load_file(str(tmp_path / "views.safetensors"))
    assert torch.equal(loaded["small"], base[10:12]) and torch.equal(loaded["strided"], base[:, 3])
    assert os.path.getsize(tmp_path / "views.safetensors") < 8 * 1024


# ---------------------------------------------------------------- dtypes


def test_bf16_cast_is_bit_exact_with_torch_and_leaves_integers(tmp_path: Path) -> None:
    special = torch.tensor([0.0, -0.0, 1.0, 1.00390625, 1.01171875, 3.4e38, -3.4e38, 1e-40, float("inf"),
                            -float("inf"), float("nan"), 65504.0, 1e-8])
    state = {"w": torch.cat([torch.randn(10000) * 100, special]), "d": torch.randn(100, dtype=torch.float64),
             "h": torch.randn(50).half(), "steps": torch.tensor(7), "mask": torch.ones(3, dtype=torch.bool),
             "bn.num_batches_tracked": torch.tensor(11), "ids": torch.arange(4, dtype=torch.int32)}
    path = save_zip(state, tmp_path / "in.pt")
    for dtype, torch_dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)):
        out = tmp_path / f"out_{dtype}.pt"
        report = convert_checkpoint(path, out, dtype=dtype, verify=True)
        loaded = torch.load(out, weights_only=True)
        for name, tensor in state.items():
            if tensor.is_floating_point():
                expected = tensor.to(torch_dtype)
                got = loaded[name]
                assert got.dtype == torch_dtype
                # Bit-exact, NaN payloads aside (torch's own kernels differ in those).
                nan = torch.isnan(expected)
                assert torch.equal(torch.isnan(got), nan), name
                bits = torch.int16 if torch_dtype != torch.float32 else torch.int32
                assert torch.equal(got[~nan].view(bits), expected[~nan].view(bits)), name
            else:
                assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
        assert report.cast == sum(1 for t in state.values() if t.is_floating_point() and t.dtype != torch_dtype)


def _adam_checkpoint(path: Path) -> tuple[Path, dict[str, Any]]:
    """A training checkpoint whose Adam second moments are tiny (they underflow in float16)
    and whose weights hold values past float16's range."""
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64)
    optimizer = torch.optim.Adam(model.parameters())
    for _ in range(3):
        (model(torch.randn(8, 64)) * 1e-4).sum().backward()
        optimizer.step()
    state = model.state_dict()
    state["weight"][0, :4] = torch.tensor([1e-9, 7e4, -1e6, 1e-30])
    checkpoint = {"model": state, "optimizer": optimizer.state_dict(), "epoch": 3}
    torch.save(checkpoint, path)
    return path, checkpoint


def _losses(tensor: torch.Tensor, dtype: torch.dtype) -> tuple[int, int]:
    cast = tensor.to(dtype)
    return (int(((tensor != 0) & (cast == 0)).sum()), int((torch.isfinite(tensor) & torch.isinf(cast)).sum()))


@pytest.mark.parametrize("output", ["torch", "safetensors"])
def test_cast_defaults_to_the_model_weights_and_counts_losses(tmp_path: Path, output: str) -> None:
    path, checkpoint = _adam_checkpoint(tmp_path / "train.ckpt")
    out = tmp_path / ("half.pt" if output == "torch" else "half.safetensors")
    flatten = output == "safetensors"
    report = convert_checkpoint(path, out, dtype="fp16", flatten=flatten, verify=True)
    loaded = torch.load(out, weights_only=True) if output == "torch" else load_file(str(out))
    weight = loaded["model"]["weight"] if output == "torch" else loaded["model.weight"]
    moments = loaded["optimizer"]["state"][0]["exp_avg_sq"] if output == "torch" \
        else loaded["optimizer.state.0.exp_avg_sq"]
    assert weight.dtype == torch.float16 and torch.equal(weight, checkpoint["model"]["weight"].half())
    expected_moments = checkpoint["optimizer"]["state"][0]["exp_avg_sq"]
    assert moments.dtype == torch.float32 and torch.equal(moments, expected_moments)  # untouched
    assert (report.cast, report.outside_cast_scope, report.cast_scope) == (2, 6, "weights")  # step, exp_avg(_sq)
    assert report.cast_losses == [{"names": ["model.weight"], "from": "float32", "to": "float16", "numel": 4096,
                                   "to_zero": 2, "to_inf": 2}]
    assert _losses(checkpoint["model"]["weight"], torch.float16) == (2, 2)

    everything = convert_checkpoint(path, tmp_path / f"all.{'pt' if output == 'torch' else 'safetensors'}",
                                    dtype="fp16", cast_scope="all", flatten=flatten)
    assert (everything.cast, everything.outside_cast_scope) == (8, 0)
    losses = {loss["names"][0]: (loss["to_zero"], loss["to_inf"]) for loss in everything.cast_losses}
    zeroed = _losses(expected_moments, torch.float16)
    assert zeroed[0] > 1000 and losses["optimizer.state.0.exp_avg_sq"] == zeroed


@pytest.mark.parametrize(("dtype", "torch_dtype"), [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_cast_loss_counts_match_torch(tmp_path: Path, dtype: str, torch_dtype: torch.dtype) -> None:
    torch.manual_seed(1)
    values = torch.cat([torch.randn(5000) * 10.0 ** torch.randint(-45, 39, (5000,)).float(),
                        torch.tensor([0.0, -0.0, float("nan"), float("inf"), 1e-45, 3.4e38, 65520.0, 65519.0])])
    path = save_zip({"w": values, "d": values.double()}, tmp_path / "in.pt")
    report = convert_checkpoint(path, tmp_path / "out.pt", dtype=dtype)
    found = {loss["names"][0]: (loss["to_zero"], loss["to_inf"]) for loss in report.cast_losses}
    assert found["w"] == _losses(values, torch_dtype)
    assert found["d"] == _losses(values.double(), torch_dtype)


def test_keep_dtype_exempts_keys(tmp_path: Path) -> None:
    state = tiny_net().state_dict()
    path = save_zip(state, tmp_path / "in.pt")
    report = convert_checkpoint(path, tmp_path / "out.safetensors", dtype="fp16", keep_dtype=r"^bn\.")
    loaded = load_file(str(tmp_path / "out.safetensors"))
    assert loaded["conv.weight"].dtype == torch.float16
    assert loaded["bn.weight"].dtype == torch.float32 and loaded["bn.running_var"].dtype == torch.float32
    assert loaded["bn.num_batches_tracked"].dtype == torch.int64
    assert sorted(report.kept_dtype) == ["bn.bias", "bn.running_mean", "bn.running_var", "bn.weight"]


# ---------------------------------------------------------------- safety and atomicity


def test_never_overwrites_the_input(tmp_path: Path) -> None:
    path = save_zip({"w": torch.ones(2)}, tmp_path / "in.pt")
    before = path.read_bytes()
    os.symlink(path, tmp_path / "link.pt")
    os.link(path, tmp_path / "hard.pt")
    for destination in (path, tmp_path / "link.pt", tmp_path / "hard.pt", tmp_path / "." / "in.pt"):
        with pytest.raises(BadInputError, match="is the input"):
            convert_checkpoint(path, destination, force=True)
    index = save_sharded_safetensors({"a": torch.ones(1), "b": torch.ones(1)}, tmp_path / "sharded")
    with pytest.raises(BadInputError, match="is the input"):
        convert_checkpoint(index, tmp_path / "sharded" / "model-00001-of-00002.safetensors", force=True)
    assert path.read_bytes() == before


def test_existing_output_needs_force(tmp_path: Path) -> None:
    path = save_zip({"w": torch.ones(2)}, tmp_path / "in.pt")
    out = tmp_path / "out.pt"
    out.write_bytes(b"old")
    with pytest.raises(BadInputError, match="exists.*`force=True`"):
        convert_checkpoint(path, out)
    assert out.read_bytes() == b"old"
    convert_checkpoint(path, out, force=True)
    assert torch.equal(torch.load(out, weights_only=True)["w"], torch.ones(2))


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), KeyboardInterrupt()])
@pytest.mark.parametrize("target", ["out.pt", "out.safetensors", "shards"])
def test_failure_midway_leaves_nothing_and_keeps_old_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            failure: BaseException, target: str) -> None:
    path = save_zip({f"w{i}": torch.randn(100) for i in range(6)}, tmp_path / "in.pt")
    destination = tmp_path / target
    if target == "shards":
        destination.mkdir()
        (destination / "keep.txt").write_text("old")
    else:
        destination.write_bytes(b"old output")
    real_read = writers.Checkpoint.read
    calls = {"n": 0}

    def failing_read(self, ref, start, length):
        calls["n"] += 1
        if calls["n"] == 3:
            raise failure
        return real_read(self, ref, start, length)

    monkeypatch.setattr(writers.Checkpoint, "read", failing_read)
    with pytest.raises((BadInputError, KeyboardInterrupt)):
        convert_checkpoint(path, destination, force=True, shard_size=500 if target == "shards" else None)
    leftovers = sorted(p.name for p in tmp_path.iterdir())
    assert leftovers == sorted(["in.pt", target]), leftovers
    if target == "shards":
        assert (destination / "keep.txt").read_text() == "old"
    else:
        assert destination.read_bytes() == b"old output"


def test_not_enough_disk_space(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save_zip({"w": torch.randn(1000)}, tmp_path / "in.pt")
    monkeypatch.setattr(convert.shutil, "disk_usage", lambda _: type("U", (), {"free": 1000})())
    with pytest.raises(BadInputError, match="not enough disk space"):
        convert_checkpoint(path, tmp_path / "out.pt")
    assert not (tmp_path / "out.pt").exists()


def test_unsafe_input_is_refused_and_trust_is_explicit(tmp_path: Path) -> None:
    path = save_zip({"w": torch.ones(1), "counter": collections.Counter("aa")}, tmp_path / "in.pt")
    with pytest.raises(UnsafeFileError, match="collections.Counter"):
        convert_checkpoint(path, tmp_path / "out.pt")
    # Even a trusted input's objects never become globals of the output: only the writer's table.
    with pytest.raises(BadInputError, match="global 'collections.Counter'.*`extract='auto'`"):
        convert_checkpoint(path, tmp_path / "out.pt", trust=True)
    assert not (tmp_path / "out.pt").exists()
    convert_checkpoint(path, tmp_path / "out.pt", trust=True, drop="counter")
    assert list(torch.load(tmp_path / "out.pt", weights_only=True)) == ["w"]


def test_dry_run_writes_nothing(tmp_path: Path) -> None:
    path = save_zip(collections.OrderedDict((f"module.{k}", v) for k, v in tiny_net().state_dict().items()),
                    tmp_path / "in.pt")
    report = convert_checkpoint(path, tmp_path / "out.safetensors", strip="auto", dtype="fp16", drop="head",
                                dry_run=True)
    assert not (tmp_path / "out.safetensors").exists()
    rows = {row["from"]: row for row in report.plan}
    assert rows["module.conv.weight"]["to"] == "conv.weight"
    assert rows["module.conv.weight"]["new_dtype"] == "float16"
    assert rows["module.head.weight"]["to"] is None
    assert rows["module.bn.num_batches_tracked"]["new_dtype"] == "int64"


@pytest.mark.parametrize(("name", "fmt", "message"), [
    ("out.onnx", None, "cannot tell the output format"),
    ("out.pt", "onnx", "unknown `format` 'onnx'"),
])
def test_output_format_errors(tmp_path: Path, name: str, fmt: str | None, message: str) -> None:
    path = save_zip({"w": torch.ones(1)}, tmp_path / "in.pt")
    with pytest.raises(BadInputError, match=message):
        convert_checkpoint(path, tmp_path / name, format=fmt)


@pytest.mark.cuda
def test_real_gpu_checkpoint_moves_to_cpu_and_back(tmp_path: Path) -> None:
    """A file torch.save wrote from CUDA tensors: listed with its tags, remapped to cpu (loads
    where CUDA is hidden), and remapped back (torch.load puts it on the GPU)."""
    import json
    import subprocess
    import sys

    from ptools.core.checkpoint import list_checkpoint, open_checkpoint

    state = {"w": torch.randn(4, 4, device="cuda"), "ids": torch.arange(3, device="cuda"),
             "h": torch.randn(5, device="cuda").half(), "cpu": torch.ones(2)}
    path = tmp_path / "gpu.pt"
    torch.save(state, path)
    devices = {row.name: row.tensor.device for row in list_checkpoint(open_checkpoint(path)).rows}
    assert devices == {"w": "cuda:0", "ids": "cuda:0", "h": "cuda:0", "cpu": "cpu"}
    convert_checkpoint(path, tmp_path / "cpu.pt", map_location="cpu", verify=True)
    script = ("import json, sys, torch; s = torch.load(sys.argv[1], weights_only=True); "
              "print(json.dumps({k: [str(v.device), v.float().sum().item()] for k, v in s.items()}))")
    hidden = subprocess.run([sys.executable, "-c", script, str(tmp_path / "cpu.pt")], capture_output=True,
                            text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, timeout=300)
    assert hidden.returncode == 0, hidden.stderr
    seen = json.loads(hidden.stdout)
    for name, tensor in state.items():
        assert seen[name][0] == "cpu"
        assert seen[name][1] == pytest.approx(tensor.float().sum().item(), rel=1e-6)
    convert_checkpoint(tmp_path / "cpu.pt", tmp_path / "back.pt", map_location="cuda:0")
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    for name, tensor in state.items():
        assert back[name].device.type == "cuda"
        assert torch.equal(back[name], tensor.cuda())


@pytest.mark.parametrize("output", list(OUTPUTS))
def test_torchscript_input_to_every_format(tmp_path: Path, output: str) -> None:
    model = tiny_net().eval()
    path = tmp_path / "scripted.pt"
    torch.jit.script(model).save(str(path))
    destination = tmp_path / OUTPUTS[output]
    report = convert_checkpoint(path, destination, shard_size=300 if output == "sharded" else None, verify=True)
    assert report.input_format == "torchscript" and report.verified
    result = read_output(destination)
    assert_same_tensors(dict(sorted(result.items())), dict(sorted(model.state_dict().items())))
    tiny_net(seed=4).load_state_dict(result)


@pytest.mark.parametrize("byteorder", ["little", "big"])
@pytest.mark.parametrize(("target", "torch_dtype"), [("float16", torch.float16), ("bfloat16", torch.bfloat16)])
def test_cast_tally_counts_in_either_byte_order(byteorder: str, target: str, torch_dtype: torch.dtype) -> None:
    torch.manual_seed(2)
    values = torch.cat([torch.randn(3000) * 10.0 ** torch.randint(-45, 39, (3000,)).float(),
                        torch.tensor([0.0, -0.0, -1e-30, float("nan"), -float("inf"), 1e5])])
    raw = values.numpy().astype(">f4" if byteorder == "big" else "<f4").tobytes()
    tally = writers.CastTally(["w"], "float32", target)
    writers.cast_bytes(raw, "float32", target, byteorder, tally)
    assert (tally.numel, tally.to_zero, tally.to_inf) == (values.numel(), *_losses(values, torch_dtype))


def test_plan_then_execute(tmp_path: Path) -> None:
    """The plan is a value: printed (its report) before anything is written, then executed."""
    path = save_zip(tiny_net().state_dict(), tmp_path / "in.pt")
    out = tmp_path / "out.safetensors"
    plan = convert.plan_conversion(path, out, dtype="bf16", dry_run=False)
    assert not out.exists() and plan.report.tensors == 9 and plan.report.bytes_out > 0
    report = convert.execute_conversion(plan, verify=True)
    assert out.exists() and report.verified and report is plan.report
    dry = convert.plan_conversion(path, tmp_path / "other.pt", dry_run=True)
    assert [row["from"] for row in dry.report.plan][:1] == ["conv.weight"]
    with pytest.raises(BadInputError, match="dry-run plan writes nothing"):
        convert.execute_conversion(dry)


def test_every_output_format_has_one_table_entry() -> None:
    from ptools.core.choices import CheckpointOutputFormat, values

    assert set(values(CheckpointOutputFormat)) <= set(convert.OUTPUT_KINDS)
    assert convert.output_format("x.pth", None, None) == "torch"
    assert convert.output_format("x.SAFETENSORS", None, None) == "safetensors"
    assert convert.output_format("out", None, 1 << 30) == "sharded"
