"""The two small guards everything rests on, tested directly: the tensor geometry validator
(against a slow reference that walks every element) and the writer's global table; then
hypothesis fuzzing of geometry and of pickle opcode streams over the allowlist."""

from __future__ import annotations

import itertools
import pickletools
import struct
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ptools.core.checkpoint.tensors import StorageRef, check_geometry
from ptools.core.checkpoint.unpickle import TorchDType, TorchMarker, unpickle
from ptools.core.checkpoint.writers import OUTPUT_GLOBALS, GlobalRef, build_torch_pickle, check_output_global
from ptools.core.convert import convert_checkpoint
from ptools.errors import BadInputError, PtoolsError
from tests.checkpoint_fixtures import varied_state_dict


def reference_in_bounds(shape: tuple[int, ...], stride: tuple[int, ...], offset: int, storage_elements: int) -> bool:
    """Slow and obvious: every element's index, one by one, inside the storage."""
    if any(s < 0 for s in stride) or offset < 0:
        return False
    for index in itertools.product(*(range(size) for size in shape)):
        position = offset + sum(i * s for i, s in zip(index, stride))
        if position >= storage_elements:
            return False
    return True


@pytest.mark.parametrize(("shape", "stride", "offset", "elements", "ok"), [
    ((2, 3), (3, 1), 0, 6, True),
    ((2, 3), (3, 1), 1, 6, False),          # one past the end
    ((3, 2), (1, 3), 0, 6, True),           # transposed
    ((4,), (0,), 5, 6, True),               # expanded
    ((2, 4096), (4096, -1), 0, 8192, False),  # negative stride reads before the data
    ((2, 2), (2**40, 1 - 2**40), 0, 4, False),
    ((0, 5), (5, 1), 10**6, 0, True),       # empty: reads nothing (offset still sane)
    ((), (), 3, 4, True),                   # 0-d
    ((), (), 4, 4, False),
])
def test_geometry_against_cases(shape: tuple[int, ...], stride: tuple[int, ...], offset: int, elements: int,
                                ok: bool) -> None:
    if ok:
        check_geometry(shape, stride, offset, 4, elements * 4)
    else:
        with pytest.raises(BadInputError, match="corrupt tensor record"):
            check_geometry(shape, stride, offset, 4, elements * 4)


@pytest.mark.parametrize(("shape", "stride", "offset"), [
    ((True, 2), (2, 1), 0), ((2.0,), (1,), 0), ((2,), (1, 1), 0), ([2], (1,), 0), ((2,), (1,), -1),
    ((2,), (1,), 2**62), ((2**62,), (1,), 0), (("2",), (1,), 0), ((2,) * 65, (1,) * 65, 0),
])
def test_geometry_refuses_malformed_records(shape: Any, stride: Any, offset: Any) -> None:
    with pytest.raises(BadInputError):
        check_geometry(shape, stride, offset, 4, 1 << 40)


def test_geometry_bounds_expansion() -> None:
    check_geometry((1 << 27,), (0,), 0, 4, 4)  # a large expand of one value is legitimate
    with pytest.raises(BadInputError, match="PTOOLS_MAX_EXPANSION"):
        check_geometry((2**28, 2**28), (0, 0), 0, 4, 16)
    # Past 2^58 elements no tensor can exist at all: refused before any expansion question.
    with pytest.raises(BadInputError, match="sizes no tensor can hold"):
        check_geometry((2**40, 2**40), (0, 0), 0, 4, 16)
    with pytest.raises(BadInputError, match="sizes no tensor can hold"):
        check_geometry((0, 2**40, 2**40), (0, 0, 0), 0, 4, 16)  # numel 0 hid it from every bound


@settings(max_examples=400, deadline=None)
@given(shape=st.lists(st.integers(0, 4), max_size=3), data=st.data(), offset=st.integers(-2, 30),
       elements=st.integers(0, 40))
def test_geometry_agrees_with_the_reference(shape: list[int], data: st.DataObject, offset: int, elements: int) -> None:
    stride = tuple(data.draw(st.lists(st.integers(-3, 12), min_size=len(shape), max_size=len(shape))))
    expected = reference_in_bounds(tuple(shape), stride, offset, elements) if 0 not in shape else (
        offset >= 0 and all(s >= 0 for s in stride))
    try:
        check_geometry(tuple(shape), stride, offset, 2, elements * 2)
        accepted = True
    except BadInputError:
        accepted = False
    assert accepted == expected


# ----------------------------------------------------------------------------- the writer's globals


def _globals_in(pickle_bytes: bytes) -> set[tuple[str, str]]:
    found = set()
    for opcode, argument, _ in pickletools.genops(pickle_bytes):
        if opcode.name in ("GLOBAL", "INST"):
            module, name = argument.split(" ", 1)
            found.add((module, name))
        assert opcode.name != "STACK_GLOBAL"
    return found


@pytest.mark.parametrize("qualified", ["os.system", "builtins.eval", "torch.load", "torch\nos", "numpy.load",
                                       "ptools.core.checkpoint.readers.DcpBytes"])
def test_the_table_refuses_what_it_does_not_hold(qualified: str) -> None:
    module, _, name = qualified.rpartition(".")
    with pytest.raises(BadInputError, match="writes only tensors and plain data"):
        check_output_global(module, name)
    with pytest.raises(BadInputError):
        GlobalRef(module, name)


def test_markers_and_dtypes_cannot_smuggle_a_global() -> None:
    with pytest.raises(BadInputError, match="global"):
        build_torch_pickle({"x": TorchMarker("os.system")}, lambda t: None, lambda t: t.dtype)
    with pytest.raises(BadInputError, match="global"):
        build_torch_pickle({"x": TorchDType("float32\nos\nsystem")}, lambda t: None, lambda t: t.dtype)
    with pytest.raises(AttributeError):
        TorchDType("float32").name = "os"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        TorchMarker("torch.strided").qualified_name = "os.system"  # type: ignore[misc]


def test_every_global_convert_writes_is_in_the_table(tmp_path: Path) -> None:
    import argparse

    import numpy as np

    source = tmp_path / "in.pt"
    torch.save({"state_dict": varied_state_dict(), "args": argparse.Namespace(lr=0.1), "best": np.float64(0.5),
                "hist": np.arange(4), "dtype": torch.float16, "layout": torch.strided, "size": torch.Size([2]),
                "device": torch.device("cuda", 1), "tags": {"a"}, "frozen": frozenset({1}), "raw": b"\x00\x01",
                "span": range(3), "z": 1 + 2j}, source)
    out = tmp_path / "out.pt"
    convert_checkpoint(source, out)
    with zipfile.ZipFile(out) as archive:
        data = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    assert _globals_in(data) <= OUTPUT_GLOBALS | {("__builtin__", n) for n in ("set", "frozenset", "complex", "xrange",
                                                                            "bytearray", "slice")}
    assert torch.load(out, weights_only=False)["hist"].tolist() == [0, 1, 2, 3]


# ----------------------------------------------------------------------------- fuzzing the reader


_GLOBALS = [b"ctorch._utils\n_rebuild_tensor_v2\n", b"ctorch\nFloatStorage\n", b"ctorch\nfloat32\n",
            b"ccollections\nOrderedDict\n", b"cbuiltins\nset\n", b"cbuiltins\nfrozenset\n", b"cbuiltins\nrange\n",
            b"cbuiltins\nbytearray\n", b"c_codecs\nencode\n", b"cargparse\nNamespace\n", b"cnumpy\ndtype\n",
            b"cnumpy.core.multiarray\nscalar\n", b"cnumpy.core.multiarray\n_reconstruct\n", b"cnumpy\nndarray\n",
            b"ctorch.serialization\n_get_layout\n", b"ctorch._tensor\n_rebuild_from_type_v2\n",
            b"ctorch._utils\n_rebuild_parameter\n", b"ctorch\nSize\n", b"ctorch\ndevice\n", b"cos\nsystem\n",
            b"cbuiltins\ngetattr\n", b"ctorch\nstrided\n"]
_OPCODES = [b"(", b"t", b"\x85", b"\x86", b"\x87", b")", b"]", b"}", b"a", b"e", b"s", b"u", b"R", b"b", b"\x81",
            b"\x92", b"Q", b"N", b"\x88", b"\x89", b"0", b"2", b"o", b"\x91", b"\x90", b"\x94", b"l", b"d"]


def _opcode_stream() -> st.SearchStrategy[bytes]:
    pieces = st.one_of(
        st.sampled_from(_GLOBALS), st.sampled_from(_OPCODES),
        st.integers(-2**40, 2**63).map(lambda n: b"\x8a" + bytes([(n.bit_length() + 8) // 8])
                                       + n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)),
        st.integers(0, 255).map(lambda n: b"K" + bytes([n])),
        st.text(max_size=12).map(lambda t: b"X" + struct.pack("<I", len(t.encode())) + t.encode()),
        st.binary(max_size=12).map(lambda b: b"C" + bytes([len(b)]) + b),
        st.integers(0, 8).map(lambda n: b"q" + bytes([n])), st.integers(0, 8).map(lambda n: b"h" + bytes([n])),
        st.sampled_from([b"r\x00\xe1\xf5\x05", b"j\x00\xe1\xf5\x05"]),  # memo index 10^8
        st.just(b"(X\x07\x00\x00\x00storageq\x00h\x00X\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x04tQ"),
    )
    return st.lists(pieces, max_size=40).map(lambda parts: b"\x80\x02" + b"".join(parts) + b".")


def _any_storage(key: str, location: str, size: int) -> StorageRef:
    return StorageRef(file="fuzz", key=key, size_bytes=size, location=location)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream=_opcode_stream())
def test_random_opcode_streams_give_only_clean_errors(stream: bytes) -> None:
    try:
        unpickle(stream, _any_storage, what="fuzz")
    except PtoolsError as error:
        assert "\n" not in error.message and len(error.message) < 1000


def test_only_floating_tensors_keep_requires_grad(tmp_path: Path) -> None:
    """Found by fuzzing: torch refuses an integer tensor that requires grad, so ptools drops the flag."""
    from ptools.core.checkpoint import open_checkpoint
    from tests.hostile.corpus import Call, G, state_zip, storage

    def rebuilt(key: str, kind: str) -> Call:
        return Call(G("torch._utils", "_rebuild_tensor_v2"), storage(key, 4, kind), 0, (4,), (1,), True,
                    Call(G("collections", "OrderedDict")))

    path = state_zip(tmp_path / "grad.pt", {"i": rebuilt("0", "LongStorage"), "f": rebuilt("1", "FloatStorage")},
                     {"0": b"\0" * 32, "1": b"\0" * 16})
    root = open_checkpoint(path).root
    assert (root["i"].requires_grad, root["f"].requires_grad) == (False, True)
    convert_checkpoint(path, tmp_path / "out.pt")
    assert torch.load(tmp_path / "out.pt", weights_only=True)["f"].requires_grad


def test_a_storage_shared_by_every_tensor_stays_linear(tmp_path: Path) -> None:
    """20k tensors on one storage once cost 20k × 20k names in the listing (4·10^8)."""
    from ptools.core.checkpoint import list_checkpoint, open_checkpoint
    from tests.hostile.corpus import state_zip, storage, tensor

    shared = storage("0", 4)
    path = state_zip(tmp_path / "shared.pt", {f"t{i}": tensor(shared, (4,), (1,)) for i in range(20_000)})
    rows = list_checkpoint(open_checkpoint(path)).rows
    assert len(rows) == 20_000
    assert rows[0].shares_storage_count == 19_999 and len(rows[0].shares_storage_with) == 16
    assert rows[5].shares_storage_with[:2] == ["t0", "t1"]
