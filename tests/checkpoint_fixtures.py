"""Checkpoints made with torch for the tests, in every format the reader knows."""

from __future__ import annotations

import argparse
import collections
import io
import json
import os
import pickletools
import zipfile
from pathlib import Path
from typing import Any

import torch


def varied_state_dict(seed: int = 0) -> collections.OrderedDict[str, torch.Tensor]:
    """Every dtype family, 0-d and empty tensors, a view into a larger storage, tied weights."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(10, 8, generator=generator)
    embedding = torch.randn(16, 4, generator=generator)
    state = collections.OrderedDict()
    state["conv.weight"] = torch.randn(4, 3, 3, 3, generator=generator)
    state["conv.bias"] = torch.randn(4, generator=generator).half()
    state["bn.weight"] = torch.rand(4, generator=generator).to(torch.bfloat16)
    state["bn.running_mean"] = torch.randn(4, generator=generator, dtype=torch.float64)
    state["bn.running_var"] = torch.rand(4, generator=generator)
    state["bn.num_batches_tracked"] = torch.tensor(123)
    state["quant.int8"] = torch.randint(-128, 127, (5,), generator=generator, dtype=torch.int8)
    state["quant.uint8"] = torch.randint(0, 255, (2, 3), generator=generator, dtype=torch.uint8)
    state["mask"] = torch.rand(6, generator=generator) > 0.5
    state["freqs"] = torch.randn(3, generator=generator, dtype=torch.complex64)
    state["ids"] = torch.arange(7, dtype=torch.int32)
    state["scalar"] = torch.tensor(2.5)
    state["empty"] = torch.empty(0, 3)
    state["view.rows"] = base[2:5]                      # a view: offset into base's storage
    state["view.transposed"] = base[:4, :6].t()         # non-contiguous view of the same storage
    state["embed.weight"] = embedding
    state["head.weight"] = embedding                    # tied: same tensor under two names
    state["f8.e4m3"] = torch.tensor([0.5, -2.0, 448.0, 0.0013]).to(torch.float8_e4m3fn)
    state["f8.e5m2"] = torch.tensor([0.5, -3.0, 57344.0]).to(torch.float8_e5m2)
    return state


def contiguous_copy(state: dict[str, torch.Tensor]) -> collections.OrderedDict[str, torch.Tensor]:
    """What safetensors accepts: every tensor dense and owning its storage."""
    return collections.OrderedDict((k, v.contiguous().clone()) for k, v in state.items())


def save_zip(obj: Any, path: Path) -> Path:
    torch.save(obj, path)
    return path


def save_legacy(obj: Any, path: Path) -> Path:
    torch.save(obj, path, _use_new_zipfile_serialization=False)
    return path


def save_safetensors(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    save_file(dict(state), str(path), metadata=metadata)
    return path


def _save_sharded(state: dict[str, torch.Tensor], folder: Path, shards: int, shard_pattern: str,
                  index_name: str, write: Any) -> Path:
    """Split ``state`` round-robin over ``shards`` files and write the index that maps them."""
    folder.mkdir(parents=True, exist_ok=True)
    names = list(state)
    weight_map = {}
    for index in range(shards):
        part = names[index::shards]
        shard_name = shard_pattern.format(index + 1, shards)
        write({n: state[n] for n in part}, folder / shard_name)
        weight_map.update({n: shard_name for n in part})
    index_path = folder / index_name
    index_path.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return index_path


def save_sharded_safetensors(state: dict[str, torch.Tensor], folder: Path, shards: int = 2) -> Path:
    return _save_sharded(state, folder, shards, "model-{:05d}-of-{:05d}.safetensors",
                         "model.safetensors.index.json", save_safetensors)


def save_sharded_bin(state: dict[str, torch.Tensor], folder: Path, shards: int = 2) -> Path:
    return _save_sharded(state, folder, shards, "pytorch_model-{:05d}-of-{:05d}.bin",
                         "pytorch_model.bin.index.json", torch.save)


def save_dcp(state: dict[str, Any], folder: Path) -> Path:
    import warnings

    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no process group": a single-process save is what we want
        dcp.save(state, checkpoint_id=str(folder))
    return folder


class TinyNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.bn(self.conv(x)).mean((2, 3)))


class TiedLM(torch.nn.Module):
    """A language-model head tied to its embedding: one Parameter under two names."""

    def __init__(self, vocab: int = 100, width: int = 16) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.head = torch.nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids))


def tiny_net(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    model = TinyNet()
    model.bn.running_mean.uniform_()
    model.bn.num_batches_tracked.fill_(9)
    return model


def training_checkpoint(model: torch.nn.Module, layout: str = "plain") -> dict[str, Any]:
    """A training checkpoint as common code writes it (``plain``, ``lightning`` or ``timm``)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    optimizer.step()
    state = model.state_dict()
    if layout == "plain":
        return {"model_state_dict": state, "optimizer_state_dict": optimizer.state_dict(), "epoch": 7,
                "loss": 0.25}
    if layout == "lightning":
        return {"epoch": 3, "global_step": 300, "pytorch-lightning_version": "2.4.0",
                "state_dict": collections.OrderedDict((f"model.{k}", v) for k, v in state.items()),
                "optimizer_states": [optimizer.state_dict()], "lr_schedulers": [],
                "hyper_parameters": {"lr": 1e-3, "layers": [64, 64]}, "loops": {"fit_loop": {}}}
    if layout == "timm":
        ema = collections.OrderedDict((k, v.clone()) for k, v in state.items())
        return {"epoch": 90, "arch": "tinynet", "state_dict": state, "state_dict_ema": ema,
                "optimizer": optimizer.state_dict(), "args": argparse.Namespace(lr=0.1, epochs=90),
                "version": 2}
    raise ValueError(layout)


def retag_devices(path: Path, locations: dict[str, str]) -> Path:
    """Rewrite the device tag of storages (by storage key) inside a torch zip checkpoint.

    Saving on a GPU is what makes such files; this does it on a CPU-only machine.
    """
    with zipfile.ZipFile(path) as archive:
        records = [(info, archive.read(info.filename)) for info in archive.infolist()]
    rewritten = []
    for info, data in records:
        if info.filename.endswith("data.pkl"):
            data = _retag_pickle(data, locations)
        rewritten.append((info.filename, data))
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, data in rewritten:
            archive.writestr(name, data)
    return path


def _binunicode(text: str) -> bytes:
    encoded = text.encode()
    return b"X" + len(encoded).to_bytes(4, "little") + encoded


def _retag_pickle(data: bytes, locations: dict[str, str]) -> bytes:
    """Replace the location op of each ``('storage', type, key, location, numel)`` tuple."""
    ops = list(pickletools.genops(io.BytesIO(data)))
    memo_ops = ("BINPUT", "LONG_BINPUT", "MEMOIZE")
    out, cursor = bytearray(), 0
    strings: dict[int, str] = {}  # memo slot -> string, to follow BINGETs of 'storage'
    for index, (op, arg, _) in enumerate(ops):
        if op.name in ("BINPUT", "LONG_BINPUT") and ops[index - 1][0].name in ("BINUNICODE", "SHORT_BINUNICODE"):
            strings[arg] = ops[index - 1][1]
        text = strings.get(arg) if op.name in ("BINGET", "LONG_BINGET") else arg
        if op.name in ("BINUNICODE", "SHORT_BINUNICODE", "BINGET", "LONG_BINGET") and text == "storage":
            _, key_at, location_at = [j for j in range(index + 1, len(ops))
                                      if ops[j][0].name not in memo_ops][:3]
            key = ops[key_at][1]
            if ops[key_at][0].name in ("BINGET", "LONG_BINGET"):  # a storage named twice
                key = strings.get(key)
            if key in locations:
                out += data[cursor:ops[location_at][2]] + _binunicode(locations[key])
                # A memo store after the location now holds the new string: harmless, since
                # every retagged storage gets an explicit location.
                cursor = ops[location_at + 1][2]
    out += data[cursor:]
    return bytes(out)


def flat_torch_tensors(obj: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Tensors of a torch-loaded object by dotted path, as the reader names them."""
    found: dict[str, torch.Tensor] = {}
    if isinstance(obj, torch.Tensor):
        found[prefix.rstrip(".")] = obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            found.update(flat_torch_tensors(value, f"{prefix}{key}."))
    elif isinstance(obj, (list, tuple)):
        for index, value in enumerate(obj):
            found.update(flat_torch_tensors(value, f"{prefix}{index}."))
    return found


def as_numpy(tensor: torch.Tensor) -> Any:
    """A torch tensor's values as the reader returns them (bf16/float8 widened to float32)."""
    if tensor.dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2):
        tensor = tensor.float()
    return tensor.detach().cpu().numpy()


def file_size(path: Path) -> int:
    return os.path.getsize(path)
