"""summary / count-params: ptools vs torchinfo and torchsummary, in one run.

    python benchmarks/bench_models.py [--runs 5] [--max-gmacs 20]

1. Wall time (median of --runs, fresh processes) of summarising resnet50 and vit_b_16 at
   224 px: `ptools summary`, torchinfo.summary, torchsummary.summary.
2. For every torchvision classification model up to --max-gmacs published GMACs: did each
   tool run, is its parameter count exactly torchvision's published num_params, are its MACs
   within 2 % of the published GMACs (torchsummary reports no MACs). All on the CPU, real
   forward passes, the weights' crop size.
3. `ptools count-params` on a checkpoint (bench_inspect's 1.07 GB file if --keep has it).
Needs torchinfo (pip install torchinfo) for its columns.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

# What a user runs: torchinfo prints its table by default (verbose=1); verbose=0 computes it
# without printing, shown too for contrast.
TORCHINFO = ("import sys, torchvision, torchinfo; m = torchvision.models.get_model(sys.argv[1]); "
             "torchinfo.summary(m, input_size=(1, 3, 224, 224))")
TORCHINFO_SILENT = ("import sys, torchvision, torchinfo; m = torchvision.models.get_model(sys.argv[1]); "
                    "torchinfo.summary(m, input_size=(1, 3, 224, 224), verbose=0)")
TORCHSUMMARY = ("import sys, torchvision, torchsummary; m = torchvision.models.get_model(sys.argv[1]); "
                "torchsummary.summary(m, (3, 224, 224), device='cpu')")


def wall(argv: list[str], runs: int) -> float:
    return walls([argv], runs)[0]


def walls(commands: list[list[str]], runs: int) -> list[float | None]:
    """Median wall seconds of each command (None if it fails); runs interleaved (a, b, c, a, b,
    c, ...) so that a noisy machine's drift hits every tool alike."""
    times: list[list[float]] = [[] for _ in commands]
    failed = [False] * len(commands)
    for _ in range(runs):
        for index, argv in enumerate(commands):
            start = time.perf_counter()
            done = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            times[index].append(time.perf_counter() - start)
            failed[index] |= done.returncode != 0
    return [None if bad else statistics.median(spent) for spent, bad in zip(times, failed)]


def _seconds(value: float | None, width: int) -> str:
    return f"{'fails':>{width}}" if value is None else f"{value:{width}.2f}"


def table(max_gmacs: float) -> None:
    import torch
    import torchvision

    from ptools.core import models
    from ptools.core.summary import summarize

    try:
        import torchinfo
    except ImportError:
        torchinfo = None
    import torchsummary

    kwargs_for = {"googlenet": {"aux_logits": False}, "vit_h_14": {"image_size": 518}}
    tally = {tool: {"ran": 0, "params": 0, "macs": 0} for tool in ("ptools", "torchinfo", "torchsummary")}
    names = []
    for name in torchvision.models.list_models(module=torchvision.models):
        weights = next(iter(torchvision.models.get_model_weights(name)))
        if weights.meta["_ops"] <= max_gmacs:
            names.append((name, weights))
    print(f"\n{len(names)} torchvision classification models up to {max_gmacs:g} GMACs (CPU, real forward):")
    misses: dict[str, list[str]] = {tool: [] for tool in tally}
    for name, weights in names:
        crop = weights.transforms().crop_size[0]
        gmacs, params = weights.meta["_ops"], weights.meta["num_params"]
        model = models.load_model(name, kwargs_for.get(name, {})).eval()
        x = torch.randn(1, 3, crop, crop)
        try:
            result = summarize(model, [x])
            tally["ptools"]["ran"] += 1
            tally["ptools"]["params"] += result.totals["parameters"] == params
            ok = abs(result.totals["macs"] / 1e9 - gmacs) <= 0.02 * gmacs
            tally["ptools"]["macs"] += ok
            if not ok:
                misses["ptools"].append(name)
        except Exception as failure:  # a benchmark records failures, it does not stop
            misses["ptools"].append(f"{name} ({type(failure).__name__})")
        if torchinfo is not None:
            try:
                stats = torchinfo.summary(model, input_data=x, verbose=0)
                tally["torchinfo"]["ran"] += 1
                tally["torchinfo"]["params"] += stats.total_params == params
                ok = abs(stats.total_mult_adds / 1e9 - gmacs) <= 0.02 * gmacs
                tally["torchinfo"]["macs"] += ok
                if not ok:
                    misses["torchinfo"].append(name)
            except Exception as failure:
                misses["torchinfo"].append(f"{name} ({type(failure).__name__})")
        try:
            text = io.StringIO()
            with contextlib.redirect_stdout(text), torch.no_grad():
                torchsummary.summary(model, (3, crop, crop), device="cpu")
            total = int(re.search(r"Total params: ([\d,]+)", text.getvalue()).group(1).replace(",", ""))
            tally["torchsummary"]["ran"] += 1
            tally["torchsummary"]["params"] += total == params
        except Exception as failure:
            misses["torchsummary"].append(f"{name} ({type(failure).__name__})")
        del model
    print(f"{'tool':14} {'ran':>5} {'params exact':>13} {'MACs within 2%':>15}")
    for tool, counts in tally.items():
        macs = "no MACs" if tool == "torchsummary" else str(counts["macs"])
        if tool == "torchinfo" and torchinfo is None:
            print(f"{tool:14} not installed")
            continue
        print(f"{tool:14} {counts['ran']:>5} {counts['params']:>13} {macs:>15}")
    for tool, names_missed in misses.items():
        if names_missed:
            print(f"  {tool} misses or failures: {', '.join(names_missed)}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--max-gmacs", type=float, default=20.0)
    parser.add_argument("--keep", type=Path, default=Path("/tmp/bench"))
    parser.add_argument("--wall-only", action="store_true", help="only the wall-time table")
    args = parser.parse_args()
    script = Path(sys.executable).with_name("ptools")
    ptools = [str(script)] if script.exists() else [sys.executable, "-m", "ptools"]
    print(f"{args.runs} runs each, median wall seconds (fresh processes, CPU)")
    print(f"{'model':10} {'ptools summary':>15} {'torchinfo':>10} {'torchinfo verbose=0':>20} "
          f"{'torchsummary':>13}")
    for name in ("resnet50", "vit_b_16"):
        ours, info, silent, classic = walls([
            [*ptools, "summary", name, "--input-size", "3,224,224"], [sys.executable, "-c", TORCHINFO, name],
            [sys.executable, "-c", TORCHINFO_SILENT, name], [sys.executable, "-c", TORCHSUMMARY, name]], args.runs)
        print(f"{name:10} {_seconds(ours, 15)} {_seconds(info, 10)} {_seconds(silent, 20)} {_seconds(classic, 13)}")
    if args.wall_only:
        return
    checkpoint = args.keep / "ckpt_1gb.pt"
    if checkpoint.exists():
        seconds = wall([*ptools, "count-params", str(checkpoint)], args.runs)
        print(f"\nptools count-params on {checkpoint} ({checkpoint.stat().st_size / 1e9:.2f} GB): "
              f"{seconds:.3f} s (target <= 0.3 s)")
    table(args.max_gmacs)


if __name__ == "__main__":
    main()
