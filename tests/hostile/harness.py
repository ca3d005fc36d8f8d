"""Running ptools on a hostile file as an attacker's victim would: a real subprocess, with a
memory limit and a timeout, and everything around it watched."""

from __future__ import annotations

import os
import resource
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
TORCH_COMMANDS = {"summary", "freeze-pt2"}


def command_line(command: str, target: Path, out: Path) -> list[str]:
    """The ptools arguments for one kind of invocation of ``target``."""
    path = str(target)
    return {
        "inspect": ["inspect-state-dict", path],
        "inspect-stats": ["inspect-state-dict", path, "--stats"],
        "inspect-json": ["inspect-state-dict", path, "--json"],
        "count": ["count-params", path],
        "convert-pt": ["convert-ckpt", path, str(out / "out.pt")],
        "convert-st": ["convert-ckpt", path, str(out / "out.safetensors"), "--extract", "auto"],
        "convert-shards": ["convert-ckpt", path, str(out / "shards"), "--shard-size", "1MB", "--extract", "auto"],
        "summary": ["summary", path, "--input-size", "3"],
        "freeze-pt2": ["freeze", path, "--layers", "*", "--dry-run"],
        "nms": ["nms", path, "-o", str(out / "out.json")],
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


def run_ptools(arguments: list[str], memory_limit: int, timeout: float = TIMEOUT_S, cwd: Path | None = None) -> Run:
    """``python -m ptools ARGUMENTS`` under RLIMIT_AS, killed after ``timeout``; peak RSS from
    the kernel's accounting of that one child."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))
        os.setsid()

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("PTOOLS_DEBUG", None)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        process = subprocess.Popen([sys.executable, "-m", "ptools", *arguments], stdout=out, stderr=err,
                                   stdin=subprocess.DEVNULL, preexec_fn=limit, cwd=cwd, env=env)
        timed_out = False
        while True:  # wait4, not communicate: the kernel's peak RSS of this one child
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - started > timeout:
                timed_out = True
                os.killpg(process.pid, signal.SIGKILL)
                _, status, usage = os.wait4(process.pid, 0)
                break
            time.sleep(0.005)
        process.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - started
        out.seek(0)
        err.seek(0)
        return Run(process.returncode, out.read().decode(errors="replace"), err.read().decode(errors="replace"),
                   seconds, usage.ru_maxrss * 1024, timed_out)


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
