"""Broken, lying and hostile files: one clean error each, never a traceback or a hang."""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ptools.core.checkpoint import iter_stats, list_checkpoint, open_checkpoint
from ptools.errors import BadInputError, PtoolsError
from tests.checkpoint_fixtures import save_legacy, save_safetensors, save_sharded_safetensors, save_zip


def expect_error(path: Path, pattern: str) -> None:
    with pytest.raises(BadInputError, match=pattern):
        checkpoint = open_checkpoint(path)
        listing = list_checkpoint(checkpoint)
        list(iter_stats(checkpoint, listing.rows))


def safetensors_file(path: Path, header: dict, data: bytes, header_length: int | None = None) -> Path:
    raw = json.dumps(header).encode()
    length = len(raw) if header_length is None else header_length
    path.write_bytes(struct.pack("<Q", length) + raw + data)
    return path


ENTRY = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize(("name", "content", "pattern"), [
    ("empty.pt", b"", "empty file"),
    ("lfs.pt", b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 1234\n", "Git LFS pointer.*git lfs pull"),
    ("random.pt", bytes(range(256)) * 4, "unknown format"),
    ("text.json", b'{"hello": 1}', "not a sharded-checkpoint index"),
    ("bad.json", b"{not json", "not valid JSON"),
    ("empty.zip", b"PK\x05\x06" + b"\0" * 18, "without data.pkl"),
])
def test_not_a_checkpoint(tmp_path: Path, name: str, content: bytes, pattern: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    expect_error(path, pattern)


def test_missing_path_and_plain_folder(tmp_path: Path) -> None:
    expect_error(tmp_path / "nope.pt", "no such file")
    expect_error(tmp_path, "folder is not a checkpoint: no DCP .metadata")


def test_zip_that_is_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "notes.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("notes.txt", "hello")
    expect_error(path, "without data.pkl")


@pytest.mark.parametrize("keep", [0.3, 0.6, 0.95])
def test_truncated_zip(tmp_path: Path, keep: float) -> None:
    path = save_zip({"w": torch.randn(64, 64)}, tmp_path / "full.pt")
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    expect_error(path, "corrupt|truncated")


def test_missing_storage_record(tmp_path: Path) -> None:
    path = save_zip({"w": torch.randn(4), "b": torch.randn(2)}, tmp_path / "full.pt")
    with zipfile.ZipFile(path) as archive:
        records = [(i.filename, archive.read(i)) for i in archive.infolist() if not i.filename.endswith("data/1")]
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in records:
            archive.writestr(name, data)
    expect_error(path, "storage record .*data/1 is missing")


def test_truncated_legacy(tmp_path: Path) -> None:
    path = save_legacy({"w": torch.randn(100)}, tmp_path / "legacy.pt")
    data = path.read_bytes()
    path.write_bytes(data[:-50])
    expect_error(path, "truncated")
    # The message counts storages; it named torch's in-memory storage id before (a number
    # like 94414258115952 that means nothing to the reader).
    expect_error(path, r"storage 1 of 1 needs bytes .* the file has .*; the file is cut short")


@pytest.mark.parametrize(("header", "data", "length", "pattern"), [
    ({"w": ENTRY}, b"\0" * 8, 10**12, "header claims 1000000000000 bytes"),
    ({"w": ENTRY}, b"\0" * 8, 10**9, "header claims"),
    ({"w": {**ENTRY, "data_offsets": [0, 16]}}, b"\0" * 8, None, "span 16 bytes, its dtype and shape need 8"),
    ({"w": {**ENTRY, "data_offsets": [8, 16]}}, b"\0" * 16, None, "a gap of 8 bytes"),
    ({"a": ENTRY, "b": ENTRY}, b"\0" * 8, None, "overlap"),
    ({"w": ENTRY}, b"\0" * 4, None, "truncated or padded"),
    ({"w": ENTRY}, b"\0" * 12, None, "truncated or padded"),
    ({"w": {**ENTRY, "dtype": "F128"}}, b"\0" * 8, None, "unknown dtype 'F128'"),
    ({"w": {**ENTRY, "shape": [-2]}}, b"\0" * 8, None, "not a list of sizes"),
    ({"w": {**ENTRY, "data_offsets": [8, 0]}}, b"\0" * 8, None, "data_offsets .* are invalid"),
    ({"w": [1, 2]}, b"", None, "not an object"),
    ({"__metadata__": {"a": 1}}, b"", None, "must map strings to strings"),
])
def test_lying_safetensors_headers(tmp_path: Path, header: dict, data: bytes, length: int | None,
                                   pattern: str) -> None:
    expect_error(safetensors_file(tmp_path / "x.safetensors", header, data, length), pattern)


def test_safetensors_header_not_json(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", 5) + b"{abc}")
    expect_error(path, "not valid JSON")


def test_missing_and_escaping_shards(tmp_path: Path) -> None:
    index = save_sharded_safetensors({"a": torch.ones(2), "b": torch.zeros(3)}, tmp_path / "s")
    (tmp_path / "s" / "model-00002-of-00002.safetensors").unlink()
    expect_error(index, "shard 'model-00002-of-00002.safetensors' listed in the index is missing")
    index.write_text(json.dumps({"weight_map": {"a": "../../etc/passwd"}}))
    expect_error(index, "points outside")
    index.write_text(json.dumps({"weight_map": {"zzz": "model-00001-of-00002.safetensors"}}))
    expect_error(index, "tensor 'zzz' is not in shard")


def test_tensor_reaching_past_its_storage(tmp_path: Path) -> None:
    """A pickle that claims a bigger tensor than its storage: refused when values are read."""
    path = save_zip({"w": torch.arange(4.0)}, tmp_path / "w.pt")
    with zipfile.ZipFile(path) as archive:
        records = [(i.filename, archive.read(i)) for i in archive.infolist()]
    patched = []
    for name, data in records:
        if name.endswith("data.pkl"):
            # The shape tuple (4,) becomes (9,): BININT1 4 TUPLE1 -> BININT1 9 TUPLE1.
            assert data.count(b"K\x04\x85") == 1
            data = data.replace(b"K\x04\x85", b"K\x09\x85")
        patched.append((name, data))
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in patched:
            archive.writestr(name, data)
    expect_error(path, "reaches past the end of storage")


# ---------------------------------------------------------------- fuzzing


def _valid_files(folder: Path) -> list[bytes]:
    state = {"w": torch.randn(3, 4), "b": torch.arange(5), "h": torch.ones(2, dtype=torch.bfloat16)}
    return [
        save_zip({"model": state, "epoch": 1}, folder / "a.pt").read_bytes(),
        save_legacy(state, folder / "b.pt").read_bytes(),
        save_safetensors(state, folder / "c.safetensors").read_bytes(),
    ]


@pytest.fixture(scope="module")
def valid_files(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    return _valid_files(tmp_path_factory.mktemp("fuzz-seeds"))


def _read_everything(path: Path) -> None:
    try:
        checkpoint = open_checkpoint(path)
        listing = list_checkpoint(checkpoint)
        list(iter_stats(checkpoint, listing.rows))
    except PtoolsError:
        pass  # a clean, typed error is the expected outcome for a damaged file


@settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.integers(0, 2), cut=st.floats(0, 1))
def test_fuzz_truncation(tmp_path: Path, valid_files: list[bytes], which: int, cut: float) -> None:
    data = valid_files[which]
    path = tmp_path / "fuzz.bin"
    path.write_bytes(data[: int(len(data) * cut)])
    _read_everything(path)


@settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.integers(0, 2), flips=st.lists(st.tuples(st.floats(0, 1), st.integers(1, 255)),
                                                min_size=1, max_size=6))
def test_fuzz_byte_flips(tmp_path: Path, valid_files: list[bytes], which: int,
                         flips: list[tuple[float, int]]) -> None:
    data = bytearray(valid_files[which])
    for where, mask in flips:
        data[min(int(where * len(data)), len(data) - 1)] ^= mask
    path = tmp_path / "fuzz.bin"
    path.write_bytes(bytes(data))
    _read_everything(path)


@settings(max_examples=200, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edit=st.sampled_from(["dtype", "shape", "offsets", "length"]), value=st.integers(-2**40, 2**40))
def test_fuzz_safetensors_header_edits(tmp_path: Path, valid_files: list[bytes], edit: str, value: int) -> None:
    data = valid_files[2]
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    body = data[8 + length:]
    if edit == "dtype":
        header["w"]["dtype"] = ["F16", "I8", "BOOL", "F64", "X"][value % 5]
    elif edit == "shape":
        header["w"]["shape"] = [value, 2]
    elif edit == "offsets":
        header["w"]["data_offsets"][value % 2] = value
    raw = json.dumps(header).encode()
    claimed = value if edit == "length" else len(raw)
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(struct.pack("<Q", claimed % 2**64) + raw + body)
    _read_everything(path)


def test_absurd_stride_zero_expansion_is_refused(tmp_path: Path) -> None:
    """shape (2**40,) over one stored element would take hours to scan: refused on opening."""
    path = save_zip({"w": torch.ones(1).expand(3)}, tmp_path / "expanded.pt")
    with zipfile.ZipFile(path) as archive:
        records = [(i.filename, archive.read(i)) for i in archive.infolist()]
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in records:
            if name.endswith("data.pkl"):
                assert data.count(b"K\x03\x85") == 1  # shape (3,) -> (2**40,): LONG1 5 bytes
                data = data.replace(b"K\x03\x85", b"\x8a\x06\x00\x00\x00\x00\x00\x01\x85")
            archive.writestr(name, data)
    with pytest.raises(BadInputError, match="claims 1,099,511,627,776 elements over 1 stored.*PTOOLS_MAX_EXPANSION"):
        open_checkpoint(path)
