"""The hostile corpus as a measurement: how long it takes, the worst file per attack class
(wall time and peak RSS of one ptools run), and, for contrast, what torch's own loaders do
with the same payload files.

    python benchmarks/bench_hostile.py [--skip-contrast]

Prints two tables. Every ptools run must end in a clean refusal (the test suite asserts
that); here only the costs are measured. The contrast runs ``torch.load(weights_only=False)``
and ``torch.load(weights_only=True)`` (``torch.export.load`` for .pt2 archives) in a
subprocess per file and counts payloads that ran (their marker file appeared), files refused
(an exception) and files loaded without running anything.
"""

from __future__ import annotations

import argparse
import collections
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.hostile.corpus import CASES  # noqa: E402
from tests.hostile.harness import TORCH_COMMANDS, TORCH_FREE_LIMIT, TORCH_LIMIT, command_line, run_ptools  # noqa: E402

_LOADERS = {
    "torch.load(weights_only=False)": "import torch; torch.load({path!r}, map_location='cpu', weights_only=False)",
    "torch.load(weights_only=True)": "import torch; torch.load({path!r}, map_location='cpu', weights_only=True)",
}
_PT2 = "torch.export.load (.pt2)"
_PT2_LOADER = "import torch; torch.export.load({path!r})"


def measure_corpus(root: Path, repeats: int) -> tuple[float, float, int, dict[str, list[tuple[str, str, float, int]]]]:
    """Build and run everything ``repeats`` times; (build seconds, seconds of one pass over the
    corpus (median), runs per pass, per-class (file, command, median wall, median peak RSS))."""
    built = {}
    started = time.perf_counter()
    for case in CASES:
        folder = root / case.name
        folder.mkdir()
        built[case.name] = case.build(folder, folder / "PAYLOAD_RAN")
    build_seconds = time.perf_counter() - started
    samples: dict[tuple[str, str, str], list[tuple[float, int]]] = collections.defaultdict(list)
    passes = []
    for _ in range(repeats):
        started = time.perf_counter()
        for case in CASES:
            for command in case.commands:
                out = Path(tempfile.mkdtemp(dir=root))
                limit = TORCH_LIMIT if command in TORCH_COMMANDS or case.attack == "pt2" else TORCH_FREE_LIMIT
                run = run_ptools(command_line(command, built[case.name], out), limit)
                samples[(case.attack, case.name, command)].append((run.seconds, run.peak_rss_bytes))
                if run.returncode != 1 or run.timed_out:
                    print(f"unexpected: {case.name} {command} exit {run.returncode}: {run.stderr[-300:]}",
                          file=sys.stderr)
        passes.append(time.perf_counter() - started)
    per_class: dict[str, list[tuple[str, str, float, int]]] = collections.defaultdict(list)
    for (attack, name, command), values in samples.items():
        per_class[attack].append((name, command, statistics.median(v[0] for v in values),
                                  int(statistics.median(v[1] for v in values))))
    return build_seconds, statistics.median(passes), len(samples), per_class


def contrast(root: Path) -> dict[str, collections.Counter[str]]:
    """What torch's loaders do with every payload file (files whose payload creates a marker)."""
    tally: dict[str, collections.Counter[str]] = {name: collections.Counter() for name in [*_LOADERS, _PT2]}
    for case in CASES:
        if case.attack not in ("code", "pt2", "numpy"):
            continue
        folder = root / f"contrast-{case.name}"
        folder.mkdir()
        marker = folder / "PAYLOAD_RAN"
        path = case.build(folder, marker)
        if path.is_dir() or path.suffix == ".json":
            continue  # folders and indexes are not loaded by torch.load
        loaders = {_PT2: _PT2_LOADER} if path.suffix == ".pt2" else _LOADERS
        for name, template in loaders.items():
            marker.unlink(missing_ok=True)

            def limit() -> None:
                resource.setrlimit(resource.RLIMIT_AS, (TORCH_LIMIT, TORCH_LIMIT))

            result = subprocess.run([sys.executable, "-c", template.format(path=str(path))], capture_output=True,
                                    timeout=120, preexec_fn=limit)
            outcome = "ran the payload" if marker.exists() else "refused" if result.returncode else "loaded, nothing ran"
            tally[name][outcome] += 1
            tally[name]["files"] += 1
    return tally


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-contrast", action="store_true", help="only the ptools corpus")
    parser.add_argument("--runs", type=int, default=3, help="passes over the corpus; medians are shown")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        build, seconds, runs, per_class = measure_corpus(root, options.runs)
        print(f"corpus: {len(CASES)} hostile inputs, {runs} ptools runs per pass; built in {build:.1f} s, one pass "
              f"{seconds:.1f} s (median of {options.runs}); median run "
              f"{statistics.median(r[2] for v in per_class.values() for r in v):.2f} s; per class, the worst "
              "file's median:")
        print()
        print(f"{'class':<12} {'runs':>5} {'worst wall (file, command)':<58} {'worst peak RSS (file, command)':<58}")
        for attack, rows in per_class.items():
            slow = max(rows, key=lambda r: r[2])
            big = max(rows, key=lambda r: r[3])
            print(f"{attack:<12} {len(rows):>5} {f'{slow[2]:.2f} s  {slow[0]} {slow[1]}':<58} "
                  f"{f'{big[3] / 2**20:.0f} MiB  {big[0]} {big[1]}':<58}")
        if options.skip_contrast:
            return
        print()
        tally = contrast(root)
        print(f"{'payload files, loaded with':<32} {'files':>6} {'ran the payload':>16} {'refused':>8} "
              f"{'loaded, nothing ran':>20}")
        for name, counts in tally.items():
            print(f"{name:<32} {counts['files']:>6} {counts['ran the payload']:>16} "
                  f"{counts['refused']:>8} {counts['loaded, nothing ran']:>20}")
        files = tally[_PT2]["files"] + next(iter(tally.values()))["files"]
        print(f"{'ptools (every command above)':<32} {files:>6} {0:>16} {files:>8} {0:>20}")


if __name__ == "__main__":
    main()
