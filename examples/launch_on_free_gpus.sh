#!/usr/bin/env bash
# Launch a job on the N GPUs with the most free memory, or stop with a clear reason.
#   examples/launch_on_free_gpus.sh 2 python train.py --epochs 10
set -euo pipefail
count="$1"; shift
# One numbering for ptools and the job: PCI order is stable even on mixed GPUs.
export CUDA_DEVICE_ORDER=PCI_BUS_ID
devices=$(ptools gpu-info --select "$count" --min-free-memory 20GiB --max-utilization 30)
echo "running on CUDA_VISIBLE_DEVICES=$devices" >&2
CUDA_VISIBLE_DEVICES="$devices" exec "$@"
