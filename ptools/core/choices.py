"""The closed sets of values ptools' options take, as ``Literal`` types.

One definition serves the library's signatures and the command line: Typer lists a
Literal's values in ``--help`` and refuses any other value as a usage error (exit 2),
so no command re-checks them by hand. Torch-free and numpy-free: the CLI imports this at
start-up.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

NmsMethod = Literal[
    "hard", "and", "merge", "diou", "soft", "wbf", "nmw", "nmm", "greedy-nmm", "vision", "vision_batch", "batched", "or"
]
SoftFunction = Literal["gaussian", "linear"]
BoxFormat = Literal["xywh", "xyxy", "cxcywh"]
DetectionsFormat = Literal["json", "jsonl"]
NmsDevice = Literal["cpu", "cuda"]
IouKind = Literal["iou", "giou", "diou", "ciou", "ios"]
ConfType = Literal["avg", "max", "box_and_model_avg", "absent_model_aware_avg"]

SelectOrder = Literal["free-memory", "utilization", "index"]
GpuFormat = Literal["table", "prometheus"]

BatchNormMode = Literal["frozen", "eval", "none"]

SummaryDtype = Literal["float32", "float16", "bfloat16", "float64", "fp32", "fp16", "bf16"]
SummaryMode = Literal["eval", "train"]
SummaryFormat = Literal["table", "torchsummary"]
TrainOptimizer = Literal["adamw", "adam", "sgd"]
TrainTarget = Literal["cuda", "cpu"]

CastDtype = Literal["fp16", "bf16", "fp32", "float16", "bfloat16", "float32", "half", "float"]
CastScope = Literal["weights", "all"]
CheckpointOutputFormat = Literal["torch", "safetensors", "dcp"]
ZeroWeights = Literal["master", "module"]


def values(choice: Any) -> tuple[str, ...]:
    """The allowed values of a choice type, in order."""
    return get_args(choice)
