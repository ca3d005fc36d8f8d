"""Streaming NMS over large JSON Lines: byte for byte the in-memory result, grouped or not,
the same errors, bounded batches, and temporary files gone on success, error and Ctrl-C."""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ptools.core import detections as core
from ptools.core import streaming
from ptools.core.streaming import stream_nms
from ptools.errors import BadInputError


def _records(images: int, per_image: int, seed: int = 0, ids: str = "int") -> list[dict]:
    generator = np.random.default_rng(seed)
    records = []
    for image in range(images):
        for _ in range(int(generator.integers(0, per_image + 1))):
            x, y = generator.uniform(0, 200, 2).round(1).tolist()
            w, h = generator.uniform(1, 60, 2).round(1).tolist()
            image_id: object = image * 7 + 3 if ids == "int" else f"img{image:03d}"
            if ids == "mixed" and image % 2:
                image_id = str(image)
            records.append({"image_id": image_id, "category_id": int(generator.integers(1, 4)),
                            "bbox": [x, y, w, h], "score": float(generator.choice([0.3, 0.5, 0.7, 0.9])),
                            "extra": {"n": len(records)}})  # fmt: skip
    return records


def _write(path: Path, records: list, blank_lines: bool = False, crlf: bool = False) -> Path:
    end = b"\r\n" if crlf else b"\n"
    lines = []
    for record in records:
        lines.append(orjson.dumps(record) + end)
        if blank_lines and len(lines) % 17 == 0:
            lines.append(b"   " + end)
    path.write_bytes(b"".join(lines))
    return path


def _in_memory(path: Path, output_format: str, **options) -> tuple[bytes, dict]:
    records, _ = core.parse_detections(path.read_bytes())
    detections = core.validate(records, options.pop("box_format", "xywh"), options.pop("skip_invalid", False))
    tables = {key: core.resolve_class_table(options.pop(key), detections.category_ids)
              for key in ("class_iou", "class_score_threshold") if key in options}  # fmt: skip
    kept, report = core.run_nms(detections, keep_input=False, **tables, **options)
    return core.dump_detections(kept, output_format), report.to_dict()


def _streamed(path: Path, output_format: str, batch: int, tmp_dir: Path | None = None, **options) -> tuple[bytes, dict]:
    handle = io.BytesIO()
    report = stream_nms(str(path), handle, output_format=output_format, batch_bytes=batch,
                        tmp_dir=None if tmp_dir is None else str(tmp_dir), **options)  # fmt: skip
    return handle.getvalue(), report.to_dict()


def _same(tmp_path: Path, records: list, batch: int, output_format: str = "jsonl", expect: str | None = None,
          **options) -> None:  # fmt: skip
    path = _write(tmp_path / "in.jsonl", records)
    expected, expected_report = _in_memory(path, output_format, **dict(options))
    got, report = _streamed(path, output_format, batch, tmp_path, **options)
    assert got == expected
    streamed = report.pop("streamed")
    if expect is not None:
        assert streamed.startswith(expect), streamed
    for r in (report, expected_report):
        r.pop("seconds")
    assert expected_report.pop("streamed") is None
    assert report == expected_report
    assert [p.name for p in tmp_path.iterdir()] == ["in.jsonl"]  # no temporary file left


ORDERS = ["grouped", "shuffled", "descending"]


def _ordered(records: list, order: str, seed: int = 0) -> list:
    if order == "shuffled":
        records = records[:]
        random.Random(seed).shuffle(records)
    elif order == "descending":
        by_image: dict = {}
        for record in records:
            by_image.setdefault(record["image_id"], []).append(record)
        records = [r for image in sorted(by_image, reverse=True) for r in by_image[image]]
    return records


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("method", ["hard", "soft", "merge", "greedy-nmm", "wbf"])
@pytest.mark.parametrize("output_format", ["jsonl", "json"])
def test_streaming_is_byte_identical(tmp_path, order, method, output_format) -> None:
    records = _ordered(_records(60, 40), order)
    _same(tmp_path, records, 4096, output_format, expect="grouped" if order == "grouped" else "partitioned",
          method=method, iou_threshold=0.55 if method == "wbf" else 0.5)  # fmt: skip


@pytest.mark.parametrize("ids", ["int", "str", "mixed"])
@pytest.mark.parametrize("order", ORDERS)
def test_ids_options_and_per_class_tables(tmp_path, ids, order) -> None:
    records = _ordered(_records(40, 30, seed=3, ids=ids), order, seed=5)
    _same(tmp_path, records, 2048, max_det=5, agnostic=False, class_iou={"2": 0.3}, class_score_threshold={"3": 0.6})
    _same(tmp_path, records, 2048, method="diou", agnostic=True, score_threshold=0.4)


def test_blank_lines_crlf_and_one_image_larger_than_a_batch(tmp_path) -> None:
    records = _records(5, 400, seed=1)
    for crlf in (False, True):
        path = _write(tmp_path / "in.jsonl", records, blank_lines=True, crlf=crlf)
        expected, _ = _in_memory(path, "jsonl")
        for batch in (1024, 3000, 50_000):
            got, report = _streamed(path, "jsonl", batch)
            assert got == expected
            assert report["streamed"] == "grouped"
        path.write_bytes(b"".join(random.Random(2).sample(path.read_bytes().splitlines(keepends=True),
                                                          len(path.read_bytes().splitlines()))))  # fmt: skip
        expected, _ = _in_memory(path, "jsonl")
        assert _streamed(path, "jsonl", 1024)[0] == expected


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), order=st.sampled_from(ORDERS), batch=st.integers(1024, 20_000),
       method=st.sampled_from(["hard", "soft", "nmm"]))  # fmt: skip
def test_random_inputs_and_batches(tmp_path_factory, seed, order, batch, method) -> None:
    folder = tmp_path_factory.mktemp("random")
    records = _ordered(_records(int(seed % 30) + 1, 25, seed=seed), order, seed)
    if records:
        _same(folder, records, batch, method=method)


def _error(call) -> str:
    with pytest.raises(BadInputError) as failure:
        call()
    return str(failure.value)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("where", [3, 300, 500])
def test_errors_name_the_same_record_and_line(tmp_path, order, where) -> None:
    """The first invalid record in file order, as the in-memory path names it, even when the
    partitions see records out of order; a line that is not JSON by its number."""
    records = _ordered(_records(40, 40), order)
    records[where] = {**records[where], "bbox": [1, 2, 3]}
    records[where + 100] = {**records[where + 100], "score": "high"}
    path = _write(tmp_path / "in.jsonl", records)
    expected = _error(lambda: _in_memory(path, "jsonl"))
    assert f"record {where}:" in expected
    assert _error(lambda: _streamed(path, "jsonl", 2048, tmp_path)) == expected
    records[where] = "not a record"
    path = _write(tmp_path / "in.jsonl", records)
    assert _error(lambda: _streamed(path, "jsonl", 2048, tmp_path)) == _error(lambda: _in_memory(path, "jsonl"))
    lines = path.read_bytes().splitlines(keepends=True)
    lines[where] = b'{"image_id": 1,\n'
    path.write_bytes(b"".join(lines))
    assert f"line {where + 1} is not valid JSON" in _error(lambda: _streamed(path, "jsonl", 2048, tmp_path))
    assert [p.name for p in tmp_path.iterdir()] == ["in.jsonl"]


@pytest.mark.parametrize("order", ORDERS)
def test_skip_invalid_counts_the_same(tmp_path, order) -> None:
    records = _ordered(_records(30, 30), order)
    for position in (0, 50, 51, 400):
        records[position] = {"image_id": True} if position % 2 else {**records[position], "bbox": None}
    _same(tmp_path, records, 2048, skip_invalid=True)


def test_unknown_class_key_is_an_error_only_if_no_batch_knows_it(tmp_path) -> None:
    records = _records(30, 30, ids="str")
    records[-1] = {**records[-1], "category_id": "rare"}  # only in the last batch
    path = _write(tmp_path / "in.jsonl", records)
    _streamed(path, "jsonl", 2048, class_iou={"rare": 0.3})
    message = _error(lambda: _streamed(path, "jsonl", 2048, class_iou={"rear": 0.3}))
    assert message.startswith("`class_iou`: class 'rear' is not a category id")
    message = _error(lambda: _streamed(path, "jsonl", 2048, class_score_threshold={"rare": "high"}))
    assert message.startswith("`class_score_threshold`: the value for class 'rare' must be a number")


@pytest.mark.parametrize("order", ["grouped", "shuffled"])
def test_temporary_files_go_on_ctrl_c(tmp_path, order) -> None:
    path = _write(tmp_path / "in.jsonl", _ordered(_records(40, 40), order))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    calls = []

    def interrupt(phase, done, total, records, images) -> None:
        calls.append(phase)
        if len(calls) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        stream_nms(str(path), io.BytesIO(), batch_bytes=2048, tmp_dir=str(scratch), progress=interrupt)
    assert list(scratch.iterdir()) == []


@pytest.mark.parametrize("order", ["grouped", "shuffled"])
def test_progress_reports_bytes_records_and_images(tmp_path, order) -> None:
    """Bytes go up to the file's size in each pass (the partitions' second pass included),
    records read and images done are counted, and the phase is named."""
    path = _write(tmp_path / "in.jsonl", _ordered(_records(20, 30), order))
    seen = []
    stream_nms(str(path), io.BytesIO(), batch_bytes=2048, progress=lambda *args: seen.append(args))
    phase, done, total, records, images = seen[-1]
    assert (done, total) == (path.stat().st_size, path.stat().st_size)
    assert records == len(path.read_bytes().splitlines()) and images == 20
    phases = [args[0] for args in seen]
    if order == "shuffled":
        assert "partitioning" in phases and phase.startswith("running part ")
        running = [args[1] for args in seen if args[0].startswith("running part")]
        assert running == sorted(running) and 0 < running[0] < total  # part by part, not stuck
    else:
        assert set(phases) == {"running"}


def test_batches_bound_what_is_held(tmp_path, monkeypatch) -> None:
    """No batch holds much more than its share of the file (the largest image aside)."""
    records = _ordered(_records(200, 30), "shuffled")
    path = _write(tmp_path / "in.jsonl", records)
    sizes = []
    original = streaming._Run.run_batch

    def spy(self, batch, offset=0):
        sizes.append(len(batch))
        return original(self, batch, offset)

    monkeypatch.setattr(streaming._Run, "run_batch", spy)
    for order in ("grouped", "shuffled"):
        path = _write(tmp_path / "in.jsonl", _ordered(_records(200, 30), order))
        sizes.clear()
        _streamed(path, "jsonl", 20_000)
        per_record = path.stat().st_size / sum(sizes)
        assert len(sizes) > 5 and max(sizes) * per_record < 2 * 20_000 + 30 * 200, (order, sizes)


def _ptools(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "ptools", "nms", *args], input=stdin, capture_output=True)


def test_cli_streams_files_and_stdin(tmp_path) -> None:
    records = _ordered(_records(50, 30), "shuffled")
    path = _write(tmp_path / "in.jsonl", records)
    in_memory = _ptools(str(path), "--method", "soft")
    assert in_memory.returncode == 0, in_memory.stderr
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    streamed = _ptools(str(path), "--method", "soft", "--batch", "4KB", "--tmp-dir", str(scratch))
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout == in_memory.stdout
    assert b"streamed (partitioned in" in streamed.stderr
    piped = _ptools("-", "--method", "soft", "--batch", "4KB", "--tmp-dir", str(scratch), "-o",
                    str(tmp_path / "out.jsonl"), "--json", stdin=path.read_bytes())  # fmt: skip
    assert piped.returncode == 0, piped.stderr
    assert (tmp_path / "out.jsonl").read_bytes() == in_memory.stdout
    assert json.loads(piped.stdout)["streamed"].startswith("partitioned")
    assert list(scratch.iterdir()) == []
    grouped = _ptools(str(_write(tmp_path / "g.jsonl", _records(50, 30))), "--batch", "4KB", "--json", "-o",
                      str(tmp_path / "g_out.jsonl"))  # fmt: skip
    assert json.loads(grouped.stdout)["streamed"] == "grouped"


def test_cli_refusals_leave_nothing(tmp_path) -> None:
    records = _records(50, 30)
    records[-3] = {**records[-3], "score": None}
    path = _write(tmp_path / "in.jsonl", records)
    out = tmp_path / "out.jsonl"
    failed = _ptools(str(path), "--batch", "4KB", "-o", str(out))
    assert failed.returncode == 1 and b"field 'score'" in failed.stderr
    assert not out.exists() and sorted(os.listdir(tmp_path)) == ["in.jsonl"]
    failed = _ptools(str(path), "--batch", "4KB")
    assert failed.returncode == 1 and failed.stdout == b""  # nothing half-written on stdout either
    missing = _ptools(str(path), "--batch", "4KB", "--tmp-dir", str(tmp_path / "nope"))
    assert missing.returncode == 1 and b"--tmp-dir" in missing.stderr
    tiny = _ptools(str(path), "--batch", "100")
    assert tiny.returncode == 2 and b"at least 1KB" in tiny.stderr


def test_a_full_temporary_disk_is_one_error_and_leaves_nothing(tmp_path, monkeypatch) -> None:
    """A disk that fills up under the partitions: one BadInputError naming the folder and the
    way out, not a traceback; nothing left in the scratch folder."""
    path = _write(tmp_path / "in.jsonl", _ordered(_records(40, 30), "shuffled"))
    scratch = tmp_path / "scratch"
    scratch.mkdir()

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(streaming, "_write_bucket_output", full)
    message = _error(lambda: _streamed(path, "jsonl", 2048, scratch))
    assert f"cannot write temporary files in {scratch}: No space left on device" in message
    assert list(scratch.iterdir()) == []
    message = _error(lambda: _streamed(path, "jsonl", 2048, tmp_path / "missing"))
    assert "cannot write temporary files" in message and "missing" in message


def test_an_unreadable_input_is_one_error(tmp_path) -> None:
    message = _error(lambda: _streamed(tmp_path / "gone.jsonl", "jsonl", 2048))
    assert "gone.jsonl" in message
