"""`summary --train`: the meta-device estimate against a real training step, in one run.

    python benchmarks/bench_train.py [--runs 3] [--batches 8,16] [--models resnet50,...]
    python benchmarks/bench_train.py --device cuda [--batches 1,8,32]   # where a GPU exists

For each model and batch size (AdamW, float32; `--optimizers`, `--amp` for more):

1. ptools' estimate on the meta device (`estimate_training_step`, modelling the device the real
   step runs on): the peak, what the step adds to the memory live before it, and the seconds
   the estimate took (median of --runs, in this process).
2. A real step in a fresh process: model, inputs and optimizer built, one warm-up step,
   ``zero_grad(set_to_none=True)``, then the measured step.
   - CPU: the growth of the process's resident memory over the step, sampled every 0.5 ms by
     a thread reading /proc/self/statm. glibc is told to map every allocation of 64 KiB or
     more (MALLOC_MMAP_THRESHOLD_=65536) so that freed tensors leave the resident set at once;
     otherwise it keeps freed pages and the growth understates the step.
   - CUDA: ``torch.cuda.max_memory_allocated()`` over the step, after
     ``reset_peak_memory_stats()``, against the estimate's peak.
   Also the wall seconds of the real step.
3. torchinfo's "Estimated Total Size" for the same model and batch, for contrast (what users
   read today to answer "will it fit").

The small transformer language model is defined here: 6 layers, width 512, 8 heads, vocabulary
32,000, sequence 256, causal, head tied to the embedding.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

MODELS = ("resnet50", "vit_b_16", "efficientnet_b0", "convnext_tiny", "lm")
LM = {"vocab": 32000, "width": 512, "layers": 6, "heads": 8, "length": 256}

# The real step, in a fresh process. argv: model batch optimizer amp device
REAL_STEP = r'''
import gc, json, os, sys, threading, time
import torch
sys.path.insert(0, os.path.dirname(sys.argv[6]))
from bench_train import build, make_inputs
from ptools.core.training import default_loss, make_optimizer

name, batch, optimizer, amp, device = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
torch.manual_seed(0)
model = build(name).to(device)
args = make_inputs(name, batch, device)
opt = make_optimizer(optimizer, [p for p in model.parameters() if p.requires_grad], foreach=None)
autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=amp == "bf16")

def step():
    with autocast:
        loss = default_loss(model(*args))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)

model.train()
step()  # warm-up: optimizer state, kernels' caches and workspaces
gc.collect()

def rss():
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

result = {}
if device == "cuda":
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    step()
    torch.cuda.synchronize()
    result["seconds"] = time.perf_counter() - start
    result["max_memory_allocated"] = torch.cuda.max_memory_allocated()
else:
    before = rss()
    peak = [before]
    running = [True]

    def sample():
        while running[0]:
            peak[0] = max(peak[0], rss())
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    start = time.perf_counter()
    step()
    result["seconds"] = time.perf_counter() - start
    running[0] = False
    sampler.join()
    result["rss_growth"] = peak[0] - before
print(json.dumps(result))
'''


def build(name: str):
    import torch
    import torchvision
    from torch import nn

    if name != "lm":
        return torchvision.models.get_model(name)

    class LanguageModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(LM["vocab"], LM["width"])
            self.position = nn.Parameter(torch.zeros(1, LM["length"], LM["width"]))
            layer = nn.TransformerEncoderLayer(
                LM["width"], LM["heads"], 4 * LM["width"], dropout=0.0, batch_first=True, norm_first=True
            )
            self.blocks = nn.TransformerEncoder(layer, LM["layers"], enable_nested_tensor=False)
            self.norm = nn.LayerNorm(LM["width"])
            self.head = nn.Linear(LM["width"], LM["vocab"], bias=False)
            self.head.weight = self.embed.weight

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            length = ids.shape[1]
            mask = nn.Transformer.generate_square_subsequent_mask(length, device=ids.device)
            hidden = self.embed(ids) + self.position[:, :length]
            return self.head(self.norm(self.blocks(hidden, mask=mask, is_causal=True)))

    return LanguageModel()


def make_inputs(name: str, batch: int, device: str) -> list:
    import torch

    if name == "lm":
        return [torch.randint(0, LM["vocab"], (batch, LM["length"]), device=device)]
    return [torch.randn(batch, 3, 224, 224, device=device)]


def estimate(name: str, batch: int, optimizer: str, amp: str, target: str, runs: int) -> tuple[object, float]:
    import torch

    from ptools.core.training import estimate_training_step

    with torch.device("meta"):
        model = build(name)
    inputs = make_inputs(name, batch, "meta")
    seconds, report = [], None
    for _ in range(runs):
        start = time.perf_counter()
        report = estimate_training_step(
            model, inputs, optimizer=optimizer, amp=torch.bfloat16 if amp == "bf16" else None, target=target
        )
        seconds.append(time.perf_counter() - start)
    return report, statistics.median(seconds)


def real_step(name: str, batch: int, optimizer: str, amp: str, device: str) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run(
        [sys.executable, "-c", REAL_STEP, name, str(batch), optimizer, amp, device, os.path.abspath(__file__)],
        capture_output=True,
        text=True,
        env=env,
    )
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1][:120] if done.stderr.strip() else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def torchinfo_total(name: str, batch: int) -> float | None:
    """torchinfo's "Estimated Total Size (MB)" (MB = 10^6 bytes), or None."""
    try:
        import torch
        import torchinfo
    except ImportError:
        return None
    model = build(name)
    if name == "lm":
        stats = torchinfo.summary(model, input_data=make_inputs(name, batch, "cpu"), verbose=0, device="cpu")
    else:
        stats = torchinfo.summary(model, input_size=(batch, 3, 224, 224), verbose=0, device="cpu")
    del torch
    match = re.search(r"Estimated Total Size \(MB\): ([\d.,]+)", str(stats))
    return float(match.group(1).replace(",", "")) if match else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="estimates per point (median)")
    parser.add_argument("--batches", default="8,16")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--optimizers", default="adamw")
    parser.add_argument("--amp", default="none", help="none, bf16, or none,bf16")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--no-torchinfo", action="store_true", help="skip the torchinfo column (a CPU pass per point)")
    options = parser.parse_args()
    mib = 2**20
    measured = "RSS growth" if options.device == "cpu" else "max_allocated"
    estimated = "est. growth" if options.device == "cpu" else "est. peak"
    print(
        f"{'model':16} {'batch':>5} {'opt':>5} {'amp':>4} | {estimated:>11} {measured:>13} {'error':>7} | "
        f"{'est. s':>6} {'step s':>7} | {'est. peak':>9} {'torchinfo':>9}"
    )
    errors = []
    for name in options.models.split(","):
        for batch in map(int, options.batches.split(",")):
            for optimizer in options.optimizers.split(","):
                for amp in options.amp.split(","):
                    report, seconds = estimate(name, batch, optimizer, amp, options.device, options.runs)
                    real = real_step(name, batch, optimizer, amp, options.device)
                    first_point = amp == "none" and optimizer == options.optimizers.split(",")[0]
                    info = torchinfo_total(name, batch) if first_point and not options.no_torchinfo else None
                    if "error" in real:
                        print(f"{name:16} {batch:>5} {optimizer:>5} {amp:>4} | real step failed: {real['error']}")
                        continue
                    ours = report.step_growth_bytes if options.device == "cpu" else report.peak_bytes
                    theirs = real["rss_growth"] if options.device == "cpu" else real["max_memory_allocated"]
                    error = (ours - theirs) / theirs
                    errors.append(abs(error))
                    print(
                        f"{name:16} {batch:>5} {optimizer:>5} {amp:>4} | {ours / mib:9.0f}Mi {theirs / mib:11.0f}Mi "
                        f"{100 * error:+6.1f}% | {seconds:6.2f} {real['seconds']:7.2f} | "
                        f"{report.peak_bytes / mib:7.0f}Mi "
                        + (f"{info / 1.048576:7.0f}Mi" if info is not None else f"{'-':>9}"),
                        flush=True,
                    )
    if errors:
        print(f"\n{len(errors)} points; largest |error| {100 * max(errors):.1f}%, median {100 * statistics.median(errors):.1f}%")
    print("MiB = 2^20 bytes; torchinfo's MB (10^6 bytes) converted to MiB")


if __name__ == "__main__":
    main()
