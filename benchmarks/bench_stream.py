"""Detection dumps larger than memory: ptools nms on a 10M-record JSON Lines file, grouped
and shuffled, against the floor of parsing and writing the same file in chunks.

    python benchmarks/bench_stream.py [--runs 3] [--records 10] [--keep DIR]

The file: examples/make_detections.py's synthetic detector output (80 classes), 1M records
per block of 2,000 images, --records blocks (10: 10M records, 20,000 images, about 850 MB);
"grouped" as a detector writes it (image after image), "shuffled" in random line order.
Each way runs --runs times as a fresh process (file in, file out); median wall and peak RSS:

- ptools nms dump.jsonl -o out.jsonl (hard NMS; streamed in batches of --batch, default 16MB)
- the floor: a script reading the file in 16 MB chunks, parsing every line with orjson and
  writing every record back (what any tool must at least do with the file)

Targets (issue 13): peak RSS <= 500 MB in both; wall <= 1.5 x the floor. (That the streamed
output is byte for byte the in-memory one is the tests' job: tests/core/test_streaming.py.)
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_inspect import measure  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FLOOR = """
import sys, orjson
with open(sys.argv[1], 'rb') as src, open(sys.argv[2], 'wb') as out:
    carry = b""
    while True:
        block = src.read(16 << 20)
        data = carry + block
        cut = data.rfind(b"\\n") + 1 if block else len(data)
        carry = data[cut:]
        records = [orjson.loads(line) for line in data[:cut].splitlines() if line.strip()]
        out.write(b"".join(orjson.dumps(r) + b"\\n" for r in records))
        if not block:
            break
"""


def make(folder: Path, blocks: int) -> tuple[Path, Path]:
    grouped, shuffled = folder / f"grouped_{blocks}M.jsonl", folder / f"shuffled_{blocks}M.jsonl"
    if grouped.exists() and shuffled.exists():
        return grouped, shuffled
    import orjson

    sys.path.insert(0, str(ROOT / "examples"))
    from make_detections import generate

    lines = []
    for block in range(blocks):
        detections, _ = generate(2000, 500, seed=block)
        for record in detections:
            record["image_id"] += block * 2000
            lines.append(orjson.dumps(record) + b"\n")
    grouped.write_bytes(b"".join(lines))
    random.Random(0).shuffle(lines)
    shuffled.write_bytes(b"".join(lines))
    return grouped, shuffled


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--records", type=int, default=10, help="millions of records")
    parser.add_argument("--keep", type=Path, default=None)
    parser.add_argument("--make-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    folder = args.keep or Path(tempfile.mkdtemp(prefix="ptools-stream-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    if args.make_only:
        make(folder, args.records)
        return
    # Made in a process of its own: a child started from this one would otherwise count the
    # generator's gigabytes in its own peak RSS.
    subprocess.run([sys.executable, __file__, "--make-only", "--records", str(args.records), "--keep", str(folder)],
                   check=True)
    script = Path(sys.executable).with_name("ptools")
    ptools = [str(script)] if script.exists() else [sys.executable, "-m", "ptools"]
    inputs = make(folder, args.records)
    print(f"{args.runs} runs each, median; {inputs[0].stat().st_size / 1e6:,.0f} MB, {args.records}M records; "
          f"files in {folder}")
    verdicts = []
    outputs = []
    for path in inputs:
        out = folder / f"out_{path.stem}.jsonl"
        outputs.append(out)
        print(f"\n{path.stem}")
        header = f"{'how':44} {'wall s':>8} {'peak RSS MB':>12} {'exit':>5}"
        print(header)
        print("-" * len(header))
        results = {}
        for label, argv in (
            ("floor: orjson line parse + dump, in chunks", [sys.executable, "-c", FLOOR, str(path),
                                                            str(folder / "floor.jsonl")]),
            ("ptools nms (hard)", [*ptools, "nms", str(path), "-o", str(out), "--force"]),
        ):
            wall, peak, code = measure(argv, args.runs)
            results[label] = (wall, peak)
            print(f"{label:44} {wall:8.2f} {peak:12.0f} {code if code == 0 else f'FAILED ({code})':>5}", flush=True)
        (ours, peak), (floor, _) = results["ptools nms (hard)"], results["floor: orjson line parse + dump, in chunks"]
        verdicts += [peak <= 500, ours <= 1.5 * floor]
        fast = ours <= 1.5 * floor
        print(f"target peak RSS <= 500 MB: {peak:.0f} MB {'ok' if peak <= 500 else 'MISSED'}; "
              f"target <= 1.5 x floor ({1.5 * floor:.2f} s): {ours / floor:.2f} x {'ok' if fast else 'MISSED'}")
    kept = [sum(1 for _ in open(out, "rb")) for out in outputs]
    print(f"\nrecords kept: grouped {kept[0]:,}, shuffled {kept[1]:,} (score ties go by input order, which differs)")
    print(f"{sum(verdicts)} of {len(verdicts)} targets met")


if __name__ == "__main__":
    main()
