"""Listing a checkpoint: ptools inspect-state-dict vs torch.load and safetensors, in one run.

    python benchmarks/bench_inspect.py [--runs 5] [--keep DIR]

Makes a training checkpoint (64 tensors of 2048x2048 fp32 under model_state_dict, BatchNorm
buffers, an optimizer entry, an epoch; keys prefixed module. as DDP saves them; ~1.07 GB), a ~105 MB one of the same layout, and a
~1.07 GB safetensors file, then times each way of listing their keys (name, shape, dtype) as
fresh processes: median wall time and median peak RSS over --runs. Files are in the page
cache (just written), as on a machine where the checkpoint was recently used.
Targets (issue 3): ptools <= 0.3 s and <= 150 MB, independent of file size.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TORCH_LIST = ("import sys, torch; sd = torch.load(sys.argv[1], map_location='cpu'{mmap})['model_state_dict'];"
              " rows = [(k, tuple(v.shape), v.dtype) for k, v in sd.items()]")
SAFE_OPEN_LIST = ("import sys; from safetensors import safe_open\n"
                  "with safe_open(sys.argv[1], framework='pt') as f:\n"
                  "    rows = [(k, f.get_slice(k).get_shape(), f.get_slice(k).get_dtype()) for k in f.keys()]")
LOAD_FILE_LIST = ("import sys; from safetensors.torch import load_file; sd = load_file(sys.argv[1]);"
                  " rows = [(k, tuple(v.shape), v.dtype) for k, v in sd.items()]")


def make_files(folder: Path) -> dict[str, Path]:
    """The benchmark files (made once per folder); torch is imported only to write them."""
    files = {"100 MB torch": folder / "ckpt_100mb.pt", "1 GB torch": folder / "ckpt_1gb.pt",
             "1 GB safetensors": folder / "model_1gb.safetensors"}
    if all(path.exists() for path in files.values()):
        return files
    import torch
    from safetensors.torch import save_file

    def training(side: int) -> dict:
        state = {}  # saved from a DistributedDataParallel model: every key starts with module.
        for index in range(64):
            state[f"module.blocks.{index}.weight"] = torch.randn(side, side)
            state[f"module.blocks.{index}.bn.running_mean"] = torch.zeros(side)
            state[f"module.blocks.{index}.bn.running_var"] = torch.ones(side)
            state[f"module.blocks.{index}.bn.num_batches_tracked"] = torch.tensor(100)
        return {"model_state_dict": state, "epoch": 42,
                "optimizer_state_dict": {"state": {}, "param_groups": [{"lr": 0.1, "params": list(range(64))}]}}

    torch.save(training(640), files["100 MB torch"])
    big = training(2048)
    torch.save(big, files["1 GB torch"])
    save_file(big["model_state_dict"], str(files["1 GB safetensors"]))
    return files


def measure(argv: list[str], runs: int) -> tuple[float, float, int]:
    """Median wall seconds and median peak RSS (MB) of ``argv`` as a fresh process."""
    walls, peaks, code = [], [], 0
    for _ in range(runs):
        start = time.perf_counter()
        process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _, status, usage = os.wait4(process.pid, 0)
        walls.append(time.perf_counter() - start)
        peaks.append(usage.ru_maxrss / 1024)  # Linux reports KiB
        code = os.waitstatus_to_exitcode(status)
    return statistics.median(walls), statistics.median(peaks), code


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--keep", type=Path, default=None, help="folder to keep the files in")
    parser.add_argument("--make-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    folder = args.keep or Path(tempfile.mkdtemp(prefix="ptools-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    if args.make_only:
        make_files(folder)
        return
    # Made in a child process: a parent that imported torch would inflate every child's
    # peak RSS (a forked child starts by sharing the parent's pages).
    subprocess.run([sys.executable, __file__, "--make-only", "--keep", str(folder)], check=True)
    files = make_files(folder)
    script = Path(sys.executable).with_name("ptools")
    ptools = [str(script)] if script.exists() else [sys.executable, "-m", "ptools"]
    py = sys.executable

    cases: list[tuple[str, str, list[str]]] = [("-", 'python -c "import torch" (floor of the torch ways)',
                                                 [py, "-c", "import torch"])]
    for label in ("100 MB torch", "1 GB torch"):
        path = str(files[label])
        cases += [
            (label, "ptools inspect-state-dict --json", [*ptools, "inspect-state-dict", path, "--json"]),
            (label, "torch.load(map_location='cpu')", [py, "-c", TORCH_LIST.format(mmap=""), path]),
            (label, "torch.load(mmap=True)", [py, "-c", TORCH_LIST.format(mmap=", mmap=True"), path]),
        ]
    path = str(files["1 GB safetensors"])
    cases += [
        ("1 GB safetensors", "ptools inspect-state-dict --json", [*ptools, "inspect-state-dict", path, "--json"]),
        ("1 GB safetensors", "safetensors safe_open (metadata)", [py, "-c", SAFE_OPEN_LIST, path]),
        ("1 GB safetensors", "safetensors.torch.load_file", [py, "-c", LOAD_FILE_LIST, path]),
    ]
    sizes = {label: os.path.getsize(p) / 1e6 for label, p in files.items()}
    print(f"{args.runs} runs each, median; files in {folder}: "
          + ", ".join(f"{k} = {v:.0f} MB" for k, v in sizes.items()))
    header = f"{'file':18} {'how':52} {'wall s':>8} {'peak RSS MB':>12} {'exit':>5}  target"
    print(header)
    print("-" * len(header))
    for label, how, argv in cases:
        wall, peak, code = measure(argv, args.runs)
        target = ""
        if how.startswith("ptools"):
            target = "<= 0.3 s, <= 150 MB " + ("ok" if wall <= 0.3 and peak <= 150 else "MISSED")
        print(f"{label:18} {how:52} {wall:8.3f} {peak:12.0f} {code:>5}  {target}")


if __name__ == "__main__":
    main()
