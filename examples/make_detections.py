"""Synthetic pre-NMS detections like a detector's raw output, with their COCO ground truth.

    python examples/make_detections.py OUT_PREFIX --images 20 --per-image 100 [--seed 0] [--crowd]

Per image: 2-6 objects (80 classes); each object yields a cluster of jittered boxes around
it with decaying scores (a few with a wrong class), and the rest of the image's budget is
low-score background boxes. Writes OUT_PREFIX.json (COCO results: image_id, category_id,
bbox xywh, score) and OUT_PREFIX_gt.json (COCO ground truth).

--crowd makes the scenes Soft-NMS was designed for (Bodla et al., 2017: people in a queue,
cars in a row): each image holds 1-3 crowds of 2-4 objects of one class and similar size,
each object shifted sideways from the previous one by 15-35 % of its width, so neighbours
overlap with an IoU of about 0.48-0.74 - above the usual 0.5 NMS threshold for most pairs.
Every object still yields its own cluster of boxes, as a detector does; nothing else changes.

The shipped examples are
`python examples/make_detections.py examples/detections --images 20 --per-image 100` and
`python examples/make_detections.py examples/crowd --images 20 --per-image 100 --crowd`.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

WIDTH, HEIGHT, CLASSES = 640, 480, 80


def _records(image_id: int, labels: np.ndarray, boxes: np.ndarray, scores: np.ndarray) -> list[dict]:
    return [{"image_id": image_id, "category_id": int(label), "bbox": [round(v, 2) for v in box],
             "score": round(score, 5)} for label, box, score in zip(labels.tolist(), boxes.tolist(), scores.tolist())]


def _crowds(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Corners, sizes and classes of 1-3 crowds of 2-4 overlapping objects each."""
    corners, sizes, classes = [], [], []
    for _ in range(int(rng.integers(1, 4))):
        members = int(rng.integers(2, 5))
        width, height = rng.uniform(40, 160), rng.uniform(60, 220)
        shifts = rng.uniform(0.15, 0.35, members - 1) * width
        span = width + shifts.sum()
        x = rng.uniform(0, max(WIDTH - span, 1))
        y = rng.uniform(0, HEIGHT - height)
        category = int(rng.integers(1, CLASSES + 1))
        for offset in np.concatenate([[0.0], np.cumsum(shifts)]):
            scale = rng.uniform(0.9, 1.1)  # similar, not identical, sizes
            w, h = min(width * scale, WIDTH - x - offset), min(height * scale, HEIGHT - y)
            corners.append((x + offset, y))
            sizes.append((w, h))
            classes.append(category)
    return np.array(corners), np.array(sizes), np.array(classes)


def generate(images: int, per_image: int, seed: int = 0, cluster: int = 20,
             crowd: bool = False, model_seed: int | None = None) -> tuple[list, dict]:
    """``model_seed``: the scenes (objects, ground truth) come from ``seed`` alone and the
    detections' noise from ``model_seed``: several models' outputs on the same images."""
    rng = np.random.default_rng(seed)
    noise = rng if model_seed is None else np.random.default_rng([seed, model_seed])
    detections, annotations = [], []
    for image_id in range(1, images + 1):
        if crowd:
            corners, sizes, classes = _crowds(rng)
        else:
            objects = int(rng.integers(2, 7))
            sizes = rng.uniform(24, 260, (objects, 2))
            corners = rng.uniform(0, 1, (objects, 2)) * (np.array([WIDTH, HEIGHT]) - sizes)
            classes = rng.integers(1, CLASSES + 1, objects)
        budget = per_image
        for (x, y), (w, h), category in zip(corners, sizes, classes):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": int(category),
                                "bbox": [round(float(x), 2), round(float(y), 2), round(float(w), 2), round(float(h), 2)],
                                "area": float(w * h), "iscrowd": 0})
            count = min(budget, cluster + int(noise.integers(-5, 6)))
            budget -= count
            top = noise.uniform(0.6, 0.98)
            boxes = np.array([x, y, w, h]) + noise.normal(0, 0.08, (count, 4)) * np.array([w, h, w, h])
            boxes[:, 2:] = np.maximum(boxes[:, 2:], 2)
            wrong = noise.uniform(size=count) < 0.05
            labels = np.where(wrong, noise.integers(1, CLASSES + 1, count), category)
            scores = top * 0.9 ** np.arange(count) * noise.uniform(0.9, 1.0, count)
            detections.extend(_records(image_id, labels, boxes, scores))
        background = max(budget, 0)
        sizes = noise.uniform(8, 200, (background, 2))
        corners = noise.uniform(0, 1, (background, 2)) * (np.array([WIDTH, HEIGHT]) - sizes)
        detections.extend(_records(image_id, noise.integers(1, CLASSES + 1, background),
                                   np.concatenate([corners, sizes], axis=1), noise.uniform(0.001, 0.2, background)))
    ground_truth = {
        "images": [{"id": i, "width": WIDTH, "height": HEIGHT, "file_name": f"{i:06d}.jpg"}
                   for i in range(1, images + 1)],
        "annotations": annotations,
        "categories": [{"id": c, "name": f"class_{c}"} for c in range(1, CLASSES + 1)],
    }
    return detections, ground_truth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prefix")
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--per-image", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--crowd", action="store_true", help="crowds of overlapping objects (see above)")
    parser.add_argument("--model-seed", type=int, default=None,
                        help="one model's detections of the scenes of --seed (several models: several model seeds)")
    args = parser.parse_args()
    detections, ground_truth = generate(args.images, args.per_image, args.seed, crowd=args.crowd,
                                        model_seed=args.model_seed)
    with open(f"{args.prefix}.json", "w") as handle:
        json.dump(detections, handle)
    with open(f"{args.prefix}_gt.json", "w") as handle:
        json.dump(ground_truth, handle)


if __name__ == "__main__":
    main()
