"""Consolidating a DeepSpeed ZeRO checkpoint: ptools convert-ckpt vs DeepSpeed's zero_to_fp32, in one run.

    pip install deepspeed huggingface_hub      # DeepSpeed makes the checkpoints and is the baseline
    python benchmarks/bench_zero.py [--runs 3] [--keep DIR] [--stages 2,3]

Makes real ZeRO-2 and ZeRO-3 checkpoints of a ~251M-parameter model on CPU with 2 ranks
(tests/data/zero/make_zero.py --model 250m: ~1 GB of fp32 master weights; making them is not
timed), then runs each way --runs times as a fresh process and prints median wall time and
median peak RSS:

- ptools convert-ckpt RUN out.safetensors
- DeepSpeed's API: get_fp32_state_dict_from_zero_checkpoint(RUN), then torch.save
- DeepSpeed's script: python -m deepspeed.utils.zero_to_fp32 RUN OUT_DIR (its defaults)
- cp of the optimizer files (the floor of any way that reads them)

Targets (issue 12): ptools' peak RSS <= 1/4 of zero_to_fp32's and <= largest parameter + 300 MB;
wall <= zero_to_fp32's and <= 2 x the cp. After the timings, ptools' output is checked bit for
bit against DeepSpeed's consolidation.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_inspect import measure  # noqa: E402  (same folder, shared fixtures)

ROOT = Path(__file__).resolve().parents[1]
LARGEST_PARAMETER_MB = 32003 * 1024 * 4 / 1e6  # the tied embedding of make_zero.py's 250m model
API_SCRIPT = """
import sys, torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
torch.save(get_fp32_state_dict_from_zero_checkpoint(sys.argv[1]), sys.argv[2])
"""
CHECK_SCRIPT = """
import sys, torch
from safetensors import safe_open
expected = torch.load(sys.argv[2], weights_only=True)
with safe_open(sys.argv[1], "pt") as handle:
    names = set(handle.keys())
    aliases = {k: v for k, v in (handle.metadata() or {}).items() if k in expected and v in names}
    for name, tensor in expected.items():
        got = handle.get_tensor(aliases.get(name, name))
        assert got.dtype == tensor.dtype and torch.equal(got.reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), name
print(f"{len(expected)} tensors bit-exact")
"""


def make(folder: Path, stages: list[str]) -> None:
    missing = [stage for stage in stages if not (folder / f"{stage}-fp32" / "latest").exists()]
    if missing:
        configs = ",".join(f"{stage}-fp32" for stage in missing)
        print(f"making ZeRO-{'/'.join(missing)} checkpoints of the 250M model in {folder} (not timed) …", flush=True)
        subprocess.run(
            [sys.executable, str(ROOT / "tests/data/zero/make_zero.py"), str(folder), "--configs", configs,
             "--model", "250m", "--no-expected"],
            check=True,
        )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--keep", type=Path, default=None, help="folder to keep the checkpoints in")
    parser.add_argument("--stages", default="2,3")
    args = parser.parse_args()
    folder = args.keep or Path(tempfile.mkdtemp(prefix="ptools-bench-zero-"))
    folder.mkdir(parents=True, exist_ok=True)
    stages = args.stages.split(",")
    make(folder, stages)
    script = Path(sys.executable).with_name("ptools")
    ptools = [str(script)] if script.exists() else [sys.executable, "-m", "ptools"]
    py = sys.executable
    os.environ["DS_ACCELERATOR"] = "cpu"  # DeepSpeed's ways, on this GPU-less machine
    out = folder / "out"
    print(f"{args.runs} runs each, median; page cache warm; largest parameter {LARGEST_PARAMETER_MB:.0f} MB")
    verdicts = []
    for stage in stages:
        run = folder / f"{stage}-fp32"
        step = run / (run / "latest").read_text().strip()
        optimizer_files = sorted(glob.glob(str(step / "*optim_states.pt")))
        size = sum(os.path.getsize(f) for f in glob.glob(str(step / "*.pt"))) / 1e9
        cases = [
            ("cp of the optimizer files", ["sh", "-c", 'mkdir -p "$0" && cp "$@" "$0"', str(out), *optimizer_files]),
            ("ptools convert-ckpt RUN out.safetensors",
             [*ptools, "convert-ckpt", str(run), str(out / "model.safetensors"), "--force"]),
            ("zero_to_fp32 API + torch.save", [py, "-c", API_SCRIPT, str(run), str(out / "model.pt")]),
            ("python -m deepspeed.utils.zero_to_fp32 RUN OUT", [py, "-m", "deepspeed.utils.zero_to_fp32", str(run),
                                                                str(out)]),
        ]  # fmt: skip
        print(f"\nZeRO-{stage}, 2 ranks: {size:.2f} GB in {step}")
        header = f"{'how':52} {'wall s':>8} {'peak RSS MB':>12} {'exit':>5}"
        print(header)
        print("-" * len(header))
        results = {}
        for label, argv in cases:
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            wall, peak, code = measure(argv, args.runs)
            results[label] = (wall, peak)
            print(f"{label:52} {wall:8.2f} {peak:12.0f} {code if code == 0 else f'FAILED ({code})':>5}", flush=True)
        ours_wall, ours_peak = results["ptools convert-ckpt RUN out.safetensors"]
        ds_wall, ds_peak = results["zero_to_fp32 API + torch.save"]
        script_wall, script_peak = results["python -m deepspeed.utils.zero_to_fp32 RUN OUT"]
        cp_wall = results["cp of the optimizer files"][0]
        checks = [
            (f"peak RSS <= 1/4 of zero_to_fp32's ({min(ds_peak, script_peak) / 4:.0f} MB)",
             ours_peak <= min(ds_peak, script_peak) / 4),
            (f"peak RSS <= largest parameter + 300 MB ({LARGEST_PARAMETER_MB + 300:.0f} MB)",
             ours_peak <= LARGEST_PARAMETER_MB + 300),
            (f"wall <= zero_to_fp32's ({min(ds_wall, script_wall):.2f} s)", ours_wall <= min(ds_wall, script_wall)),
            (f"wall <= 2 x cp ({2 * cp_wall:.2f} s)", ours_wall <= 2 * cp_wall),
        ]  # fmt: skip
        for text, ok in checks:
            print(f"target {text}: ptools {ours_wall:.2f} s / {ours_peak:.0f} MB {'ok' if ok else 'MISSED'}")
            verdicts.append(ok)
        # Correctness of what was timed: ptools' file against DeepSpeed's own consolidation.
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        subprocess.run([*ptools, "convert-ckpt", str(run), str(out / "model.safetensors")], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        subprocess.run([py, "-c", API_SCRIPT, str(run), str(out / "model.pt")], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        check = subprocess.run([py, "-c", CHECK_SCRIPT, str(out / "model.safetensors"), str(out / "model.pt")],
                               capture_output=True, text=True)  # fmt: skip
        print(f"ptools output vs zero_to_fp32: {check.stdout.strip() or 'DIFFERENT ' + check.stderr[-300:]}")
        shutil.rmtree(out, ignore_errors=True)
    print(f"\n{sum(verdicts)} of {len(verdicts)} targets met")


if __name__ == "__main__":
    main()
