"""Merging sliced-inference predictions: ptools nms --method greedy-nmm vs SAHI's postprocess.

    pip install sahi                    # the baseline
    python benchmarks/bench_merge.py [--runs 3] [--sizes S,L] [--keep DIR] [--sahi-runs 1]

Synthetic detector output (examples/make_detections.py: 80 classes, duplicates around each
object as a detector and overlapping slices give them), COCO results JSON. S = 100k records
(200 images x 500), L = 1M (2,000 x 500). Per image and class, greedy NMM with the IOS metric
at 0.5 (SAHI's defaults for sliced prediction). Each way runs as a fresh process (file in,
file out); median wall and peak RSS:

- ptools nms in.json --method greedy-nmm --match-metric ios -o out.json
- SAHI: a script loading the file with orjson, building SAHI's ObjectPrediction objects per
  image and calling GreedyNMMPostprocess(match_metric="IOS", class_agnostic=False) on them
  (what sahi's get_sliced_prediction does after its slices), writing the merged records
- the floor: orjson load and dump of the same file

Both outputs are compared at the end (boxes to 1e-4): they differ only where a pair's IoS
is the threshold exactly (the generator rounds coordinates to 0.01, so that happens), which
SAHI, comparing in float32, rounds below it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_inspect import measure  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"S": (200, 500), "L": (2000, 500)}
FLOOR = """
import sys, orjson
open(sys.argv[2], 'wb').write(orjson.dumps(orjson.loads(open(sys.argv[1], 'rb').read())))
"""
SAHI = """
import sys, collections, orjson
from sahi.prediction import ObjectPrediction
from sahi.postprocess.combine import GreedyNMMPostprocess
records = orjson.loads(open(sys.argv[1], 'rb').read())
by_image = collections.defaultdict(list)
for record in records:
    by_image[record["image_id"]].append(record)
merge = GreedyNMMPostprocess(match_threshold=0.5, match_metric="IOS", class_agnostic=False)
out = []
for image in sorted(by_image):
    predictions = []
    for r in by_image[image]:
        x, y, w, h = r["bbox"]
        predictions.append(ObjectPrediction(bbox=[x, y, x + w, y + h], score=r["score"], category_id=r["category_id"]))
    for p in merge(predictions):
        x1, y1, x2, y2 = map(float, p.bbox.to_xyxy())
        out.append({"image_id": image, "category_id": p.category.id, "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "score": float(p.score.value)})
open(sys.argv[2], 'wb').write(orjson.dumps(out))
"""


def make(folder: Path, size: str) -> Path:
    images, per_image = SIZES[size]
    path = folder / f"{size}_sliced.json"
    if path.exists():
        return path
    sys.path.insert(0, str(ROOT / "examples"))
    from make_detections import generate

    detections, _ = generate(images, per_image, seed=0)
    for record in detections:  # SAHI refuses boxes left of or above the image
        x, y, w, h = record["bbox"]
        record["bbox"] = [max(x, 0.0), max(y, 0.0), w, h]
    path.write_text(json.dumps(detections))
    return path


def _rows(path: Path) -> list[tuple]:
    return list((r["image_id"], r["category_id"], round(r["score"], 6), *(round(v, 4) for v in r["bbox"]))
                  for r in json.loads(path.read_text()))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--sahi-runs", type=int, default=1, help="SAHI is slow: runs of it at each size")
    parser.add_argument("--sizes", default="S,L")
    parser.add_argument("--keep", type=Path, default=None)
    args = parser.parse_args()
    folder = args.keep or Path(tempfile.mkdtemp(prefix="ptools-merge-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    script = Path(sys.executable).with_name("ptools")
    ptools = [str(script)] if script.exists() else [sys.executable, "-m", "ptools"]
    print(f"{args.runs} runs each (SAHI {args.sahi_runs}), median; files in {folder}")
    for size in args.sizes.split(","):
        source = make(folder, size)
        images, per_image = SIZES[size]
        ours_out, sahi_out = folder / f"{size}_ptools.json", folder / f"{size}_sahi.json"
        cases = [
            ("orjson floor (load + dump)", [sys.executable, "-c", FLOOR, str(source), str(folder / "floor.json")],
             args.runs),
            ("ptools nms --method greedy-nmm --match-metric ios",
             [*ptools, "nms", str(source), "--method", "greedy-nmm", "--match-metric", "ios", "-o", str(ours_out),
              "--force"], args.runs),
            ("SAHI GreedyNMMPostprocess (IOS) per image", [sys.executable, "-c", SAHI, str(source), str(sahi_out)],
             args.sahi_runs),
        ]
        print(f"\n{size}: {images * per_image:,} records, {images:,} images")
        header = f"{'how':52} {'wall s':>8} {'peak RSS MB':>12} {'exit':>5}"
        print(header)
        print("-" * len(header))
        results = {}
        for label, argv, runs in cases:
            wall, peak, code = measure(argv, runs)
            results[label] = wall
            print(f"{label:52} {wall:8.2f} {peak:12.0f} {code if code == 0 else f'FAILED ({code})':>5}", flush=True)
        ours, theirs = Counter(_rows(ours_out)), Counter(_rows(sahi_out))
        differ = sum((ours - theirs).values()) + sum((theirs - ours).values())
        print(f"outputs: ptools {sum(ours.values()):,} records, SAHI {sum(theirs.values()):,}; {differ} records differ "
              "(pairs whose IoS is the threshold exactly, which SAHI's float32 rounds below it)"
              f"; ptools {results[cases[2][0]] / results[cases[1][0]]:.1f} x faster")


if __name__ == "__main__":
    main()
