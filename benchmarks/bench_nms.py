"""Offline NMS over a detection file: ptools nms vs the scripts people use, in one run.

    python benchmarks/bench_nms.py [--runs 3] [--sizes S,L] [--keep DIR]

Synthetic pre-NMS detections (examples/make_detections.py: per image 2-6 objects, each a
cluster of ~20 jittered boxes with decaying scores, plus low-score background boxes; 80
classes), COCO results JSON. S = 200 images x 500 (100k records), L = 2,000 x 500 (1M).
Each way runs --runs times as a fresh process (file in, file out); median wall and peak RSS.
Floor: orjson load + dump of the same file. Targets (issue 5): S hard <= 0.6 s, soft <= 0.8 s;
L hard <= 1.3 x floor, soft <= 1.6 x floor; peak RSS <= 1.3 x the floor's.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_inspect import measure  # noqa: E402

SIZES = {"S": (200, 500), "L": (2000, 500)}

FLOOR = """
import sys, orjson
data = orjson.loads(open(sys.argv[1], 'rb').read())
open(sys.argv[2], 'wb').write(orjson.dumps(data))
"""
# The same with Python's cyclic GC off, as ptools parses: shows what the GC costs on its own.
FLOOR_NO_GC = "import gc; gc.disable()\n" + FLOOR
TORCHVISION = """
import sys, json, collections, torch, torchvision
records = json.load(open(sys.argv[1]))
by_image = collections.defaultdict(list)
for index, record in enumerate(records):
    by_image[record["image_id"]].append(index)
kept = []
for image, indices in by_image.items():
    boxes = torch.tensor([records[i]["bbox"] for i in indices], dtype=torch.float64)
    boxes[:, 2:] += boxes[:, :2]
    scores = torch.tensor([records[i]["score"] for i in indices], dtype=torch.float64)
    labels = torch.tensor([records[i]["category_id"] for i in indices])
    keep = torchvision.ops.batched_nms(boxes, scores, labels, 0.5)
    kept.extend(records[indices[k]] for k in keep.tolist())
json.dump(kept, open(sys.argv[2], "w"))
"""
ENSEMBLE = """
import sys, json, collections, numpy as np
from ensemble_boxes import nms, soft_nms
W, H = 640.0, 480.0  # ensemble-boxes wants coordinates normalised to [0, 1]
records = json.load(open(sys.argv[1]))
by_image = collections.defaultdict(list)
for record in records:
    by_image[record["image_id"]].append(record)
out = []
for image, items in by_image.items():
    boxes = np.array([r["bbox"] for r in items], dtype=np.float64)
    boxes[:, 2:] += boxes[:, :2]
    boxes = np.clip(boxes / [W, H, W, H], 0, 1)
    scores = np.array([r["score"] for r in items])
    labels = np.array([r["category_id"] for r in items])
    if sys.argv[3] == "soft":
        b, s, l = soft_nms([boxes], [scores], [labels], iou_thr=0.5, sigma=0.5, thresh=0.001)
    else:
        b, s, l = nms([boxes], [scores], [labels], iou_thr=0.5)
    b = b * [W, H, W, H]
    out.extend({"image_id": image, "category_id": int(c), "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(v)}
               for (x1, y1, x2, y2), v, c in zip(b.tolist(), s.tolist(), l.tolist()))
json.dump(out, open(sys.argv[2], "w"))
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--sizes", default="S,L")
    parser.add_argument("--keep", type=Path, default=None)
    args = parser.parse_args()
    folder = args.keep or Path(tempfile.mkdtemp(prefix="ptools-nms-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    script = Path(sys.executable).with_name("ptools")
    ptools = [str(script)] if script.exists() else [sys.executable, "-m", "ptools"]
    py = sys.executable
    try:
        import ensemble_boxes  # noqa: F401
        have_ensemble = True
    except ImportError:
        have_ensemble = False
    print(f"{args.runs} runs each, median; python {sys.version.split()[0]}"
          + ("" if have_ensemble else "; ensemble-boxes not installed (pip install ensemble-boxes) - skipped"))
    header = f"{'size':5} {'how':46} {'wall s':>8} {'peak RSS MB':>12} {'exit':>5}  target"
    print(header)
    print("-" * len(header))
    for size in args.sizes.split(","):
        images, per_image = SIZES[size]
        source = folder / f"detections_{size}.json"
        if not source.exists():  # in a child: a big parent would inflate every child's peak RSS
            subprocess.run([py, "-c", "import sys, json; sys.path.insert(0, sys.argv[1]); "
                            "from make_detections import generate; "
                            "json.dump(generate(int(sys.argv[2]), int(sys.argv[3]), seed=1)[0], open(sys.argv[4], 'w'))",
                            str(Path(__file__).parents[1] / "examples"), str(images), str(per_image), str(source)],
                           check=True)
        out = str(folder / f"out_{size}.json")
        cases = [("floor: orjson load + dump", [py, "-c", FLOOR, str(source), out]),
                 ("orjson load + dump, gc disabled", [py, "-c", FLOOR_NO_GC, str(source), out]),
                 # --force: each run replaces the previous run's output (ptools never does so unasked).
                 ("ptools nms --method hard", [*ptools, "nms", str(source), "-o", out, "--force"]),
                 ("ptools nms --method soft", [*ptools, "nms", str(source), "-o", out, "--method", "soft", "--force"]),
                 ("json + torchvision batched_nms per image", [py, "-c", TORCHVISION, str(source), out])]
        if have_ensemble:
            cases += [("ensemble-boxes nms", [py, "-c", ENSEMBLE, str(source), out, "hard"]),
                      ("ensemble-boxes soft_nms", [py, "-c", ENSEMBLE, str(source), out, "soft"])]
        results = {}
        for label, argv in cases:
            wall, peak, code = measure(argv, args.runs)
            results[label] = (wall, peak)
            target = ""
            if label.startswith("ptools"):
                floor_wall, floor_peak = results["floor: orjson load + dump"]
                soft = "soft" in label
                limit = (0.8 if soft else 0.6) if size == "S" else (1.6 if soft else 1.3) * floor_wall
                ok = code == 0 and wall <= limit and (size == "S" or peak <= 1.3 * floor_peak)
                target = f"<= {limit:.2f} s" + ("" if size == "S" else f", <= {1.3 * floor_peak:.0f} MB") + \
                    (" ok" if ok else f" FAILED (exit {code})" if code else " MISSED")
            print(f"{size:5} {label:46} {wall:8.3f} {peak:12.0f} {code:>5}  {target}")
    subprocess.run(["rm", "-f", *[str(p) for p in folder.glob("out_*.json")]])


if __name__ == "__main__":
    main()
