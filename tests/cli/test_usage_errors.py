"""Usage errors: a value outside an option's choices, or a malformed value, exits 2 with the
allowed values, before any work; --help lists the choices."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from ptools.cli.app import app

runner = CliRunner()


def flat(text: str) -> str:
    """Typer's boxed error as one line of words."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


CHOICES = [
    (["nms", "x.json", "--method", "sfot"], "'hard', 'and', 'merge', 'diou', 'soft'"),
    (["nms", "x.json", "--soft-fn", "cosine"], "'gaussian', 'linear'"),
    (["nms", "x.json", "--box-format", "yolo"], "'xywh', 'xyxy', 'cxcywh'"),
    (["nms", "x.json", "--output-format", "csv"], "'json', 'jsonl'"),
    (["nms", "x.json", "--device", "tpu"], "'cpu', 'cuda'"),
    (["gpu-info", "--select", "1", "--order", "fastest"], "'free-memory', 'utilization', 'index'"),
    (["freeze", "resnet18", "--layers", "layer1", "--bn", "freeze"], "'frozen', 'eval', 'none'"),
    (["summary", "resnet18", "--dtype", "int8"], "'float32', 'float16', 'bfloat16', 'float64'"),
    (["summary", "resnet18", "--mode", "training"], "'eval', 'train'"),
    (["summary", "resnet18", "--format", "torchinfo"], "'table', 'torchsummary'"),
    (["convert-ckpt", "a.pt", "b.pt", "--dtype", "fp8"], "'fp16', 'bf16', 'fp32'"),
    (["convert-ckpt", "a.pt", "b.pt", "--format", "onnx"], "'torch', 'safetensors'"),
    (["convert-ckpt", "a.pt", "b.pt", "--cast-scope", "some"], "'weights', 'all'"),
]

MALFORMED = [
    (["summary", "resnet18", "--device", "tpu"], "unknown device 'tpu'; choose auto, cpu, meta, cuda or cuda:N"),
    (["summary", "resnet18", "--input-size", "3,a"], "is not a list of integers"),
    (["count-params", "resnet18", "--kwargs", "{oops"], "--kwargs is not valid JSON"),
    (["gpu-info", "--select", "1", "--min-free-memory", "lots"], "invalid size 'lots'"),
    (["convert-ckpt", "a.pt", "b", "--shard-size", "lots"], "invalid size 'lots'"),
    (["convert-ckpt", "a.pt", "b.pt", "--map-location", "cuda:x"], "is not a device"),
]


@pytest.mark.parametrize(("args", "allowed"), CHOICES, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_unknown_choice_is_exit_2_listing_the_choices(args: list[str], allowed: str) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert f"is not one of {allowed}" in flat(result.stderr)


@pytest.mark.parametrize(("args", "message"), MALFORMED, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_malformed_value_is_exit_2(args: list[str], message: str) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in flat(result.stderr)


@pytest.mark.parametrize(("args", "allowed"), CHOICES, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_help_lists_the_choices(args: list[str], allowed: str) -> None:
    """In the option's row: as its metavar (``<a|b>``) or, where the list would not fit in 80
    columns (``--method METHOD``), in its help text."""
    option = next(a for a in args if a.startswith("--") and a not in ("--layers", "--select"))
    choices = [value.strip("'") for value in allowed.split(", ")]
    help_text = flat(runner.invoke(app, [args[0], "--help"], env={"COLUMNS": "80"}).stdout)
    options = help_text.partition(" Options: ")[2]
    row = re.search(re.escape(option) + r"(?:, --[a-z-]+)? (.*?)(?= --[a-z]| -h, --help)", options)
    assert row, options
    assert row.group(1).startswith("<" + "|".join(choices)) or all(
        re.search(rf"\b{re.escape(choice)}\b", row.group(1)) for choice in choices), row.group(1)


@pytest.mark.parametrize(("args", "expected"), [
    (["nms", "x.json", "--method", "sfot"], "Did you mean 'soft'? (see 'ptools nms -h')"),
    (["nms", "x.json", "--iuo", "0.3"], "No such option: --iuo (Possible options: --iou)"),
    (["nmss"], "No such command 'nmss'. Did you mean 'nms'?"),
    (["summary", "resnet18", "--input-size", "3,a"], "is not a list of integers"),
])
def test_a_usage_error_from_the_shell_is_one_line_with_a_suggestion(args: list[str], expected: str) -> None:
    """They were 5-7-line boxes with no "did you mean"."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "ptools", *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], done.stderr


def test_the_method_is_case_insensitive(tmp_path) -> None:  # noqa: ANN001
    """`--method Soft` was refused."""
    detections = tmp_path / "d.json"
    detections.write_text('[{"image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.9}]')
    result = runner.invoke(app, ["nms", str(detections), "--method", "Soft", "-o", str(tmp_path / "out.json")])
    assert result.exit_code == 0, result.stderr
    assert "soft" in result.stderr.lower()
