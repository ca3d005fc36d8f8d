#!/usr/bin/env bash
# Launch a job on the N GPUs with the most free memory, or stop with a clear reason (exit 3)
# without starting it.
#   examples/launch_on_free_gpus.sh 2 python train.py --epochs 10
set -euo pipefail
count="$1"; shift
# One numbering for ptools and the job: PCI order is stable even on mixed GPUs.
export CUDA_DEVICE_ORDER=PCI_BUS_ID
# ptools sets CUDA_VISIBLE_DEVICES and replaces itself with the job (same pid, signals, exit code).
exec ptools gpu-info --select "$count" --min-free-memory 20GiB --max-utilization 30 -- "$@"
