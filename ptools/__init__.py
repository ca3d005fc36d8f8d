"""ptools: a toolbox for people who train and ship PyTorch models.

The documented entry points are attributes of this package, loaded on first use (PEP 562),
so ``import ptools`` stays cheap: it imports neither torch nor numpy. The library lives in
:mod:`ptools.core`; the command line in :mod:`ptools.cli`.

    import ptools

    checkpoint = ptools.open_checkpoint("run/last.ckpt")
    report = ptools.convert_checkpoint("ddp.ckpt", "model.safetensors", extract="auto", strip="auto")
    keep, scores = ptools.nms(boxes, scores, labels, method="soft")
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ptools.errors import BadInputError, PtoolsError, RequirementNotMetError, UnsafeFileError

__version__ = "0.1.0"

# name -> the module that defines it
_API = {
    # checkpoints
    "open_checkpoint": "ptools.core.checkpoint",
    "list_checkpoint": "ptools.core.checkpoint",
    "read_tensor": "ptools.core.checkpoint",
    "iter_stats": "ptools.core.checkpoint",
    "diff_state_dicts": "ptools.core.checkpoint",
    "convert_checkpoint": "ptools.core.convert",
    "plan_conversion": "ptools.core.convert",
    "execute_conversion": "ptools.core.convert",
    "strip_prefix": "ptools.core.keys",
    "add_prefix": "ptools.core.keys",
    "rename_keys": "ptools.core.keys",
    "select_keys": "ptools.core.keys",
    "cast_floating": "ptools.core.keys",
    # detections
    "nms": "ptools.core.nms",
    "box_iou": "ptools.core.boxes",
    "fuse_groups": "ptools.core.fusion",
    "merge_groups": "ptools.core.merging",
    # models
    "load_model": "ptools.core.models",
    "count_model": "ptools.core.models",
    "count_checkpoint": "ptools.core.models",
    "freeze": "ptools.core.models",
    "unfreeze": "ptools.core.models",
    "trainable_parameters": "ptools.core.models",
    "summarize": "ptools.core.summary",
    "make_inputs": "ptools.core.summary",
    "estimate_training_step": "ptools.core.training",
    "fit_batch_size": "ptools.core.training",
    # GPUs
    "query_devices": "ptools.core.gpu",
    "select_devices": "ptools.core.gpu",
    "require_devices": "ptools.core.gpu",
}

__all__ = ["BadInputError", "PtoolsError", "RequirementNotMetError", "UnsafeFileError", "__version__", *_API]


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'ptools' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # what type checkers and IDEs see
    from ptools.core.boxes import box_iou
    from ptools.core.checkpoint import diff_state_dicts, iter_stats, list_checkpoint, open_checkpoint, read_tensor
    from ptools.core.convert import convert_checkpoint, execute_conversion, plan_conversion
    from ptools.core.fusion import fuse_groups
    from ptools.core.gpu import query_devices, require_devices, select_devices
    from ptools.core.keys import add_prefix, cast_floating, rename_keys, select_keys, strip_prefix
    from ptools.core.models import (
        count_checkpoint,
        count_model,
        freeze,
        load_model,
        trainable_parameters,
        unfreeze,
    )
    from ptools.core.nms import nms
    from ptools.core.summary import make_inputs, summarize
    from ptools.core.training import estimate_training_step, fit_batch_size
