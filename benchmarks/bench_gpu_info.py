"""Start-up and gpu-info timings, against what a user would run instead, in one run.

    python benchmarks/bench_gpu_info.py [--runs 7]

Each command runs --runs times as a fresh process; the table shows the median (and min/max)
wall time. Alternatives (nvidia-smi, gpustat) are timed when present on this machine.
Targets (issue 2): `ptools --help` <= 0.25 s; `gpu-info --no-torch` and `--require 1` on a
machine without GPUs <= 0.5 s.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

TARGETS = {"ptools --help": 0.25, "ptools gpu-info --no-torch --json": 0.5,
           "ptools gpu-info --require 1": 0.5, "ptools gpu-info --select 1": 0.5}


def ptools_command() -> list[str]:
    script = Path(sys.executable).with_name("ptools")
    return [str(script)] if script.exists() else [sys.executable, "-m", "ptools"]


def time_command(argv: list[str], runs: int) -> tuple[list[float], int]:
    times, code = [], 0
    for _ in range(runs):
        start = time.perf_counter()
        code = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
        times.append(time.perf_counter() - start)
    return times, code


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    ptools = ptools_command()
    cases: list[tuple[str, list[str]]] = [
        ("ptools --help", [*ptools, "--help"]),
        ("ptools gpu-info --no-torch --json", [*ptools, "gpu-info", "--no-torch", "--json"]),
        ("ptools gpu-info --require 1", [*ptools, "gpu-info", "--require", "1"]),
        ("ptools gpu-info --select 1", [*ptools, "gpu-info", "--select", "1"]),
        ("ptools gpu-info --json (full, imports torch)", [*ptools, "gpu-info", "--json"]),
        ('python -c "import torch"', [sys.executable, "-c", "import torch"]),
        ("python -c \"import torch; torch.cuda.is_available()\"",
         [sys.executable, "-c", "import torch; torch.cuda.is_available()"]),
    ]
    if shutil.which("nvidia-smi"):
        cases.append(("nvidia-smi", ["nvidia-smi"]))
    if shutil.which("gpustat"):
        cases.append(("gpustat --json", ["gpustat", "--json"]))
    subprocess.run([*ptools, "--help"], capture_output=True)  # warm the file cache once

    header = f"{'command':58} {'median s':>9} {'min s':>7} {'max s':>7} {'exit':>4}  target"
    print(f"{args.runs} runs each; python {sys.version.split()[0]}")
    print(header)
    print("-" * len(header))
    for label, argv in cases:
        times, code = time_command(argv, args.runs)
        median = statistics.median(times)
        target = TARGETS.get(label)
        verdict = "" if target is None else f"<= {target} s {'ok' if median <= target else 'MISSED'}"
        print(f"{label:58} {median:9.3f} {min(times):7.3f} {max(times):7.3f} {code:>4}  {verdict}")


if __name__ == "__main__":
    main()
