"""The checkpoint reader against torch.load and safetensors, format by format."""

from __future__ import annotations

import argparse
import collections
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ptools.core.checkpoint import (
    diff_state_dicts,
    detect_prefix,
    find_state_dict,
    group_by_prefix,
    iter_stats,
    list_checkpoint,
    navigate,
    open_checkpoint,
    read_tensor,
)
from ptools.core.convert import convert_checkpoint
from ptools.errors import BadInputError, UnsafeFileError
from tests.checkpoint_fixtures import (
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


def assert_matches_torch(path: Path, expected: dict[str, torch.Tensor], key: str = "auto") -> None:
    """Every tensor: same names in order, dtype, shape, stride, offset, values, sharing."""
    checkpoint = open_checkpoint(path)
    listing = list_checkpoint(checkpoint, key=key)
    assert [row.name for row in listing.rows] == list(expected)
    for row in listing.rows:
        tensor = expected[row.name]
        info = row.tensor
        assert info.dtype == str(tensor.dtype).removeprefix("torch."), row.name
        assert info.shape == tuple(tensor.shape), row.name
        values = read_tensor(checkpoint, info)
        np.testing.assert_array_equal(values, as_numpy(tensor), err_msg=row.name)
        shared = {name for name, other in expected.items() if name != row.name
                  and other.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr()
                  and tensor.numel() and other.numel()}
        assert set(row.shares_storage_with) == shared, row.name


# ---------------------------------------------------------------- PyTorch zip and legacy


@pytest.mark.parametrize("save", [save_zip, save_legacy])
def test_varied_state_dict_matches_torch_load(tmp_path: Path, save) -> None:
    state = varied_state_dict()
    if save is save_legacy:  # torch itself cannot write float8 in the legacy format
        state = collections.OrderedDict((k, v) for k, v in state.items() if not k.startswith("f8."))
    path = save(state, tmp_path / "varied.pt")
    loaded = torch.load(path, weights_only=True)
    assert_matches_torch(path, loaded)
    listing = list_checkpoint(open_checkpoint(path))
    by_name = {row.name: row.tensor for row in listing.rows}
    for name, tensor in loaded.items():
        assert by_name[name].stride == tensor.stride(), name
        assert by_name[name].storage_offset == tensor.storage_offset(), name
        assert by_name[name].is_contiguous == tensor.is_contiguous(), name
    assert open_checkpoint(path).format == ("torch-zip" if save is save_zip else "torch-legacy")


def test_folder_name_inside_zip_is_not_assumed(tmp_path: Path) -> None:
    path = save_zip({"w": torch.ones(2)}, tmp_path / "renamed-inside.pt")
    with zipfile.ZipFile(path) as archive:
        records = [(info.filename, archive.read(info)) for info in archive.infolist()]
    other = tmp_path / "other.pt"
    with zipfile.ZipFile(other, "w") as archive:
        for name, data in records:
            archive.writestr("weird_folder/" + name.split("/", 1)[1], data)
    assert_matches_torch(other, torch.load(other, weights_only=True))


def test_compressed_zip_records_are_read_through_zipfile(tmp_path: Path) -> None:
    path = save_zip({"w": torch.arange(100.0)}, tmp_path / "plain.pt")
    with zipfile.ZipFile(path) as archive:
        records = [(info.filename, archive.read(info)) for info in archive.infolist()]
    squeezed = tmp_path / "deflated.pt"
    with zipfile.ZipFile(squeezed, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in records:
            archive.writestr(name, data)
    checkpoint = open_checkpoint(squeezed)
    values = read_tensor(checkpoint, list_checkpoint(checkpoint).rows[0].tensor)
    np.testing.assert_array_equal(values, np.arange(100.0, dtype=np.float32))


def test_cuda_tagged_checkpoint_lists_on_a_cpu_machine(tmp_path: Path) -> None:
    state = varied_state_dict()
    path = save_zip(state, tmp_path / "gpu.pt")
    with zipfile.ZipFile(path) as archive:
        keys = sorted({n.rsplit("/", 1)[-1] for n in archive.namelist() if "/data/" in n}, key=int)
    tags = {key: f"cuda:{int(key) % 2}" for key in keys}
    retag_devices(path, tags)
    listing = list_checkpoint(open_checkpoint(path))
    assert {row.tensor.device for row in listing.rows} == {"cuda:0", "cuda:1"}
    assert {row.tensor.storage.key: row.tensor.device for row in listing.rows} == {
        row.tensor.storage.key: tags[row.tensor.storage.key] for row in listing.rows}
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(path, weights_only=True)
    assert_matches_torch(path, torch.load(path, map_location="cpu", weights_only=True))


def test_parameters_and_meta_tensors(tmp_path: Path) -> None:
    obj = {"p": torch.nn.Parameter(torch.ones(3)), "frozen": torch.nn.Parameter(torch.ones(2), requires_grad=False),
           "meta": torch.empty(4, 5, device="meta")}
    path = save_zip(obj, tmp_path / "params.pt")
    checkpoint = open_checkpoint(path)
    rows = {row.name: row for row in list_checkpoint(checkpoint).rows}
    assert rows["p"].tensor.is_parameter and rows["p"].tensor.requires_grad
    assert rows["frozen"].tensor.is_parameter and not rows["frozen"].tensor.requires_grad
    assert rows["meta"].tensor.device == "meta" and rows["meta"].tensor.shape == (4, 5)
    stats = {row.name: s for row, s in iter_stats(checkpoint, list(rows.values()))}
    assert stats["meta"] is None


def test_plain_values_numpy_and_namespace_need_no_trust(tmp_path: Path) -> None:
    obj = {"w": torch.ones(1), "args": argparse.Namespace(lr=0.1), "best": np.float64(0.93),
           "dtype": torch.float16, "size": torch.Size([3, 4]), "device": torch.device("cuda", 1),
           "tags": {"a", "b"}, "array": np.arange(3)}
    path = save_zip(obj, tmp_path / "misc.pt")
    listing = list_checkpoint(open_checkpoint(path))
    values = {entry["name"]: entry["value"] for entry in listing.non_tensors}
    assert values["args"] == {"lr": 0.1}
    assert values["best"] == pytest.approx(0.93)
    assert values["dtype"] == "torch.float16"
    assert values["size"] == [3, 4]
    assert values["device"] == "cuda:1"
    assert values["array"] == [0, 1, 2]


# ---------------------------------------------------------------- training checkpoints


@pytest.mark.parametrize(("layout", "key", "prefix"), [
    ("plain", "model_state_dict", ""), ("lightning", "state_dict", "model."), ("timm", "state_dict", ""),
])
def test_auto_finds_model_weights(tmp_path: Path, layout: str, key: str, prefix: str) -> None:
    model = tiny_net()
    path = save_zip(training_checkpoint(model, layout), tmp_path / f"{layout}.ckpt")
    listing = list_checkpoint(open_checkpoint(path))
    assert listing.state_dict_key == key
    assert [row.name for row in listing.rows] == [prefix + name for name in model.state_dict()]
    kinds = {row.name.removeprefix(prefix): row.kind for row in listing.rows}
    assert kinds["bn.running_mean"] == "buffer" and kinds["conv.weight"] == "parameter"
    assert listing.kinds_inferred
    structure = {entry["key"]: entry for entry in listing.structure}
    assert "epoch" in structure
    optimizer = next(e for e in structure.values() if "optimizer state" in e["summary"])
    assert "1 param group(s), state for 6 parameter(s) (18 tensors)" in optimizer["summary"]


def test_key_selects_ema_and_optimizer_state(tmp_path: Path) -> None:
    model = tiny_net()
    path = save_zip(training_checkpoint(model, "timm"), tmp_path / "timm.pth")
    checkpoint = open_checkpoint(path)
    ema = list_checkpoint(checkpoint, key="state_dict_ema")
    assert ema.state_dict_how == "given with `key`" and len(ema.rows) == len(model.state_dict())
    optimizer = list_checkpoint(checkpoint, key="optimizer.state")
    assert {row.name for row in optimizer.rows} == {
        f"{index}.{name}" for index in range(len(list(model.parameters())))
        for name in ("step", "exp_avg", "exp_avg_sq")}


def test_navigate_with_dotted_keys_and_lists() -> None:
    root = {"a.b": {"c": [10, {"d": 4}]}}
    assert navigate(root, "a.b.c.1.d") == 4
    with pytest.raises(BadInputError, match="no key 'x' at a.b; there are: c"):
        navigate(root, "a.b.x")
    with pytest.raises(BadInputError, match="not an index"):
        navigate(root, "a.b.c.5")


def test_find_state_dict_falls_back_to_largest_tensor_dict() -> None:
    from ptools.core.checkpoint.tensors import TensorInfo

    small = {"x": TensorInfo("float32", (1,), (1,))}
    big = {f"w{i}": TensorInfo("float32", (1,), (1,)) for i in range(3)}
    path, node, how = find_state_dict({"cfg": 1, "teacher": small, "student": big})
    assert (path, how) == ("student", "the largest dict of tensors in the file")
    with pytest.raises(BadInputError, match="no tensors found"):
        find_state_dict({"epoch": 3})


# ---------------------------------------------------------------- TorchScript


def test_torchscript_lists_parameters_and_buffers_exactly(tmp_path: Path) -> None:
    model = tiny_net().eval()
    path = tmp_path / "scripted.pt"
    torch.jit.script(model).save(str(path))
    checkpoint = open_checkpoint(path)
    assert checkpoint.format == "torchscript"
    listing = list_checkpoint(checkpoint)
    state = model.state_dict()
    assert sorted(row.name for row in listing.rows) == sorted(state)
    parameters = {name for name, _ in model.named_parameters()}
    assert {row.name for row in listing.rows if row.kind == "parameter"} == parameters
    assert not listing.kinds_inferred
    for row in listing.rows:
        np.testing.assert_array_equal(read_tensor(checkpoint, row.tensor), as_numpy(state[row.name]))


class WithState(torch.nn.Module):
    """A scripted module keeping a recurrent state as a plain tensor attribute (as silero-vad
    does): not a parameter, not a buffer, not in its state_dict."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(2, 2)
        self.register_buffer("scale", torch.ones(2))
        self._state = torch.zeros(3)
        self._context = torch.zeros(1, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * self.scale + self._state.sum() + self._context.sum()


def test_torchscript_plain_tensor_attributes_are_not_state(tmp_path: Path) -> None:
    path = tmp_path / "stateful.jit"
    scripted = torch.jit.script(WithState())
    scripted.save(str(path))
    checkpoint = open_checkpoint(path)
    listing = list_checkpoint(checkpoint)
    assert [row.name for row in listing.rows] == list(torch.jit.load(str(path)).state_dict())
    assert {row.name: row.kind for row in listing.rows} == {
        "scale": "buffer", "linear.weight": "parameter", "linear.bias": "parameter"}
    assert any("2 tensor attribute(s) that are neither parameters nor buffers" in note and "_state, _context" in note
               for note in checkpoint.notes)
    report = convert_checkpoint(path, tmp_path / "out.safetensors")
    assert sorted(load_file(str(tmp_path / "out.safetensors"))) == ["linear.bias", "linear.weight", "scale"]
    assert any("_state" in note for note in report.notes)


# ---------------------------------------------------------------- safetensors


def test_safetensors_matches_safe_open(tmp_path: Path) -> None:
    from safetensors import safe_open

    state = contiguous_copy({k: v for k, v in varied_state_dict().items() if k != "head.weight"})
    path = save_safetensors(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    checkpoint = open_checkpoint(path)
    assert checkpoint.format == "safetensors" and checkpoint.metadata == {"format": "pt"}
    listing = list_checkpoint(checkpoint)
    with safe_open(str(path), framework="pt") as reference:
        names = list(reference.keys())
        assert sorted(row.name for row in listing.rows) == sorted(names)
        for row in listing.rows:
            tensor = reference.get_tensor(row.name)
            assert row.tensor.shape == tuple(tensor.shape)
            assert row.tensor.dtype == str(tensor.dtype).removeprefix("torch.")
            np.testing.assert_array_equal(read_tensor(checkpoint, row.tensor), as_numpy(tensor))


def test_safetensors_aliases_are_restored(tmp_path: Path) -> None:
    state = {"embed.weight": torch.randn(4, 2), "bias": torch.zeros(2)}
    path = save_safetensors(state, tmp_path / "tied.safetensors", metadata={"head.weight": "embed.weight"})
    rows = {row.name: row for row in list_checkpoint(open_checkpoint(path)).rows}
    assert rows["head.weight"].shares_storage_with == ["embed.weight"]
    assert rows["embed.weight"].shares_storage_with == ["head.weight"]


@pytest.mark.parametrize("saver", [save_sharded_safetensors, save_sharded_bin])
@pytest.mark.parametrize("open_folder", [False, True])
def test_sharded_checkpoints(tmp_path: Path, saver, open_folder: bool) -> None:
    state = contiguous_copy({k: v for k, v in varied_state_dict().items() if k != "head.weight"})
    index = saver(state, tmp_path / "sharded", shards=3)
    checkpoint = open_checkpoint(index.parent if open_folder else index)
    assert checkpoint.format == "sharded"
    listing = list_checkpoint(checkpoint)
    assert [row.name for row in listing.rows] == list(json.loads(index.read_text())["weight_map"])
    for row in listing.rows:
        np.testing.assert_array_equal(read_tensor(checkpoint, row.tensor), as_numpy(state[row.name]))


# ---------------------------------------------------------------- DCP


def test_dcp_folder_keeps_the_nesting_the_run_saved(tmp_path: Path) -> None:
    model = tiny_net()
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    optimizer.step()
    state = {"model": model.state_dict(), "optim": optimizer.state_dict(), "step": 12,
             "ema": [model.state_dict()["conv.weight"] * 2]}
    folder = save_dcp(state, tmp_path / "dcp")
    checkpoint = open_checkpoint(folder)
    assert checkpoint.format == "dcp"
    assert list(checkpoint.root) == ["model", "optim", "step", "ema"]
    assert list(checkpoint.root["model"]) == list(model.state_dict())  # the model's own names
    assert isinstance(checkpoint.root["ema"], list)
    listing = list_checkpoint(checkpoint)
    assert listing.state_dict_key == "model"
    assert [row.name for row in listing.rows] == list(model.state_dict())
    for row in listing.rows:
        np.testing.assert_array_equal(read_tensor(checkpoint, row.tensor), as_numpy(model.state_dict()[row.name]))
    moments = list_checkpoint(checkpoint, key="optim.state.0")
    assert {row.name for row in moments.rows} == {"exp_avg", "exp_avg_sq", "step"}
    np.testing.assert_array_equal(read_tensor(checkpoint, checkpoint.root["ema"][0]), as_numpy(state["ema"][0]))


def test_dcp_folder_without_planner_paths_stays_flat(tmp_path: Path) -> None:
    from ptools.core.checkpoint.readers import _dcp_nesting

    flat = {"model.w": 1, "model.b": 2}
    assert _dcp_nesting(flat, None) is None
    assert _dcp_nesting(flat, {"model.w": ("model", "w")}) is None  # a path missing
    assert _dcp_nesting(flat, {"model.w": ("model",), "model.b": ("model", "b")}) is None  # a leaf, then a container
    assert _dcp_nesting(flat, {"model.w": ("m", 2**40), "model.b": ("m", 0)}) is None  # an absurd index
    assert _dcp_nesting(flat, {"model.w": ("m", 1), "model.b": ("m", 0)}) == {"m": [2, 1]}
    assert _dcp_nesting(flat, {"model.w": ("m",) * 100_000, "model.b": ("m", "b")}) is None  # deeper than the limit


# ---------------------------------------------------------------- values and statistics


def test_stats_match_torch(tmp_path: Path) -> None:
    weights = torch.randn(300, 70) * 3 + 1
    weights[0, 0], weights[1, 1], weights[2, 2] = float("nan"), float("inf"), -float("inf")
    state = {"w": weights, "h": torch.randn(50).half(), "b": torch.randn(9).to(torch.bfloat16),
             "i": torch.arange(-5, 20), "one": torch.tensor([4.0]), "empty": torch.empty(0)}
    path = save_zip(state, tmp_path / "stats.pt")
    checkpoint = open_checkpoint(path)
    stats = {row.name: s for row, s in iter_stats(checkpoint, list_checkpoint(checkpoint).rows)}
    finite = weights[torch.isfinite(weights)].double()
    assert (stats["w"].nan, stats["w"].inf) == (1, 2)
    assert stats["w"].min == pytest.approx(finite.min().item())
    assert stats["w"].max == pytest.approx(finite.max().item())
    assert stats["w"].mean == pytest.approx(finite.mean().item(), rel=1e-9)
    assert stats["w"].std == pytest.approx(finite.std().item(), rel=1e-9)
    for name in ("h", "b", "i"):
        reference = state[name].double()
        assert stats[name].mean == pytest.approx(reference.mean().item(), rel=1e-9, abs=1e-12)
        assert stats[name].std == pytest.approx(reference.std().item(), rel=1e-9)
    assert stats["one"].std is None and stats["one"].mean == 4.0
    assert stats["empty"].min is None and stats["empty"].nan == 0


def test_stats_over_many_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ptools.core.checkpoint import values

    monkeypatch.setattr(values, "CHUNK_ELEMENTS", 7)
    data = torch.randn(1000, dtype=torch.float64) * 5 + 2
    stats = values.tensor_stats(data.numpy(), "float64")
    assert stats.mean == pytest.approx(data.mean().item(), rel=1e-12)
    assert stats.std == pytest.approx(data.std().item(), rel=1e-12)


# ---------------------------------------------------------------- diff


@pytest.mark.parametrize(("prefix", "side"), [("module.", "a"), ("_orig_mod.", "b"), ("model.", "a")])
def test_prefix_difference_is_detected(prefix: str, side: str) -> None:
    names = ["conv.weight", "conv.bias", "fc.weight"]
    prefixed = [prefix + n for n in names]
    a, b = (prefixed, names) if side == "a" else (names, prefixed)
    found = detect_prefix(a, b, "x.pt", "y.pt")
    assert (found.side, found.prefix) == (side, prefix)
    assert found.file == ("x.pt" if side == "a" else "y.pt")
    assert detect_prefix(names, names) is None


def test_diff_with_values(tmp_path: Path) -> None:
    model = tiny_net()
    state = model.state_dict()
    changed = collections.OrderedDict((f"module.{k}", v.clone()) for k, v in state.items())
    changed["module.conv.weight"] += 0.5
    changed["module.head.weight"] = torch.zeros(3, 4)
    changed["module.extra"] = torch.ones(1)
    del changed["module.bn.bias"]
    changed["module.conv.bias"] = changed["module.conv.bias"].double()
    a = save_zip(changed, tmp_path / "ddp.pt")
    b = save_safetensors(contiguous_copy(state), tmp_path / "plain.safetensors")
    ca, cb = open_checkpoint(a), open_checkpoint(b)
    result = diff_state_dicts(list_checkpoint(ca), ca, list_checkpoint(cb), cb, compare="numbers")
    assert result.prefix.prefix == "module." and result.prefix.side == "a"
    assert result.only_in_a == ["extra"] and result.only_in_b == ["bn.bias"]
    assert result.shape_mismatches == [{"name": "head.weight", "a": [3, 4], "b": [2, 4]}]
    assert result.dtype_mismatches == [{"name": "conv.bias", "a": "float64", "b": "float32"}]
    differences = {v["name"]: v["max_abs_diff"] for v in result.values}
    assert differences["conv.weight"] == pytest.approx(0.5, rel=1e-6)
    assert differences["bn.running_mean"] == 0
    assert differences["conv.bias"] == 0  # float64 vs float32 of the same values: equal numbers
    equal = {v["name"]: v["equal"] for v in result.values}
    assert equal["bn.running_mean"] and not equal["conv.weight"] and not equal["conv.bias"]  # dtypes differ
    assert not result.identical


def test_group_by_prefix() -> None:
    from ptools.core.checkpoint.listing import TensorRow
    from ptools.core.checkpoint.tensors import TensorInfo

    rows = [TensorRow(name, TensorInfo("float32", (n,), (1,)), "parameter")
            for name, n in (("enc.l1.w", 2), ("enc.l2.w", 3), ("dec.w", 4), ("scale", 1))]
    groups = {g["prefix"]: (g["depth"], g["tensors"], g["numel"]) for g in group_by_prefix(rows, 2)}
    assert groups == {"enc": (1, 2, 5), "enc.l1": (2, 1, 2), "enc.l2": (2, 1, 3), "dec": (1, 1, 4),
                      "scale": (1, 1, 1)}


# ---------------------------------------------------------------- safety


class Payload:
    """Unpickling this would create a file: the attack a checkpoint from a stranger can carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("save", [save_zip, save_legacy])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path: Path, save) -> None:
    marker = tmp_path / "pwned"
    path = save({"w": torch.ones(2), "x": Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(UnsafeFileError) as failure:
        open_checkpoint(path)
    message = str(failure.value)
    assert "posix.system" in message or "os.system" in message
    assert "`trust=True`" in message
    assert not marker.exists()


class TrustedConfig:
    def __init__(self, depth: int) -> None:
        self.depth = depth


def test_unknown_globals_are_all_named_and_trust_allows_them(tmp_path: Path) -> None:
    path = save_zip({"w": torch.ones(2), "cfg": TrustedConfig(3), "other": collections.Counter("ab")},
                    tmp_path / "custom.pt")
    with pytest.raises(UnsafeFileError, match="collections.Counter, tests.core.test_checkpoint.TrustedConfig"):
        open_checkpoint(path)
    listing = list_checkpoint(open_checkpoint(path, trust=True), key="")
    assert [row.name for row in listing.rows] == ["w"]
    config = next(e for e in listing.non_tensors if e["name"] == "cfg")
    assert config["type"] == "tests.core.test_checkpoint.TrustedConfig"


def test_big_endian_checkpoint(tmp_path: Path) -> None:
    """A file written on a big-endian machine: byteorder record 'big', storages byte-swapped."""
    state = {"w": torch.randn(3, 5), "i": torch.arange(-3, 9, dtype=torch.int32),
             "h": torch.randn(4).to(torch.bfloat16), "d": torch.randn(2, dtype=torch.float64)}
    path = save_zip(state, tmp_path / "little.pt")
    itemsize = {"0": 4, "1": 4, "2": 2, "3": 8}
    big = tmp_path / "big.pt"
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(big, "w") as target:
        for info in source.infolist():
            data = source.read(info)
            name = info.filename
            if name.endswith("/byteorder"):
                data = b"big"
            elif "/data/" in name:
                size = itemsize[name.rsplit("/", 1)[-1]]
                data = np.frombuffer(data, dtype=f"<u{size}").byteswap().tobytes()
            target.writestr(name, data)
    assert_matches_torch(big, torch.load(big, weights_only=True))
    assert_matches_torch(big, state)
