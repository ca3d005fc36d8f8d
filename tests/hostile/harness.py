"""Running ptools on a hostile file as an attacker's victim would: a real subprocess, with a
memory limit and a timeout, and everything around it watched."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# Address space for a command: torch's CUDA build maps ~4 GB of libraries before doing anything.
TORCH_FREE_LIMIT = 3 << 30
TORCH_LIMIT = 10 << 30
TIMEOUT_S = 60
TORCH_COMMANDS = {"summary", "summary-train", "freeze-pt2"}


def command_line(command: str, target: Path, out: Path) -> list[str]:
    """The ptools arguments for one kind of invocation of ``target``."""
    path = str(target)
    return {
        "inspect": ["inspect-state-dict", path],
        "inspect-stats": ["inspect-state-dict", path, "--stats"],
        "inspect-json": ["inspect-state-dict", path, "--json"],
        "diff": ["inspect-state-dict", path, "--diff", path],  # reads every tensor's bytes on both sides
        "count": ["count-params", path],
        "convert-pt": ["convert-ckpt", path, str(out / "out.pt")],
        "convert-st": ["convert-ckpt", path, str(out / "out.safetensors"), "--extract", "auto"],
        "convert-shards": ["convert-ckpt", path, str(out / "shards"), "--shard-size", "1MB", "--extract", "auto"],
        "convert-dcp": ["convert-ckpt", path, str(out / "dcp"), "--format", "dcp"],
        "average": ["convert-ckpt", path, path, "--average", "-o", str(out / "average.safetensors")],
        "summary": ["summary", path, "--input-size", "3"],
        "summary-train": ["summary", path, "--train", "--input-size", "3"],
        "freeze-pt2": ["freeze", path, "--layers", "*", "--dry-run"],
        "nms": ["nms", path, "-o", str(out / "out.json")],
        "nms-wbf": ["nms", path, path, "--method", "wbf", "-o", str(out / "out.json")],
        "nms-nmm": ["nms", path, "--method", "nmm", "--match-metric", "ios", "-o", str(out / "out.json")],
        "nms-stream": ["nms", path, "--batch", "1KB", "-o", str(out / "out.json")],
        "nms-class-iou": ["nms", str(target.parent / "dets.json"), "--class-iou", path, "-o", str(out / "out.json")],
    }[command]


@dataclass
class Run:
    """What one invocation did."""

    returncode: int
    stdout: str
    stderr: str
    seconds: float
    peak_rss_bytes: int
    timed_out: bool


# A small launcher between the test process and ptools: a child forked from a process that
# has imported torch would count the parent's pages in its own peak RSS.
_LAUNCHER = """
import os, resource, sys
limit, report = int(sys.argv[1]), sys.argv[2]
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
pid = os.fork()
if pid == 0:
    os.execv(sys.executable, [sys.executable, "-m", "ptools", *sys.argv[3:]])
_, status, usage = os.wait4(pid, 0)
with open(report, "w") as handle:
    handle.write(str(usage.ru_maxrss))
code = os.waitstatus_to_exitcode(status)
sys.exit(code if code >= 0 else 128 - code)
"""


def run_ptools(arguments: list[str], memory_limit: int, timeout: float = TIMEOUT_S, cwd: Path | None = None) -> Run:
    """``python -m ptools ARGUMENTS`` under RLIMIT_AS, killed after ``timeout``, with the peak
    RSS the kernel recorded for that process alone."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("PTOOLS_DEBUG", None)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            tempfile.NamedTemporaryFile("r") as report:
        started = time.perf_counter()
        process = subprocess.Popen([sys.executable, "-c", _LAUNCHER, str(memory_limit), report.name, *arguments],
                                   stdout=out, stderr=err, stdin=subprocess.DEVNULL, cwd=cwd, env=env,
                                   start_new_session=True)
        timed_out = False
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        seconds = time.perf_counter() - started
        peak = int(report.read() or 0) * 1024
        out.seek(0)
        err.seek(0)
        return Run(process.returncode, out.read().decode(errors="replace"), err.read().decode(errors="replace"),
                   seconds, peak, timed_out)


def snapshot(folder: Path, skip: Path) -> dict[str, tuple[int, int, str]]:
    """Every entry under ``folder`` (symlinks not followed) except ``skip``: size, mtime, kind."""
    seen: dict[str, tuple[int, int, str]] = {}
    for root, folders, files in os.walk(folder):
        if Path(root) == skip or skip in Path(root).parents:
            continue
        for name in folders + files:
            path = Path(root) / name
            if path == skip:
                continue
            info = path.lstat()
            kind = "link" if path.is_symlink() else "dir" if path.is_dir() else "file"
            seen[str(path.relative_to(folder))] = (info.st_size if kind == "file" else 0, info.st_mtime_ns, kind)
    return seen


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []
