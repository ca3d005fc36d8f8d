"""`--ray`: what Ray adds, on one machine (a local multi-node cluster), in one run.

    python benchmarks/bench_ray.py [--runs 3] [--shards 10] [--records 1000000]

1. `gpu-info --ray` against a local two-node cluster (each node replaying a recorded server of
   4 GPUs through PTOOLS_NVML_RECORDING) vs `gpu-info --no-torch` on one machine replaying
   the same recording: wall time of the whole command (fresh processes), median of --runs.
2. `nms --ray` over --shards JSON Lines shards of --records records each (images spread over
   every shard, as inference workers write them) vs the single-process run of the same records
   concatenated (`ptools nms all.jsonl -o out.jsonl`, which streams a file this large): wall,
   peak RSS of the driver process, and Ray's stages (read + validate, group by image + NMS,
   write), from the manifest. The outputs are checked to be the same multiset of records.

Needs `pip install '.[ray]'`. Generated data goes under --keep (default: a temporary folder).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# Between the benchmark and the command: a child forked from a process that has imported
# Ray would count the parent's pages in its own peak RSS; wait4 gives that child's alone.
_LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
open(sys.argv[1], "w").write(str(usage.ru_maxrss * 1024))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, int, str]:
    """Wall seconds, the peak RSS (bytes) of that process alone, and its stdout."""
    with tempfile.NamedTemporaryFile(suffix=".rss") as report:
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", _LAUNCHER, report.name, *argv], env=env, capture_output=True,
                              text=True)
        seconds = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} failed:\n{done.stderr[-2000:]}")
        return seconds, int(Path(report.name).read_text()), done.stdout


def gpu_info(runs: int, folder: Path) -> None:
    from ray.cluster_utils import Cluster

    from tests.fake_nvml import make_gpu

    recording = folder / "server.json"
    recording.write_text(json.dumps({"gpus": [make_gpu(i, used_gib=i) for i in range(4)]}))
    node = {"num_cpus": 1, "env_vars": {"PTOOLS_NVML_RECORDING": str(recording)}}
    cluster = Cluster(initialize_head=True, head_node_args=node)
    cluster.add_node(**node)
    cluster.wait_for_nodes()
    env = {**os.environ, "RAY_ADDRESS": cluster.address, "PTOOLS_NVML_RECORDING": str(recording)}
    command = [sys.executable, "-m", "ptools", "gpu-info"]
    try:
        timed([*command, "--ray", "--json"], env)  # the cluster's first worker start is not the command's
        local = statistics.median(timed([*command, "--no-torch", "--json"], env)[0] for _ in range(runs))
        ray = statistics.median(timed([*command, "--ray", "--json"], env)[0] for _ in range(runs))
    finally:
        cluster.shutdown()
    print("gpu-info (2 nodes x 4 recorded GPUs)")
    print(f"  local gpu-info --no-torch   {local:6.2f} s")
    print(f"  gpu-info --ray              {ray:6.2f} s   (+{ray - local:.2f} s: importing Ray, connecting, one task per node)")


def make_shards(folder: Path, shards: int, per_shard: int, seed: int = 0) -> Path:
    """Shards of detections, each image's records spread over every shard; returns the
    concatenation (for the single-process run)."""
    rng = random.Random(seed)
    images = max(1, shards * per_shard // 100)  # 100 detections per image
    folder.mkdir(parents=True, exist_ok=True)
    concatenated = folder.parent / "all.jsonl"
    with concatenated.open("w") as everything:
        for number in range(shards):
            lines = []
            for _ in range(per_shard):
                x, y = rng.random() * 600, rng.random() * 400
                lines.append(json.dumps({"image_id": rng.randrange(images), "category_id": rng.randint(1, 5),
                                         "bbox": [round(x, 1), round(y, 1), round(10 + rng.random() * 90, 1),
                                                  round(10 + rng.random() * 90, 1)],
                                         "score": round(rng.random(), 4)}) + "\n")
            text = "".join(lines)
            (folder / f"preds-{number:03d}.jsonl").write_text(text)
            everything.write(text)
    return concatenated


def multiset(paths: list[Path]) -> list[str]:
    return sorted(line for path in paths for line in path.read_text().splitlines() if line.strip())


def nms(runs: int, shards: int, per_shard: int, folder: Path) -> None:
    from ray.cluster_utils import Cluster

    concatenated = make_shards(folder / "preds", shards, per_shard)
    env = {**os.environ}
    command = [sys.executable, "-m", "ptools", "nms"]
    singles, single_rss = [], 0
    for _ in range(runs):
        out = folder / "single.jsonl"
        out.unlink(missing_ok=True)
        seconds, rss, _ = timed([*command, str(concatenated), "-o", str(out)], env)
        singles.append(seconds)
        single_rss = max(single_rss, rss)
    # A cluster started like `ray start` (a separate process), as users run one.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": os.cpu_count()})
    cluster.wait_for_nodes()
    env["RAY_ADDRESS"] = cluster.address
    walls, stages, ray_rss = [], [], 0
    try:
        for _ in range(runs):
            out = folder / "ray_out"
            seconds, rss, _ = timed([*command, str(folder / "preds"), "--ray", "-o", str(out), "--force"], env)
            walls.append(seconds)
            ray_rss = max(ray_rss, rss)
            stages.append(json.loads((out / "manifest.json").read_text())["seconds"])
    finally:
        cluster.shutdown()
    manifest = json.loads((folder / "ray_out" / "manifest.json").read_text())
    same = multiset([folder / "ray_out" / s["file"] for s in manifest["shards"]]) == multiset([folder / "single.jsonl"])
    total = shards * per_shard
    print(f"\nnms, {shards} shards x {per_shard:,} records ({total:,}; {manifest['images']:,} images), hard NMS")
    print(f"  single process (streaming)  {statistics.median(singles):7.2f} s   driver peak RSS {single_rss / 2**20:6.0f} MiB")
    print(f"  nms --ray (local cluster)   {statistics.median(walls):7.2f} s   driver peak RSS {ray_rss / 2**20:6.0f} MiB"
          "   (the Ray workers' memory is not the driver's)")
    for stage in ("read", "group_and_nms", "write", "total"):
        print(f"    {stage:18} {statistics.median(s[stage] for s in stages):7.2f} s")
    print(f"  same records as the single-process run: {same}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--shards", type=int, default=10)
    parser.add_argument("--records", type=int, default=1_000_000, help="records per shard")
    parser.add_argument("--keep", type=Path, default=None, help="folder for the generated data")
    parser.add_argument("--skip-gpu-info", action="store_true")
    options = parser.parse_args()
    folder = options.keep or Path(tempfile.mkdtemp(prefix="bench_ray_"))
    folder.mkdir(parents=True, exist_ok=True)
    if not options.skip_gpu_info:
        gpu_info(options.runs, folder)
    nms(options.runs, options.shards, options.records, folder)


if __name__ == "__main__":
    main()
