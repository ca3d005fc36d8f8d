"""The one place where the library's words become command-line words.

Core errors, hints and notes name Python parameters in backticks (`iou_threshold`,
`trust=True`, `extract='auto'`), which is what a library caller passes. A person at the
command line passes flags: this module rewrites the former into the latter (``--iou``,
``--trust``, ``--extract auto``) for every message a command prints.
"""

from __future__ import annotations

import re

# Python spelling -> flag spelling, shared by every command.
FLAGS = {
    "trust=True": "--trust",
    "force=True": "--force",
    "skip_invalid=True": "--skip-invalid",
    "flatten=True": "--flatten",
    "strict=True": "--strict",
    "extract='auto'": "--extract auto",
    "extract": "--extract",
    "strip='auto'": "--strip-prefix auto",
    "strip": "--strip-prefix",
    "rename": "--rename",
    "keep": "--keep",
    "drop": "--drop",
    "drop_optimizer": "--drop-optimizer",
    "dtype": "--dtype",
    "keep_dtype": "--keep-dtype",
    "cast_scope": "--cast-scope",
    "map_location": "--map-location",
    "format": "--format",
    "shard_size": "--shard-size",
    "key": "--key",
    "name_filter": "--filter",
    "depth": "--depth",
    "iou_threshold": "--iou",
    "score_threshold": "--score-thr",
    "max_det": "--max-det",
    "sigma": "--sigma",
    "soft_fn": "--soft-fn",
    "method": "--method",
    "box_format": "--box-format",
    "device": "--device",
    "ground_truth": "--eval",
    "input_size": "--input-size",
    "ray_address='host:6379'": "--ray-address host:6379",
    "ray": "--ray",
    "input_spec": "--input-spec",
    "batch_size": "--batch-size",
    "kwargs": "--kwargs",
    "weights": "--weights",
    "bn": "--bn",
    "layers": "--layers",
    "trainable_out": "--trainable-out",
    "output_format": "--format",
    "tag": "--tag",
    "take_last=True": "--take-last",
    "take_last": "--take-last",
    "average": "--average",
    "agnostic": "--agnostic",
    "skip_box_threshold": "--skip-box-thr",
    "conf_type": "--conf-type",
    "model_weights": "--model-weights",
    "class_iou": "--class-iou",
    "class_score_threshold": "--class-score-thr",
    "criterion": "--criterion",
    "tmp_dir": "--tmp-dir",
    "batch_bytes": "--batch",
}

# Where one parameter is another flag in one command.
PER_COMMAND = {
    "convert-ckpt": {"key": "--extract"},
}

_QUOTED = re.compile(r"`([^`]+)`")


def cli_words(text: str, command: str | None = None) -> str:
    """``text`` with each backticked Python name replaced by its flag (other backticked text,
    such as a command to run, stays as it is)."""
    overrides = PER_COMMAND.get(command or "", {})

    def flag(match: re.Match[str]) -> str:
        name = match.group(1)
        return overrides.get(name) or FLAGS.get(name) or match.group(0)

    return _QUOTED.sub(flag, text)
