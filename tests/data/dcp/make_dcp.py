"""Save a real two-rank torch.distributed.checkpoint folder on CPU (gloo), for the tests.

    python -m torch.distributed.run --nproc-per-node 2 tests/data/dcp/make_dcp.py OUT_FOLDER

DTensors sharded by rows, by columns, unevenly (5 over 2 ranks) and replicated: each layout
DCP writes as chunks of its own. ``OUT_FOLDER/../full.pt`` holds the whole tensors.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor


def main(out: str) -> None:
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (2,))
    torch.manual_seed(0)
    full = {"rows": torch.randn(6, 4), "cols": torch.randn(4, 6), "uneven": torch.randn(5), "rep": torch.randn(3)}
    layouts = {"rows": [Shard(0)], "cols": [Shard(1)], "uneven": [Shard(0)], "rep": [Replicate()]}
    dcp.save({name: distribute_tensor(full[name], mesh, layouts[name]) for name in full}, checkpoint_id=out)
    if dist.get_rank() == 0:
        torch.save(full, os.path.join(os.path.dirname(os.path.abspath(out)), "full.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
