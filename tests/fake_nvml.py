"""Recorded GPUs for the tests: builders of the plain dicts ptools' recorded NVML
(:class:`ptools.core.nvml_replay.RecordedNvml`, here ``FakeNvml``) answers from."""

from __future__ import annotations

from typing import Any

from ptools.core.nvml_replay import RecordedNvml as FakeNvml

GIB = 2**30


def make_gpu(index: int, *, name: str = "NVIDIA H100 80GB HBM3", total_gib: int = 80,
             used_gib: float = 0.5, util: int = 0, cc: tuple[int, int] = (9, 0),
             processes: list[tuple[int, int | None]] | None = None, mig: bool | None = False,
             mig_instances: list[dict[str, Any]] | None = None, power: bool = True,
             ecc: tuple[int, int, int] | None = (0, 0, 0), retired: tuple[int, int, int] | None = None,
             remapped: tuple[int, int, int, int] | None = (0, 0, 0, 0), throttle: int | None = 0x1
             ) -> dict[str, Any]:
    """One recorded GPU; ``mig=None`` means the GPU does not support MIG. Health: ``ecc``
    (corrected, uncorrected, uncorrected lifetime) or None (no ECC); ``retired`` (single-bit
    pages, double-bit pages, pending) or None (not supported: Ampere and later remap rows);
    ``remapped`` (correctable, uncorrectable, pending, failed) or None; ``throttle`` the clock
    event reason mask (0x1: idle) or None."""
    return {
        "ecc": ecc,
        "retired": retired,
        "remapped": remapped,
        "throttle": throttle,
        "name": name,
        "uuid": f"GPU-{index:08x}-1111-2222-3333-{index:012x}",
        "bus": f"00000000:{0x18 + 0x10 * index:02X}:00.0",
        "cc": cc,
        "total": total_gib * GIB,
        "used": int(used_gib * GIB),
        "util": util,
        "temp": 30 + index,
        "power_mw": 70_000 + 1000 * index if power else None,
        "limit_mw": 700_000 if power else None,
        "processes": processes or [],
        "mig": mig,
        "mig_instances": mig_instances or [],
    }


def make_mig(parent_index: int, slot: int, *, total_gib: int = 40, used_gib: float = 0.0,
             processes: list[tuple[int, int | None]] | None = None) -> dict[str, Any]:
    """One recorded MIG instance (NVML reports no utilization for them)."""
    return {
        "name": f"NVIDIA A100-SXM4-80GB MIG 3g.{total_gib}gb",
        "uuid": f"MIG-{parent_index:04x}{slot:04x}-aaaa-bbbb-cccc-{slot:012x}",
        "cc": (8, 0),
        "total": total_gib * GIB,
        "used": int(used_gib * GIB),
        "util": None,
        "processes": processes or [],
    }


def servers(count: int) -> FakeNvml:
    """``count`` identical H100s, GPU i using i GiB and i*10 % utilization."""
    return FakeNvml([make_gpu(i, used_gib=float(i), util=10 * i) for i in range(count)])


def visible_processes(pid: int) -> tuple[str | None, str | None]:
    """A process describer that sees every process."""
    return "alice", f"python train.py --rank {pid}"


def hidden_processes(pid: int) -> tuple[str | None, str | None]:
    """A process describer inside a container that sees none of the host's processes."""
    return None, None
