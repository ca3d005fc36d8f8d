"""Converting a checkpoint: ptools convert-ckpt vs the scripts people write, in one run.

    python benchmarks/bench_convert.py [--runs 5] [--keep DIR]

Uses the ~1.07 GB training checkpoint of bench_inspect.py (64 x 2048x2048 fp32 under
model_state_dict, keys prefixed module., BatchNorm buffers, optimizer entry, epoch) and its
~1.07 GB safetensors twin. Each way runs --runs times as a fresh process, writing a new file
on the same disk; the table shows median wall time and median peak RSS.
Targets (issue 4): wall <= 1.3 x (cp + python -c "import torch"), both measured here;
peak RSS <= file size + 0.8 GB.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_inspect import make_files, measure  # noqa: E402  (same folder, shared fixtures)

TORCH_SCRIPT = """
import sys, torch
checkpoint = torch.load(sys.argv[1], map_location="cpu"{mmap})
state = checkpoint["model_state_dict"]
state = {{k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}}
torch.save(state, sys.argv[2])
"""
SAFETENSORS_SCRIPT = """
import sys, torch
from safetensors.torch import load_file, save_file
state = load_file(sys.argv[1])
save_file({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, sys.argv[2])
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--keep", type=Path, default=None, help="folder holding bench_inspect's files")
    args = parser.parse_args()
    folder = args.keep or Path(tempfile.mkdtemp(prefix="ptools-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, str(Path(__file__).with_name("bench_inspect.py")), "--make-only",
                    "--keep", str(folder)], check=True)
    files = make_files(folder)
    source, safetensors_source = str(files["1 GB torch"]), str(files["1 GB safetensors"])
    out = str(folder / "out.pt")
    out_st = str(folder / "out.safetensors")
    script = Path(sys.executable).with_name("ptools")
    ptools = [str(script)] if script.exists() else [sys.executable, "-m", "ptools"]
    py = sys.executable
    cases = [
        ("cp IN OUT", ["cp", source, out]),
        ('python -c "import torch"', [py, "-c", "import torch"]),
        ("ptools convert-ckpt --map-location cpu --strip-prefix auto --extract auto",
         [*ptools, "convert-ckpt", source, out, "--map-location", "cpu", "--strip-prefix", "auto",
          "--extract", "auto", "--force"]),
        ("torch.load + strip + torch.save", [py, "-c", TORCH_SCRIPT.format(mmap=""), source, out]),
        ("torch.load(mmap=True) + strip + torch.save", [py, "-c", TORCH_SCRIPT.format(mmap=", mmap=True"), source, out]),
        ("ptools convert-ckpt model.safetensors out.safetensors --dtype fp16",
         [*ptools, "convert-ckpt", safetensors_source, out_st, "--dtype", "fp16", "--force"]),
        ("safetensors load_file + half() + save_file", [py, "-c", SAFETENSORS_SCRIPT, safetensors_source, out_st]),
    ]
    size_gb = os.path.getsize(source) / 1e9
    print(f"{args.runs} runs each, median; input {size_gb:.2f} GB in {folder} (page cache warm)")
    header = f"{'how':74} {'wall s':>8} {'peak RSS MB':>12} {'exit':>5}"
    print(header)
    print("-" * len(header))
    results = {}
    for label, argv in cases:
        wall, peak, code = measure(argv, args.runs)
        results[label] = (wall, peak)
        print(f"{label:74} {wall:8.3f} {peak:12.0f} {code:>5}")
        for path in (out, out_st):
            if os.path.exists(path):
                os.unlink(path)
    floor = results["cp IN OUT"][0] + results['python -c "import torch"'][0]
    wall, peak = results["ptools convert-ckpt --map-location cpu --strip-prefix auto --extract auto"]
    limit_rss = size_gb * 1000 + 800
    print(f"\ntarget wall <= 1.3 x (cp + import torch) = {1.3 * floor:.3f} s: ptools {wall:.3f} s "
          f"{'ok' if wall <= 1.3 * floor else 'MISSED'}")
    print(f"target peak RSS <= file + 0.8 GB = {limit_rss:.0f} MB: ptools {peak:.0f} MB "
          f"{'ok' if peak <= limit_rss else 'MISSED'}")
    print(f"speed-up vs torch.load + save: {results['torch.load + strip + torch.save'][0] / wall:.1f}x; "
          f"vs the mmap script: {results['torch.load(mmap=True) + strip + torch.save'][0] / wall:.1f}x")


if __name__ == "__main__":
    main()
