"""The hostile corpus: files an attacker who has read ptools' source would hand it.

Every builder writes its files into a folder and returns the path to give ptools; payloads
that run code create ``marker`` (so a test sees code ran by the marker's existence). Files
are made with pickle opcodes, zipfile and struct (torch only for .pt2 and TorchScript bases).
Each case names its attack class; ``COMMANDS`` says which ptools invocations open it.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# ----------------------------------------------------------------------------- pickle assembly


class G:
    """A global written as it is (``module\\nname``), whatever it names."""

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name

    def __call__(self, *args: Any) -> Any:  # the pickler wants a callable for REDUCE
        raise TypeError("a reference only")


class Call:
    """``func(*args)`` as REDUCE; with ``state``, then BUILD."""

    def __init__(self, func: G, *args: Any, state: Any = None) -> None:
        self.func, self.args, self.state = func, args, state

    def __reduce__(self) -> Any:
        return (self.func, self.args) if self.state is None else (self.func, self.args, self.state)

    def __call__(self, *args: Any) -> Any:  # a call's result may itself be called (gadgets)
        raise TypeError("a reference only")


class Pid:
    """A persistent id (torch's storage reference)."""

    def __init__(self, *pid: Any) -> None:
        self.pid = pid


class Raw:
    """Opcodes inserted verbatim."""

    def __init__(self, data: bytes) -> None:
        self.data = data


class _Pickler(pickle._Pickler):  # type: ignore[name-defined]
    dispatch = pickle._Pickler.dispatch.copy()  # type: ignore[attr-defined]

    def persistent_id(self, obj: Any) -> Any:
        return obj.pid if isinstance(obj, Pid) else None

    def _save_g(self, obj: G) -> None:
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())

    def _save_raw(self, obj: Raw) -> None:
        self.write(obj.data)

    dispatch[G] = _save_g
    dispatch[Raw] = _save_raw


def dumps(obj: Any) -> bytes:
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


def system(marker: Path) -> Call:
    return Call(G("os", "system"), f"touch {marker}")


def storage(key: str, numel: int, kind: str = "FloatStorage") -> Pid:
    return Pid("storage", G("torch", kind), key, "cpu", numel)


def tensor(pid: Pid, shape: tuple[Any, ...], stride: tuple[Any, ...], offset: Any = 0) -> Call:
    return Call(G("torch._utils", "_rebuild_tensor_v2"), pid, offset, shape, stride, False,
                Call(G("collections", "OrderedDict")))


def plain_tensor(key: str = "0", numel: int = 4) -> Call:
    return tensor(storage(key, numel), (numel,), (1,))


def torch_zip(path: Path, data_pkl: bytes, storages: dict[str, bytes] | None = None,
              extra: dict[str, bytes] | None = None, compress: set[str] = frozenset()) -> Path:
    """A torch.save-style archive (``archive/data.pkl``, ``archive/data/KEY``…)."""
    storages = {"0": b"\0" * 16} if storages is None else storages
    members = {"archive/data.pkl": data_pkl, "archive/byteorder": b"little", "archive/version": b"3\n",
               **{f"archive/data/{k}": v for k, v in storages.items()}, **(extra or {})}
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            kind = zipfile.ZIP_DEFLATED if name in compress else zipfile.ZIP_STORED
            archive.writestr(zipfile.ZipInfo(name), data, compress_type=kind)
    return path


def state_zip(path: Path, entries: dict[str, Any], storages: dict[str, bytes] | None = None, **kw: Any) -> Path:
    """A zip whose data.pkl is an OrderedDict of ``entries`` (values pickled as given)."""
    return torch_zip(path, dumps(Call(G("collections", "OrderedDict"), [list(item) for item in entries.items()])),
                     storages, **kw)


def _written(path: Path, content: str | bytes) -> Path:
    """``path`` holding ``content`` (text or bytes)."""
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


def safetensors(path: Path, header: Any, data: bytes = b"", header_bytes: bytes | None = None) -> Path:
    raw = header_bytes if header_bytes is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


# ----------------------------------------------------------------------------- the cases


@dataclass(frozen=True)
class Case:
    """One hostile input: its attack class, how it is made, which invocations open it."""

    name: str
    attack: str
    build: Callable[[Path, Path], Path]
    commands: tuple[str, ...] = ("inspect", "inspect-stats", "inspect-json", "count", "convert-pt", "convert-st")
    expect: str = ""  # a fragment every error message must hold


CASES: list[Case] = []


def case(attack: str, commands: tuple[str, ...] | None = None, expect: str = "") -> Callable[..., Any]:
    def register(build: Callable[[Path, Path], Path]) -> Callable[[Path, Path], Path]:
        kwargs: dict[str, Any] = {"expect": expect}
        if commands is not None:
            kwargs["commands"] = commands
        CASES.append(Case(build.__name__, attack, build, **kwargs))
        return build
    return register


CHECKPOINT_AND_WEIGHTS = ("inspect", "inspect-stats", "inspect-json", "count", "convert-pt", "convert-st",
                          "convert-shards", "diff")
PICKLE_PAYLOAD = ("inspect", "inspect-json", "count", "convert-pt", "convert-st", "convert-shards", "average")

# --- code execution through pickles


@case("code", CHECKPOINT_AND_WEIGHTS, expect="--trust")
def reduce_os_system(folder: Path, marker: Path) -> Path:
    return state_zip(folder / "reduce.pt", {"w": plain_tensor(), "x": system(marker)})


@case("code", PICKLE_PAYLOAD, expect="--trust")
def stack_global(folder: Path, marker: Path) -> Path:
    # protocol 4: STACK_GLOBAL takes module and name from the stack.
    payload = (b"\x80\x04\x8c\x02os\x94\x8c\x06system\x94\x93\x94" + b"\x8c" + bytes([len(f"touch {marker}")])
               + f"touch {marker}".encode() + b"\x85R.")
    return torch_zip(folder / "stack_global.pt", payload)


@case("code", PICKLE_PAYLOAD, expect="--trust")
def protocol0_inst(folder: Path, marker: Path) -> Path:
    return torch_zip(folder / "inst.pt", b"(S'touch " + str(marker).encode() + b"'\nios\nsystem\n.")


@case("code", PICKLE_PAYLOAD, expect="--trust")
def obj_opcode(folder: Path, marker: Path) -> Path:
    payload = b"\x80\x02(cos\nsystem\nX" + struct.pack("<I", len(f"touch {marker}")) + f"touch {marker}".encode() + b"o."
    return torch_zip(folder / "obj.pt", payload)


@case("code", PICKLE_PAYLOAD, expect="--trust")
def newobj_subprocess(folder: Path, marker: Path) -> Path:
    # NEWOBJ of subprocess.Popen with the command as its argument.
    payload = (b"\x80\x02csubprocess\nPopen\n" + dumps((["touch", str(marker)],))[2:-1] + b"\x81.")
    return torch_zip(folder / "newobj.pt", payload)


@case("code", PICKLE_PAYLOAD, expect="builtins.getattr")
def getattr_gadget(folder: Path, marker: Path) -> Path:
    system_fn = Call(G("builtins", "getattr"), Call(G("builtins", "__import__"), "os"), "system")
    return state_zip(folder / "getattr.pt", {"x": Call(system_fn, f"touch {marker}")})


@case("code", PICKLE_PAYLOAD, expect="os.system")
def rebuild_from_type_gadget(folder: Path, marker: Path) -> Path:
    gadget = Call(G("torch._tensor", "_rebuild_from_type_v2"), G("os", "system"), G("torch", "Tensor"),
                  (f"touch {marker}",), {})
    return state_zip(folder / "rebuild_gadget.pt", {"w": gadget})


@case("code", PICKLE_PAYLOAD, expect="--trust")
def payload_in_legacy_sys_info(folder: Path, marker: Path) -> Path:
    magic = dumps(0x1950A86A20F9469CFC6C)
    return _written(folder / "legacy.pt", magic + dumps(1001) + dumps(system(marker)) + dumps({}) + dumps([]))


@case("code", PICKLE_PAYLOAD, expect="")
def layout_name_injection(folder: Path, marker: Path) -> Path:
    # Once became a raw GLOBAL in convert-ckpt's output: the name carries pickle opcodes.
    name = f"os\nsystem\n(Vtouch {marker}\ntR"
    return state_zip(folder / "layout.pt", {"w": plain_tensor(), "w._extra_state": Call(
        G("torch.serialization", "_get_layout"), name)})


@case("code", PICKLE_PAYLOAD, expect="")
def dtype_renamed_by_build(folder: Path, marker: Path) -> Path:
    dtype = Raw(b"ctorch\nfloat32\n}" + text("name") + text("float32\nos\nsystem") + b"sb")
    return state_zip(folder / "dtype_build.pt", {"w": plain_tensor(), "w._extra_state": dtype})


@case("code", PICKLE_PAYLOAD, expect="")
def marker_renamed_by_build(folder: Path, marker: Path) -> Path:
    strided = Raw(b"ctorch\nstrided\n}" + text("qualified_name") + text("os.system") + b"sb")
    return state_zip(folder / "marker_build.pt", {"w": plain_tensor(), "w._extra_state": strided})


@case("code", ("inspect", "count", "convert-pt"), expect="--trust")
def dcp_metadata_payload(folder: Path, marker: Path) -> Path:
    checkpoint = folder / "dcp"
    checkpoint.mkdir()
    (checkpoint / ".metadata").write_bytes(dumps(system(marker)))
    return checkpoint


@case("code", ("inspect", "count", "convert-pt", "convert-st"), expect="--trust")
def index_with_payload_shard(folder: Path, marker: Path) -> Path:
    state_zip(folder / "pytorch_model-1.bin", {"w": plain_tensor(), "x": system(marker)})
    index = folder / "pytorch_model.bin.index.json"
    index.write_text(json.dumps({"weight_map": {"w": "pytorch_model-1.bin"}}))
    return index


# --- .pt2 ExportedProgram archives (torch.export.load unpickles parts of them)


def _exported(folder: Path) -> Path:
    import torch

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.linear(x)

    path = folder / "base.pt2"
    torch.export.save(torch.export.export(Net(), (torch.ones(1, 3),)), path)
    return path


def _rewrite(source: Path, target: Path, change: Callable[[str, bytes], bytes | None],
             add: dict[str, bytes] | None = None) -> Path:
    with zipfile.ZipFile(source) as archive, zipfile.ZipFile(target, "w") as out:
        prefix = archive.namelist()[0].split("/")[0]
        for info in archive.infolist():
            data = change(info.filename.split("/", 1)[1], archive.read(info))
            if data is not None:
                out.writestr(info, data)
        for name, data in (add or {}).items():
            out.writestr(f"{prefix}/{name}", data)
    return target


def _torch_save_bytes(payload: Any) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", dumps(payload))
        archive.writestr("archive/version", b"3\n")
    return buffer.getvalue()


PT2 = ("count", "summary", "summary-train", "freeze-pt2")


@case("pt2", PT2, expect="--trust")
def pt2_use_pickle_weight(folder: Path, marker: Path) -> Path:
    def change(name: str, data: bytes) -> bytes:
        if name.endswith("weights_config.json"):
            config = json.loads(data)
            entry = config["config"]["linear.bias"]
            entry["use_pickle"] = True
            return json.dumps(config).encode()
        if name == "data/weights/weight_1":
            return _torch_save_bytes(system(marker))
        return data
    return _rewrite(_exported(folder), folder / "use_pickle.pt2", change)


@case("pt2", PT2, expect="--trust")
def pt2_sample_inputs_payload(folder: Path, marker: Path) -> Path:
    def change(name: str, data: bytes) -> bytes:
        return _torch_save_bytes(system(marker)) if name.startswith("data/sample_inputs/") else data
    return _rewrite(_exported(folder), folder / "sample_inputs.pt2", change)


@case("pt2", PT2, expect="--trust")
def pt2_opaque_constant(folder: Path, marker: Path) -> Path:
    def change(name: str, data: bytes) -> bytes:
        if name.endswith("constants_config.json"):
            return json.dumps({"config": {"c": {"path_name": "opaque_obj_0", "is_param": False,
                                                 "use_pickle": True, "tensor_meta": None}}}).encode()
        return data
    return _rewrite(_exported(folder), folder / "opaque.pt2", change,
                    add={"data/constants/opaque_obj_0": pickle.dumps(system(marker), protocol=2)})


@case("pt2", PT2, expect="compiled code")
def pt2_aotinductor_library(folder: Path, marker: Path) -> Path:
    return _rewrite(_exported(folder), folder / "aoti.pt2", lambda name, data: data,
                    add={"data/aotinductor/model/model.so": b"\x7fELF"})


@case("pt2", ("count", "summary"), expect="")
def torchscript_tampered_constants(folder: Path, marker: Path) -> Path:
    import torch

    path = folder / "script.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), path)

    def change(name: str, data: bytes) -> bytes:
        return dumps(system(marker)) if name == "constants.pkl" else data
    tampered = folder / "script_tampered.pt"
    _rewrite(path, tampered, change)
    path.unlink()
    return tampered


# --- tensor geometry (reads outside the buffer)


GEOMETRY = ("inspect", "inspect-stats", "inspect-json", "count", "convert-pt", "convert-st", "diff")


@case("geometry", GEOMETRY, expect="corrupt tensor record")
def negative_stride(folder: Path, marker: Path) -> Path:
    return state_zip(folder / "negative.pt", {"w": tensor(storage("0", 2 * 4096), (2, 4096), (4096, -1))},
                     {"0": b"\0" * (2 * 4096 * 4)})


@case("geometry", GEOMETRY, expect="corrupt tensor record")
def overflowing_stride(folder: Path, marker: Path) -> Path:
    return state_zip(folder / "overflow.pt", {"w": tensor(storage("0", 4), (2, 2), (2**40, 1 - 2**40))})


@case("geometry", GEOMETRY, expect="")
def huge_shape_over_16_bytes(folder: Path, marker: Path) -> Path:
    return state_zip(folder / "huge_shape.pt", {"w": tensor(storage("0", 4), (2**40, 2**40), (0, 0))})


@case("geometry", GEOMETRY, expect="corrupt tensor record")
def offset_2_to_62(folder: Path, marker: Path) -> Path:
    return state_zip(folder / "offset.pt", {"w": tensor(storage("0", 4), (4,), (1,), 2**62)})


@case("geometry", GEOMETRY, expect="corrupt tensor record")
def reaches_past_storage(folder: Path, marker: Path) -> Path:
    return state_zip(folder / "past.pt", {"w": tensor(storage("0", 4), (2, 4), (4, 1))})


@case("geometry", GEOMETRY, expect="")
def storage_longer_than_record(folder: Path, marker: Path) -> Path:
    return state_zip(folder / "short_record.pt", {"w": tensor(storage("0", 1 << 30), (1 << 30,), (1,))})


@case("geometry", GEOMETRY, expect="corrupt")
def bool_shape(folder: Path, marker: Path) -> Path:
    return state_zip(folder / "bool_shape.pt", {"w": tensor(storage("0", 4), (True, 2), (2, True))})


@case("geometry", ("inspect", "inspect-stats", "count", "convert-st", "diff"), expect="truncated")
def safetensors_lying_offsets(folder: Path, marker: Path) -> Path:
    return safetensors(folder / "lying.safetensors",
                       {"w": {"dtype": "F32", "shape": [1024], "data_offsets": [0, 4096]}}, b"\0" * 16)


@case("geometry", ("inspect", "inspect-stats", "count", "convert-st"), expect="")
def safetensors_huge_header_length(folder: Path, marker: Path) -> Path:
    return _written(folder / "header_len.safetensors", struct.pack("<Q", 2**63) + b"{}")


@case("code", PICKLE_PAYLOAD, expect="OrderedDict state")
def ordered_dict_metadata_not_a_dict(folder: Path, marker: Path) -> Path:
    state = Raw(b"ccollections\nOrderedDict\n)R}" + text("_metadata") + b"K\x05sb")
    return torch_zip(folder / "metadata.pt", b"\x80\x02" + dumps(state)[2:-1] + b".")


@case("geometry", ("convert-pt",), expect="different dtypes or sizes")
def storage_claimed_with_two_dtypes(folder: Path, marker: Path) -> Path:
    # Found by fuzzing: the output's storage would be too small for one of its tensors.
    return state_zip(folder / "two_claims.pt", {"a": tensor(storage("0", 4), (4,), (1,)),
                                                "b": tensor(storage("0", 4, "DoubleStorage"), (4,), (1,))},
                     {"0": b"\0" * 32})


@case("nesting", ("convert-pt",), expect="not text")
def state_dict_under_a_number(folder: Path, marker: Path) -> Path:
    # Found by fuzzing: a dotted path cannot name the key 5, so the rewrite must say so.
    return state_zip(folder / "int_key.pt", {5: Call(G("collections", "OrderedDict"), [["w", plain_tensor()]]),
                                             "epoch": 1})


# --- numpy state (never handed to numpy's __setstate__)


def _numpy_dtype(code: str, state: tuple[Any, ...]) -> Call:
    return Call(G("numpy", "dtype"), code, False, True, state=state)


@case("numpy", ("inspect", "inspect-json", "count", "convert-pt"), expect="--trust")
def numpy_dtype_field_far_away(folder: Path, marker: Path) -> Path:
    fields = {"f": (_numpy_dtype("u1", (3, "|", None, None, None, -1, -1, 0)), 2**40)}
    dtype = _numpy_dtype("V8", (3, "|", None, ("f",), fields, 8, 1, 0x10))
    scalar = Call(G("numpy.core.multiarray", "scalar"), dtype, b"\0" * 8)
    return state_zip(folder / "numpy_field.pt", {"w": plain_tensor(), "x": scalar})


@case("numpy", ("inspect", "inspect-json", "count", "convert-pt"), expect="")
def numpy_array_short_data(folder: Path, marker: Path) -> Path:
    array = Call(G("numpy.core.multiarray", "_reconstruct"), G("numpy", "ndarray"), (0,), b"b",
                 state=(1, (1 << 20,), _numpy_dtype("f8", (3, "<", None, None, None, -1, -1, 0)), False, b"\0" * 8))
    return state_zip(folder / "numpy_short.pt", {"w": plain_tensor(), "x": array})


@case("numpy", ("inspect", "inspect-json", "count"), expect="--trust")
def numpy_object_array(folder: Path, marker: Path) -> Path:
    array = Call(G("numpy.core.multiarray", "_reconstruct"), G("numpy", "ndarray"), (0,), b"b",
                 state=(1, (1,), _numpy_dtype("O8", (3, "|", None, None, None, -1, -1, 63)), False, [system(marker)]))
    return state_zip(folder / "numpy_object.pt", {"w": plain_tensor(), "x": array})


# --- memory: what a small file may make us allocate


MEMORY = ("inspect", "inspect-json", "count", "convert-pt")


@case("memory", MEMORY, expect="PTOOLS_MAX_INFLATION")
def zip_bomb_data_pkl(folder: Path, marker: Path) -> Path:
    # 100 MiB of pickle padding that deflates to ~100 KB: refused before inflating.
    padding = b"N0" * (50 << 20)
    return torch_zip(folder / "bomb.pt", b"\x80\x02" + padding + dumps({"w": plain_tensor()})[2:],
                     compress={"archive/data.pkl"})


@case("memory", MEMORY, expect="PTOOLS_MAX_PICKLE_BYTES")
def zip_bomb_data_pkl_past_the_size_limit(folder: Path, marker: Path) -> Path:
    path = folder / "bomb_size.pt"
    torch_zip(path, dumps({"w": plain_tensor()}))
    with zipfile.ZipFile(path, "a") as archive:  # a second data.pkl claiming 300 MiB; the last one wins
        archive.writestr(zipfile.ZipInfo("archive/data.pkl"), b"\x80\x02" + b"N0" * (150 << 20) + b"N.",
                         compress_type=zipfile.ZIP_DEFLATED)
    return path


@case("memory", MEMORY, expect="")
def bytearray_1_5_gb(folder: Path, marker: Path) -> Path:
    return state_zip(folder / "bytearray.pt", {"w": plain_tensor(), "x": Call(G("builtins", "bytearray"), 1_500_000_000)})


@case("memory", MEMORY, expect="")
def frozenset_of_range(folder: Path, marker: Path) -> Path:
    big = Call(G("builtins", "frozenset"), Call(G("builtins", "range"), 10_000_000))
    return state_zip(folder / "frozenset.pt", {"w": plain_tensor(), "x": big})


def text(value: str) -> bytes:
    """BINUNICODE: a string without touching the memo."""
    data = value.encode()
    return b"X" + struct.pack("<I", len(data)) + data


@case("memory", MEMORY, expect="PTOOLS_MAX_OBJECTS")
def copies_through_memo(folder: Path, marker: Path) -> Path:
    # One list of 200k items, then 2,000 frozensets of it: 400 M elements from a 1 MB pickle.
    slot = struct.pack("<I", 1_000_000)
    body = b"\x80\x02}(" + text("w") + dumps(plain_tensor())[2:-1]
    body += text("l") + dumps(list(range(200_000)))[2:-1] + b"r" + slot
    body += text("x") + b"](" + (b"cbuiltins\nfrozenset\nj" + slot + b"\x85R") * 2000 + b"eu."
    return torch_zip(folder / "memo_copies.pt", body)


@case("memory", MEMORY, expect="bytes in a pickle of")
def bytearray8_length_1_5_gb(folder: Path, marker: Path) -> Path:
    # Protocol 5's BYTEARRAY8 would zero-fill its claimed length before reading the data.
    return torch_zip(folder / "bytearray8.pt", b"\x80\x05\x96" + struct.pack("<Q", 1_500_000_000) + b".")


@case("memory", ("inspect", "count"), expect="bytes in a pickle of")
def legacy_binbytes8_length(folder: Path, marker: Path) -> Path:
    return _written(folder / "legacy_bytes.pt", dumps(0x1950A86A20F9469CFC6C) + dumps(1001)
                    + b"\x80\x04\x8e" + struct.pack("<Q", 2**40) + b".")


@case("memory", MEMORY, expect="")
def memo_index_1e8(folder: Path, marker: Path) -> Path:
    return torch_zip(folder / "memo.pt", b"\x80\x02}r" + struct.pack("<I", 100_000_000) + b".")


@case("memory", MEMORY, expect="")
def shared_references_unfold(folder: Path, marker: Path) -> Path:
    # 64 levels, each a list holding the previous one twice: 2^64 paths for a 1 KB pickle.
    data = b"\x80\x02" + dumps(plain_tensor())[2:-1] + b"q\x00"
    for level in range(64):
        data += b"](h" + bytes([level]) + b"h" + bytes([level]) + b"eq" + bytes([level + 1])
    return torch_zip(folder / "unfold.pt", data + b".")


@case("memory", MEMORY, expect="byteorder")
def byteorder_1_mb(folder: Path, marker: Path) -> Path:
    return torch_zip(folder / "byteorder.pt", dumps({"w": plain_tensor()}),
                     extra={"archive/byteorder": b"x" * (1 << 20)})


@case("memory", MEMORY, expect="byteorder")
def byteorder_deflated_128_mib(folder: Path, marker: Path) -> Path:
    path = folder / "byteorder_bomb.pt"
    torch_zip(path, dumps({"w": plain_tensor()}))
    with zipfile.ZipFile(path, "a") as archive:
        info = zipfile.ZipInfo("archive/byteorder")
        archive.writestr(info, b"big" + b" " * (128 << 20), compress_type=zipfile.ZIP_DEFLATED)
    return path


# --- nesting and self-reference (RecursionError must never surface)


NESTING = ("inspect", "inspect-json", "count", "convert-pt", "convert-st")


@case("nesting", NESTING, expect="contains itself")
def list_containing_itself(folder: Path, marker: Path) -> Path:
    body = dumps(plain_tensor())[2:-1]
    return torch_zip(folder / "self_list.pt", b"\x80\x02}(X\x01\x00\x00\x00w" + body
                     + b"X\x01\x00\x00\x00l]q\x07h\x07au.")


@case("nesting", NESTING, expect="contains itself")
def dict_model_is_itself(folder: Path, marker: Path) -> Path:
    return torch_zip(folder / "self_dict.pt", b"\x80\x02}q\x00X\x05\x00\x00\x00modelh\x00s.")


@case("nesting", NESTING, expect="PTOOLS_MAX_DEPTH")
def lists_20k_deep(folder: Path, marker: Path) -> Path:
    return torch_zip(folder / "deep_list.pt", b"\x80\x02" + b"]" * 20000 + b"a" * 19999 + b".")


@case("nesting", NESTING, expect="PTOOLS_MAX_DEPTH")
def dicts_20k_deep(folder: Path, marker: Path) -> Path:
    return torch_zip(folder / "deep_dict.pt", b"\x80\x02" + b"}X\x01\x00\x00\x00k" * 20000 + b"N" + b"s" * 20000 + b".")


@case("nesting", ("inspect", "count", "convert-st"), expect="")
def safetensors_json_100k_deep(folder: Path, marker: Path) -> Path:
    return safetensors(folder / "deep.safetensors", None,
                       header_bytes=b'{"__metadata__":' + b"[" * 100_000 + b"]" * 100_000 + b"}")


@case("nesting", ("inspect", "count", "convert-st"), expect="")
def index_json_100k_deep(folder: Path, marker: Path) -> Path:
    index = folder / "model.safetensors.index.json"
    index.write_bytes(b'{"weight_map": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    return index


@case("nesting", ("inspect", "count", "convert-st"), expect="index")
def index_naming_itself(folder: Path, marker: Path) -> Path:
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"w": "model.safetensors.index.json"}}))
    return index


# --- DCP metadata and containment


def _dcp(folder: Path, state_dict_metadata: Any, storage_data: Any, files: dict[str, bytes] | None = None) -> Path:
    checkpoint = folder / "dcp"
    checkpoint.mkdir(exist_ok=True)
    module = "torch.distributed.checkpoint.metadata"
    metadata = Call(G(module, "Metadata"), state={"state_dict_metadata": state_dict_metadata,
                                                  "storage_data": storage_data, "planner_data": None})
    (checkpoint / ".metadata").write_bytes(dumps(metadata))
    for name, data in (files or {"__0_0.distcp": b"\0" * 64}).items():
        (checkpoint / name).write_bytes(data)
    return checkpoint


def _dcp_entry(size: Any = (4,), chunks: Any = None, dtype: str = "float32") -> Call:
    module = "torch.distributed.checkpoint.metadata"
    properties = Call(G(module, "TensorProperties"), state={"dtype": G("torch", dtype)})
    if chunks is None:
        chunks = [Call(G(module, "ChunkStorageMetadata"), state={"offsets": (0,), "sizes": (4,)})]
    return Call(G(module, "TensorStorageMetadata"), state={"properties": properties, "size": size,
                                                           "chunks": chunks})


def _dcp_storage(relative: Any = "__0_0.distcp", offset: Any = 0, length: Any = 64, fqn: Any = "w",
                 chunk_offset: Any = (0,)) -> dict[Any, Any]:
    index = Call(G("torch.distributed.checkpoint.metadata", "MetadataIndex"),
                 state={"fqn": fqn, "offset": chunk_offset, "index": 0})
    info = Call(G("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
                state={"relative_path": relative, "offset": offset, "length": length})
    return {index: info}


DCP = ("inspect", "inspect-stats", "count", "convert-pt", "diff")


@case("dcp", DCP, expect="")
def dcp_chunks_is_a_number(folder: Path, marker: Path) -> Path:
    return _dcp(folder, {"w": _dcp_entry(chunks=5)}, _dcp_storage())


@case("dcp", DCP, expect="")
def dcp_offsets_is_a_number(folder: Path, marker: Path) -> Path:
    module = "torch.distributed.checkpoint.metadata"
    chunk = Call(G(module, "ChunkStorageMetadata"), state={"offsets": 7, "sizes": (4,)})
    return _dcp(folder, {"w": _dcp_entry(chunks=[chunk])}, _dcp_storage())


@case("dcp", DCP, expect="")
def dcp_size_is_text(folder: Path, marker: Path) -> Path:
    return _dcp(folder, {"w": _dcp_entry(size=("6",))}, _dcp_storage())


@case("dcp", DCP, expect="")
def dcp_size_negative(folder: Path, marker: Path) -> Path:
    return _dcp(folder, {"w": _dcp_entry(size=(-6,))}, _dcp_storage())


@case("dcp", DCP, expect="")
def dcp_length_2_to_40(folder: Path, marker: Path) -> Path:
    return _dcp(folder, {"w": _dcp_entry()}, _dcp_storage(length=2**40))


@case("dcp", DCP, expect="")
def dcp_chunk_outside_shape(folder: Path, marker: Path) -> Path:
    module = "torch.distributed.checkpoint.metadata"
    chunk = Call(G(module, "ChunkStorageMetadata"), state={"offsets": (2**40,), "sizes": (4,)})
    return _dcp(folder, {"w": _dcp_entry(chunks=[chunk])}, _dcp_storage(chunk_offset=(2**40,)))


def _dcp_chunk(offsets: Any, sizes: Any) -> Call:
    return Call(G("torch.distributed.checkpoint.metadata", "ChunkStorageMetadata"),
                state={"offsets": offsets, "sizes": sizes})


@case("dcp", DCP, expect="overlap")
def dcp_identical_chunks_add_up(folder: Path, marker: Path) -> Path:
    # Two copies of one half: 2 + 2 elements "cover" 4, and the other half was never stored.
    chunks = [_dcp_chunk((0,), (2,)), _dcp_chunk((0,), (2,))]
    return _dcp(folder, {"w": _dcp_entry(chunks=chunks)}, _dcp_storage(chunk_offset=(0,)))


@case("dcp", DCP, expect="overlap")
def dcp_chunks_overlap_in_a_row(folder: Path, marker: Path) -> Path:
    chunks = [_dcp_chunk((0, 0), (2, 4)), _dcp_chunk((1, 0), (2, 4))]  # rows 0-1 and 1-2 of 4
    storage = {**_dcp_storage(chunk_offset=(0, 0)), **_dcp_storage(chunk_offset=(1, 0))}
    return _dcp(folder, {"w": _dcp_entry(size=(4, 4), chunks=chunks)}, storage)


@case("dcp", DCP, expect="")
def dcp_zero_size_hides_2_to_80(folder: Path, marker: Path) -> Path:
    return _dcp(folder, {"w": _dcp_entry(size=(0, 2**40, 2**40), chunks=[])}, _dcp_storage())


@case("containment", DCP, expect="outside")
def dcp_relative_path_escapes(folder: Path, marker: Path) -> Path:
    (folder / "secret.distcp").write_bytes(b"\0" * 64)
    return _dcp(folder, {"w": _dcp_entry()}, _dcp_storage(relative="../secret.distcp"))


@case("containment", DCP, expect="outside")
def dcp_absolute_path(folder: Path, marker: Path) -> Path:
    secret = folder / "abs_secret.distcp"
    secret.write_bytes(b"\0" * 64)
    return _dcp(folder, {"w": _dcp_entry()}, _dcp_storage(relative=str(secret)))


@case("containment", DCP, expect="outside")
def dcp_shard_symlink_out(folder: Path, marker: Path) -> Path:
    outside = folder / "outside.bin"
    outside.write_bytes(b"\0" * 64)
    checkpoint = _dcp(folder, {"w": _dcp_entry()}, _dcp_storage(relative="link.distcp"), files={})
    os.symlink(outside, checkpoint / "link.distcp")
    return checkpoint


@case("containment", ("inspect", "count", "convert-st"), expect="outside")
def index_shard_symlink_out(folder: Path, marker: Path) -> Path:
    outside = folder / "outside"
    outside.mkdir()
    safetensors(outside / "real.safetensors", {"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
                b"\0" * 4)
    inner = folder / "model"
    inner.mkdir()
    os.symlink(outside / "real.safetensors", inner / "model-00001-of-00001.safetensors")
    index = inner / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"w": "model-00001-of-00001.safetensors"}}))
    return index


@case("containment", ("inspect", "count", "convert-st"), expect="outside")
def index_shard_dotdot(folder: Path, marker: Path) -> Path:
    safetensors(folder / "real.safetensors", {"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4)
    inner = folder / "model"
    inner.mkdir()
    index = inner / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"w": "../real.safetensors"}}))
    return index


# --- paths that are not files


@case("paths", ("inspect", "count", "convert-pt", "summary", "summary-train"), expect="FIFO")
def fifo(folder: Path, marker: Path) -> Path:
    path = folder / "pipe.pt"
    os.mkfifo(path)
    return path


@case("paths", ("inspect", "count", "convert-pt"), expect="device")
def dev_zero(folder: Path, marker: Path) -> Path:
    return Path("/dev/zero")


@case("paths", ("inspect", "count", "convert-pt"), expect="")
def empty_folder(folder: Path, marker: Path) -> Path:
    path = folder / "empty"
    path.mkdir()
    return path


@case("paths", ("inspect", "count", "convert-pt", "summary"), expect="")
def symlink_loop(folder: Path, marker: Path) -> Path:
    os.symlink(folder / "loop_b", folder / "loop_a")
    os.symlink(folder / "loop_a", folder / "loop_b")
    return folder / "loop_a"


# --- detection JSON for nms


NMS = ("nms", "nms-wbf", "nms-nmm", "nms-stream")


def _record(**overrides: Any) -> dict[str, Any]:
    return {"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.9, **overrides}


def _detections(path: Path, records: list[Any]) -> Path:
    return _written(path, json.dumps(records))


@case("nms", NMS, expect="bbox")
def nms_bool_in_bbox(folder: Path, marker: Path) -> Path:
    return _detections(folder / "bool_bbox.json", [_record(), _record(bbox=[True, 0, 10, 10])])


@case("nms", NMS, expect="image_id")
def nms_bool_image_id(folder: Path, marker: Path) -> Path:
    return _detections(folder / "bool_image.json", [_record(), _record(image_id=True)])


@case("nms", NMS, expect="score")
def nms_bool_score(folder: Path, marker: Path) -> Path:
    return _detections(folder / "bool_score.json", [_record(), _record(score=True)])


@case("nms", NMS, expect="null")
def nms_null(folder: Path, marker: Path) -> Path:
    return _written(folder / "null.json", "null")


@case("nms", NMS, expect="JSON object")
def nms_pretty_object(folder: Path, marker: Path) -> Path:
    return _written(folder / "pretty.json", json.dumps({"annotations": [_record()]}, indent=2))


@case("nms", NMS, expect="64 bits")
def nms_int_past_64_bits(folder: Path, marker: Path) -> Path:
    return _written(folder / "bigint.json",
                    '[{"image_id": 18446744073709551621, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.5}]')


@case("nms", NMS, expect="")
def nms_nan_and_infinity(folder: Path, marker: Path) -> Path:
    return _written(folder / "nan.json", '[{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1], "score": NaN}]')


@case("nms", NMS, expect="")
def nms_1e400(folder: Path, marker: Path) -> Path:
    return _written(folder / "inf.json", '[{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1e400, 1], "score": 0.5}]')


@case("nms", NMS, expect="")
def nms_deep_nesting(folder: Path, marker: Path) -> Path:
    return _written(folder / "deep.json", b"[" * 100_000 + b"]" * 100_000)


@case("nms", NMS, expect="line 1000000")
def nms_bad_line_a_million_in(folder: Path, marker: Path) -> Path:
    path = folder / "million.jsonl"
    line = json.dumps(_record()).encode() + b"\n"
    path.write_bytes(line * 999_999 + b'{"image_id": 1,\n')
    return path


@case("nms", NMS, expect="")
def nms_huge_string_id(folder: Path, marker: Path) -> Path:
    return _detections(folder / "huge_string.json", [_record(), _record(category_id=["x" * 10_000_000])])


@case("nms", NMS, expect="record 4000:")
def nms_lines_shuffled_invalid_late(folder: Path, marker: Path) -> Path:
    # streamed (--batch 1KB) through the partitions, which see records out of order
    lines = [json.dumps(_record(image_id=(n * 7919) % 500, score=0.5)) for n in range(5000)]
    lines[4000] = json.dumps(_record(image_id=3, bbox=[0, 0, -1, 5]))
    lines[4500] = json.dumps(_record(image_id=3, score="x"))
    return _written(folder / "shuffled.jsonl", "\n".join(lines) + "\n")


@case("nms", NMS, expect="bbox")
def nms_lines_one_huge_line(folder: Path, marker: Path) -> Path:
    line = json.dumps(_record(bbox=list(range(1_000_000))))  # ~7 MB on one line, past any chunk
    return _written(folder / "huge_line.jsonl", json.dumps(_record()) + "\n" + line + "\n")


@case("nms", NMS, expect="FIFO")
def nms_fifo(folder: Path, marker: Path) -> Path:
    path = folder / "pipe.json"
    os.mkfifo(path)
    return path


# --- DeepSpeed ZeRO folders (the real layout is in tests/data/zero; these are built by hand)

_ZERO_STAGE = G("deepspeed.runtime.zero.config", "ZeroStageEnum")
_LOSS_SCALER = G("deepspeed.runtime.fp16.loss_scaler", "LossScaler")


def zero_run(folder: Path, *, stage: int = 2, shapes: dict[str, tuple[Any, ...]] | None = None,
             partitions: list[int] | None = None, partition_count: Any = 2, ranks: tuple[int, ...] = (0, 1),
             latest: str = "global_step1", loss_scaler: Any = None, groups: Any = None,
             paddings: Any = None) -> Path:
    """A ZeRO run folder with DeepSpeed's layout: ``latest``, a step folder, a model-states file
    (one per rank for stage 3) and one optimizer file per rank. The defaults make a valid
    checkpoint of one 6-element parameter ``w`` over 2 ranks; each argument bends one part."""
    shapes = {"w": (6,)} if shapes is None else shapes
    partitions = [3, 3] if partitions is None else partitions
    run = folder / "run"
    step = run / "global_step1"
    step.mkdir(parents=True, exist_ok=True)
    (run / "latest").write_text(latest)
    shape_map = Call(G("collections", "OrderedDict"), [[name, shape] for name, shape in shapes.items()])
    model = {"module": Call(G("collections", "OrderedDict"), []), "buffer_names": [], "param_shapes": [shape_map],
             "shared_params": {}, "frozen_param_shapes": None, "frozen_param_fragments": None, "ds_version": "0.19.8"}
    model_files = [f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt" for rank in ranks] if stage == 3 else [
        "mp_rank_00_model_states.pt"]
    for name in model_files:
        state_zip(step / name, model, storages={})
    key = "fp32_flat_groups" if stage == 3 else "single_partition_of_fp32_groups"
    for rank in ranks:
        numel = partitions[rank] if rank < len(partitions) else partitions[-1]
        flat = [tensor(storage("0", numel), (numel,), (1,))] if groups is None else groups
        optimizer = {"zero_stage": Call(_ZERO_STAGE, stage), "partition_count": partition_count, key: flat,
                     **({} if paddings is None else {"param_alignment_paddings": paddings}),
                     "loss_scaler": loss_scaler if loss_scaler is not None else Call(_LOSS_SCALER,
                                                                                     state={"cur_scale": 1.0})}
        state_zip(step / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt", {"optimizer_state_dict": optimizer},
                  storages={"0": b"\0" * 4 * numel})
    return run


ZERO = ("inspect", "inspect-stats", "inspect-json", "count", "convert-pt", "convert-st", "diff", "convert-dcp",
        "average")


@case("code", ZERO, expect="--trust")
def zero_payload_in_optimizer_file(folder: Path, marker: Path) -> Path:
    return zero_run(folder, loss_scaler=system(marker))


@case("zero", ZERO, expect="short or missing")
def zero_partition_shorter_than_param_shapes(folder: Path, marker: Path) -> Path:
    return zero_run(folder, partitions=[3, 1])


@case("zero", ZERO, expect="short or missing")
def zero_stage3_partition_shorter(folder: Path, marker: Path) -> Path:
    return zero_run(folder, stage=3, shapes={"w": (6,), "v": (4,)}, partitions=[3, 3])


@case("geometry", CHECKPOINT_AND_WEIGHTS, expect="sizes no tensor can hold")
def zero_size_hides_2_to_80(folder: Path, marker: Path) -> Path:
    # numel is 0, so no element bound sees it; numpy refuses such a shape with a ValueError.
    return state_zip(folder / "m.pt", {"w": tensor(storage("0", 4), (0, 2**40, 2**40), (2**40, 1, 1))})


@case("memory", ("inspect-stats", "convert-st", "convert-dcp", "diff"), expect="expanded")
def four_allowed_stride0_tensors(folder: Path, marker: Path) -> Path:
    # Each alone is within the expansion bound (2^27 elements from one); together 2 GiB.
    return state_zip(folder / "m.pt", {f"w{i}": tensor(storage(str(i), 4), (2**27,), (0,)) for i in range(4)},
                     storages={str(i): b"\0" * 16 for i in range(4)})


@case("zero", ZERO, expect="short or missing")
def zero_param_shape_2_to_40(folder: Path, marker: Path) -> Path:
    return zero_run(folder, shapes={"w": (2**40,)})


@case("zero", ZERO, expect="different sizes")
def zero_stage3_ranks_hold_different_sizes(folder: Path, marker: Path) -> Path:
    return zero_run(folder, stage=3, partitions=[3, 4])


@case("zero", ZERO, expect="missing")
def zero_rank_file_missing(folder: Path, marker: Path) -> Path:
    return zero_run(folder, ranks=(0,))


@case("zero", ZERO, expect="missing")
def zero_world_size_a_million(folder: Path, marker: Path) -> Path:
    return zero_run(folder, partition_count=[1_000_000], ranks=(0, 1))


@case("zero", ZERO, expect="holds")
def zero_partition_past_its_record(folder: Path, marker: Path) -> Path:
    flat = [tensor(storage("0", 2**30), (2**30,), (1,))]
    return zero_run(folder, groups=flat)


@case("zero", ZERO, expect="flat tensors")
def zero_partition_is_a_number(folder: Path, marker: Path) -> Path:
    return zero_run(folder, groups=[5])


@case("zero", ZERO, expect="zero_stage")
def zero_stage_99(folder: Path, marker: Path) -> Path:
    run = zero_run(folder)
    optimizer = {"zero_stage": Call(_ZERO_STAGE, 99), "partition_count": 2}
    for rank in (0, 1):
        state_zip(run / "global_step1" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt",
                  {"optimizer_state_dict": optimizer}, storages={})
    return run


def _zero3_rank1_model(folder: Path, model: Any) -> Path:
    """A valid two-rank ZeRO-3 run whose rank-1 model-states file holds ``model``."""
    run = zero_run(folder, stage=3)
    path = run / "global_step1" / "zero_pp_rank_1_mp_rank_00_model_states.pt"
    torch_zip(path, dumps(model), storages={})
    return run


def _zero_model(**overrides: Any) -> Call:
    model = {"module": Call(G("collections", "OrderedDict"), []), "buffer_names": [],
             "param_shapes": [Call(G("collections", "OrderedDict"), [["w", (6,)]])], "shared_params": {},
             "frozen_param_shapes": None, "frozen_param_fragments": None, **overrides}
    return Call(G("collections", "OrderedDict"), [list(item) for item in model.items()])


@case("zero", ZERO, expect="not a mapping")
def zero_rank1_model_file_is_a_list(folder: Path, marker: Path) -> Path:
    return _zero3_rank1_model(folder, [1, 2, 3])


@case("zero", ZERO, expect="not a mapping")
def zero_rank1_frozen_fragments_a_list(folder: Path, marker: Path) -> Path:
    return _zero3_rank1_model(folder, _zero_model(frozen_param_fragments=[1, 2]))


@case("zero", ZERO, expect="not a mapping")
def zero_module_is_a_list(folder: Path, marker: Path) -> Path:
    run = zero_run(folder)
    torch_zip(run / "global_step1" / "mp_rank_00_model_states.pt", dumps(_zero_model(module=[1, 2])), storages={})
    return run


@case("containment", ZERO, expect="step folder")
def zero_latest_names_a_parent(folder: Path, marker: Path) -> Path:
    return zero_run(folder, latest="../../../etc")


@case("containment", ZERO, expect="outside")
def zero_step_folder_symlink_out(folder: Path, marker: Path) -> Path:
    elsewhere = zero_run(folder / "elsewhere")
    run = folder / "run"
    run.mkdir()
    (run / "latest").write_text("global_step1")
    os.symlink(elsewhere / "global_step1", run / "global_step1")
    return run


@case("containment", ZERO, expect="outside")
def zero_rank_file_symlink_out(folder: Path, marker: Path) -> Path:
    run = zero_run(folder)
    victim = run / "global_step1" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    outside = folder / "outside.pt"
    victim.rename(outside)
    os.symlink(outside, victim)
    return run


@case("zero", ZERO, expect="FIFO")
def zero_latest_is_a_fifo(folder: Path, marker: Path) -> Path:
    run = zero_run(folder)
    (run / "latest").unlink()
    os.mkfifo(run / "latest")
    return run


# --- per-class tables for nms (the table is the hostile input; dets.json beside it is valid)

CLASS_TABLE = ("nms-class-iou",)


def _class_table(folder: Path, name: str, content: str | bytes | None) -> Path:
    _detections(folder / "dets.json", [_record(), _record(bbox=[1, 1, 10, 10], score=0.5)])
    path = folder / name
    if content is None:
        os.mkfifo(path)
        return path
    return _written(path, content)


@case("nms", CLASS_TABLE, expect="--class-iou")
def class_table_100k_deep(folder: Path, marker: Path) -> Path:
    return _class_table(folder, "deep.json", '{"1": ' + "[" * 100_000 + "]" * 100_000 + "}")


@case("nms", CLASS_TABLE, expect="FIFO")
def class_table_fifo(folder: Path, marker: Path) -> Path:
    return _class_table(folder, "table.json", None)


@case("nms", CLASS_TABLE, expect="must be a number")
def class_table_text_value(folder: Path, marker: Path) -> Path:
    return _class_table(folder, "text.json", '{"1": "0.5"}')


@case("nms", CLASS_TABLE, expect="between 0 and 1")
def class_table_iou_out_of_range(folder: Path, marker: Path) -> Path:
    return _class_table(folder, "range.json", '{"1": 5}')


@case("nms", CLASS_TABLE, expect="larger than 1 MiB")
def class_table_past_1_mb(folder: Path, marker: Path) -> Path:
    return _class_table(folder, "big.json", "{" + ", ".join(f'"{i}": 0.5' for i in range(200_000)) + "}")
