"""Make real DeepSpeed ZeRO checkpoints on CPU for ptools' tests (and DeepSpeed's own
consolidation of each, the oracle the tests compare against).

    pip install deepspeed            # only for this script; the tests read its outputs
    python tests/data/zero/make_zero.py OUT_FOLDER [--configs 1-fp32,3-bf16 …] [--world 2]
    python tests/data/zero/make_zero.py OUT_FOLDER --model 250m --configs 2-fp32,3-fp32 --no-expected

For each config it runs two CPU ranks (torchrun, gloo) that train a tiny model for two
steps and save a checkpoint with ``engine.save_checkpoint(OUT/<config>)``, then writes
``OUT/<config>/expected.pt``: ``deepspeed.utils.zero_to_fp32.
get_fp32_state_dict_from_zero_checkpoint`` of that folder, and ``expected_module.pt``: the
16-bit module weights DeepSpeed holds (``safe_get_full_fp32_param`` is the truth the
master weights are checked against on every rank before saving).

The model has what makes consolidation go wrong: a tied embedding and head
(``shared_params``), a frozen layer, sizes that do not divide by the world size (padding),
two optimizer parameter groups, and float and integer buffers; configs are STAGE-DTYPE with DTYPE
fp32, bf16 or fp16. ``--model 250m`` trains one
step of a ~251M-parameter model of the same shape (benchmarks/bench_zero.py): a tied
32003 x 1024 embedding (the largest parameter, 131 MB in fp32) and 26 MLP blocks.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CONFIGS = ("1-fp32", "2-fp32", "3-fp32", "1-bf16", "2-bf16", "3-bf16", "2-fp16", "3-fp16")


def build_model(size: str = "tiny"):  # noqa: ANN201 - torch is imported lazily so --help stays light
    import torch
    from torch import nn

    vocab, width, hidden, blocks = (37, 12, 13, 0) if size == "tiny" else (32003, 1024, 4096, 26)

    class TinyLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(vocab, width)
            self.proj = nn.Linear(width, 13)  # 13 outputs: odd sizes, so partitions are padded
            self.norm = nn.LayerNorm(13)
            self.frozen = nn.Linear(13, width)
            self.frozen.requires_grad_(False)
            self.blocks = nn.Sequential(
                *(nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width)) for _ in range(blocks))
            )
            self.head = nn.Linear(width, vocab, bias=False)
            self.head.weight = self.embed.weight  # tied: saved once, named twice
            self.register_buffer("scale", torch.linspace(0.5, 1.5, 13))
            self.register_buffer("seen", torch.zeros((), dtype=torch.int64))
            self.register_buffer("scratch", torch.zeros(3), persistent=False)

        def forward(self, tokens):  # noqa: ANN001, ANN202
            hidden = self.embed(tokens)
            # bf16 on CPU keeps buffers in fp32 while parameters become bf16.
            hidden = self.proj(hidden) * self.scale.to(hidden.dtype)
            hidden = self.frozen(self.norm(hidden))
            if len(self.blocks):
                hidden = hidden + self.blocks(hidden)
            return self.head(hidden)

    torch.manual_seed(0)
    return TinyLM()


def train_rank(stage: int, dtype: str, out: str, size: str) -> None:
    """One rank of a DeepSpeed run: two steps, then save_checkpoint(out)."""
    import deepspeed
    import torch

    # The CPU backend JIT-compiles a shared-memory op with g++ (minutes); gloo needs none of it.
    comm_module = sys.modules["deepspeed.comm.torch"]
    comm_module.build_shm_op = lambda: None  # type: ignore[attr-defined]
    deepspeed.init_distributed(dist_backend="gloo")
    model = build_model(size)
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() > 1]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() <= 1]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=0.05
    )
    config = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": stage}}
    if dtype in ("bf16", "fp16"):
        config[dtype] = {"enabled": True}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    generator = torch.Generator().manual_seed(1 + torch.distributed.get_rank())
    vocab = model.embed.num_embeddings
    for _ in range(2 if size == "tiny" else 1):
        tokens = torch.randint(0, vocab, (4, 5), generator=generator)
        logits = engine(tokens)
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, vocab), tokens.reshape(-1))
        engine.backward(loss)
        engine.step()
    engine.module.seen += 2
    engine.save_checkpoint(out)


def consolidate(folder: str) -> None:
    """DeepSpeed's own consolidation of ``folder``, saved for tests that run without DeepSpeed."""
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state_dict = get_fp32_state_dict_from_zero_checkpoint(folder)
    torch.save(dict(state_dict), os.path.join(folder, "expected.pt"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--model", choices=("tiny", "250m"), default="tiny")
    parser.add_argument("--no-expected", action="store_true", help="skip DeepSpeed's consolidation")
    parser.add_argument("--rank-job", nargs=2, metavar=("STAGE", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_job:
        train_rank(int(args.rank_job[0]), args.rank_job[1], args.out, args.model)
        return
    import deepspeed

    for config in args.configs.split(","):
        stage, dtype = config.split("-")
        folder = os.path.join(args.out, config)
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryDirectory() as scratch:
            environment = {
                **os.environ,
                "OMP_NUM_THREADS": "1",
                "DS_ACCELERATOR": "cpu",
                "TORCH_EXTENSIONS_DIR": scratch,
                "TORCHELASTIC_ERROR_FILE": os.path.join(scratch, "error.json"),
                "TMPDIR": scratch,  # torchrun's /tmp/torchelastic_* folders go here, and go with it
            }
            command = [
                sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.world}",
                "--standalone", __file__, folder, "--rank-job", stage, dtype, "--model", args.model,
            ]  # fmt: skip
            subprocess.run(command, check=True, env=environment, stdout=subprocess.DEVNULL)
        if not args.no_expected:
            consolidate(folder)
        for script in ("zero_to_fp32.py", "zero_to_torch.py"):  # DeepSpeed's copies of its own tools
            if os.path.exists(os.path.join(folder, script)):
                os.remove(os.path.join(folder, script))
        with open(os.path.join(folder, "made_by.json"), "w") as handle:
            json.dump(
                {
                    "deepspeed": deepspeed.__version__,
                    "torch": __import__("torch").__version__,
                    "command": f"python tests/data/zero/make_zero.py OUT --configs {config} --world {args.world}"
                    + ("" if args.model == "tiny" else f" --model {args.model}"),
                },
                handle,
                indent=1,
            )
        print(f"made {folder}", file=sys.stderr)


if __name__ == "__main__":
    main()
