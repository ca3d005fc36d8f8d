"""The one way ptools opens a checkpoint: by content, metadata first, never running code.

from ptools.core.checkpoint import open_checkpoint, list_checkpoint, read_tensor

checkpoint = open_checkpoint("run/last.ckpt")          # metadata only, no torch import
listing = list_checkpoint(checkpoint, key="auto")       # finds the model weights
for row in listing.rows:
    print(row.name, row.tensor.dtype, row.tensor.shape)
values = read_tensor(checkpoint, listing.rows[0].tensor)  # numpy, one tensor at a time
"""

from ptools.core.checkpoint.diff import StateDictDiff, detect_prefix, diff_state_dicts
from ptools.core.checkpoint.listing import (
    Listing,
    TensorRow,
    group_by_prefix,
    iter_stats,
    list_checkpoint,
    totals,
)
from ptools.core.checkpoint.readers import FORMATS, Checkpoint, open_checkpoint, read_safetensors_header
from ptools.core.checkpoint.structure import find_state_dict, flatten, iter_tensors, navigate
from ptools.core.checkpoint.tensors import StorageRef, TensorInfo, is_buffer_name
from ptools.core.checkpoint.values import TensorStats, decode, max_abs_difference, read_tensor, tensor_stats

__all__ = [
    "FORMATS",
    "Checkpoint",
    "Listing",
    "StateDictDiff",
    "StorageRef",
    "TensorInfo",
    "TensorRow",
    "TensorStats",
    "decode",
    "detect_prefix",
    "diff_state_dicts",
    "find_state_dict",
    "flatten",
    "group_by_prefix",
    "is_buffer_name",
    "iter_stats",
    "iter_tensors",
    "list_checkpoint",
    "max_abs_difference",
    "navigate",
    "open_checkpoint",
    "read_safetensors_header",
    "read_tensor",
    "tensor_stats",
    "totals",
]
