"""Fusing several models' detections with WBF: ptools nms --method wbf vs ensemble-boxes, in one run.

    pip install ensemble-boxes          # the baseline
    python benchmarks/bench_fusion.py [--runs 3] [--sizes S,L] [--keep DIR] [--ensemble-at S]

Three models' outputs on the same scenes (examples/make_detections.py --seed 0 --model-seed
1/2/3: the same objects and ground truth, each model's own jitter, scores and background),
COCO results JSON. S = 3 x 100k records (200 images x 500 each), L = 3 x 1M (2,000 x 500).
Each way runs --runs times as a fresh process (files in, file out); median wall and peak RSS:

- ptools nms a.json b.json c.json --method wbf -o out.json
- ensemble-boxes: a script loading the files with orjson, calling weighted_boxes_fusion per
  image on coordinates normalised to [0, 1] (what it wants), writing the result (at S only
  by default: it takes minutes at L)
- the floor: orjson load of the three files and dump of all their records

Targets (issue 13): >= 10 x faster than ensemble-boxes at 3 x 100k; <= 2 x the floor at 3 x 1M.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_inspect import measure  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"S": (200, 500), "L": (2000, 500)}
FLOOR = """
import sys, orjson
records = []
for path in sys.argv[1:-1]:
    records += orjson.loads(open(path, 'rb').read())
open(sys.argv[-1], 'wb').write(orjson.dumps(records))
"""
ENSEMBLE = """
import sys, collections, orjson, numpy as np, warnings
from ensemble_boxes import weighted_boxes_fusion
warnings.simplefilter("ignore")  # it warns on every box it clips to [0, 1]
W, H = 640.0, 480.0
models = [orjson.loads(open(path, 'rb').read()) for path in sys.argv[1:-1]]
images = sorted({r["image_id"] for records in models for r in records})
per_model = [collections.defaultdict(list) for _ in models]
for by_image, records in zip(per_model, models):
    for record in records:
        by_image[record["image_id"]].append(record)
out = []
for image in images:
    boxes, scores, labels = [], [], []
    for by_image in per_model:
        items = by_image.get(image, [])
        b = np.array([r["bbox"] for r in items], dtype=np.float64).reshape(-1, 4)
        b[:, 2:] += b[:, :2]
        boxes.append(b / [W, H, W, H])
        scores.append([r["score"] for r in items])
        labels.append([r["category_id"] for r in items])
    fused, fused_scores, fused_labels = weighted_boxes_fusion(boxes, scores, labels, iou_thr=0.55)
    fused = fused * [W, H, W, H]
    fused[:, 2:] -= fused[:, :2]
    out += [{"image_id": image, "category_id": int(l), "bbox": b.tolist(), "score": float(s)}
            for b, s, l in zip(fused, fused_scores, fused_labels)]
open(sys.argv[-1], 'wb').write(orjson.dumps(out))
"""


def make(folder: Path, size: str) -> list[Path]:
    images, per_image = SIZES[size]
    paths = [folder / f"{size}_model{m}.json" for m in (1, 2, 3)]
    if all(p.exists() for p in paths):
        return paths
    sys.path.insert(0, str(ROOT / "examples"))
    from make_detections import generate

    for model, path in zip((1, 2, 3), paths):
        detections, _ = generate(images, per_image, seed=0, model_seed=model)
        path.write_text(json.dumps(detections))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--sizes", default="S,L")
    parser.add_argument("--keep", type=Path, default=None)
    parser.add_argument("--ensemble-at", default="S", help="sizes at which ensemble-boxes runs (it is slow)")
    args = parser.parse_args()
    folder = args.keep or Path(tempfile.mkdtemp(prefix="ptools-fusion-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    script = Path(sys.executable).with_name("ptools")
    ptools = [str(script)] if script.exists() else [sys.executable, "-m", "ptools"]
    print(f"{args.runs} runs each, median; files in {folder}")
    verdicts = []
    for size in args.sizes.split(","):
        inputs = [str(p) for p in make(folder, size)]
        out = str(folder / "out.json")
        records = sum(len(json.loads(Path(p).read_text())) for p in inputs) if size == "S" else 3 * 1_000_000
        cases = [
            ("orjson floor (load 3 + dump)", [sys.executable, "-c", FLOOR, *inputs, out]),
            ("ptools nms --method wbf", [*ptools, "nms", *inputs, "--method", "wbf", "-o", out, "--force"]),
        ]
        if size in args.ensemble_at.split(","):
            cases.append(("ensemble-boxes weighted_boxes_fusion per image", [sys.executable, "-c", ENSEMBLE, *inputs,
                                                                              out]))
        print(f"\n{size}: 3 x {records // 3:,} records")
        header = f"{'how':52} {'wall s':>8} {'peak RSS MB':>12} {'exit':>5}"
        print(header)
        print("-" * len(header))
        results = {}
        for label, argv in cases:
            runs = 1 if label.startswith("ensemble") else args.runs
            wall, peak, code = measure(argv, runs)
            results[label] = (wall, peak)
            shown = "" if runs == args.runs else f" (1 run)"
            print(f"{label + shown:52} {wall:8.2f} {peak:12.0f} {code if code == 0 else f'FAILED ({code})':>5}",
                  flush=True)
        ours = results["ptools nms --method wbf"][0]
        floor = results["orjson floor (load 3 + dump)"][0]
        if "ensemble-boxes weighted_boxes_fusion per image" in results and size == "S":
            theirs = results["ensemble-boxes weighted_boxes_fusion per image"][0]
            ok = ours * 10 <= theirs
            verdicts.append(ok)
            print(f"target >= 10 x faster than ensemble-boxes: {theirs / ours:.1f} x {'ok' if ok else 'MISSED'}")
        if size == "L":
            ok = ours <= 2 * floor
            verdicts.append(ok)
            print(f"target <= 2 x floor ({2 * floor:.2f} s): ptools {ours:.2f} s {'ok' if ok else 'MISSED'}")
    print(f"\n{sum(verdicts)} of {len(verdicts)} targets met")


if __name__ == "__main__":
    main()
