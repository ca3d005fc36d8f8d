"""Pick GPUs for a job from Python, the way `ptools gpu-info --select` does.

    python examples/pick_gpus.py 2 --min-free-gib 20

Prints the CUDA_VISIBLE_DEVICES value to use, or why no choice can be made (exit 3).
"""

import argparse
import sys

from ptools import RequirementNotMetError
from ptools.core.gpu import query_devices, select_devices

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("count", type=int)
parser.add_argument("--min-free-gib", type=float, default=None)
args = parser.parse_args()

report = query_devices(use_torch=False)  # NVML only: fast, no CUDA context
for problem in report.problems:
    print(f"note: {problem}", file=sys.stderr)
try:
    min_free = int(args.min_free_gib * 2**30) if args.min_free_gib is not None else None
    chosen = select_devices(report, args.count, min_free_memory_bytes=min_free)
except RequirementNotMetError as failure:
    print(f"cannot pick GPUs: {failure}", file=sys.stderr)
    sys.exit(3)
print(",".join(device.visible_devices_entry for device in chosen))
