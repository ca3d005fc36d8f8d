"""A recorded NVML: answers the pynvml calls ptools makes from plain dicts.

It raises the real pynvml error classes, so the code under test takes the same paths as
on a real driver. A handle is the dict describing its device (or MIG instance).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pynvml

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


def _not_supported() -> pynvml.NVMLError:
    return pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)


class FakeNvml:
    """Stands in for the ``pynvml`` module."""

    NVMLError = pynvml.NVMLError
    NVML_ERROR_LIBRARY_NOT_FOUND = pynvml.NVML_ERROR_LIBRARY_NOT_FOUND
    NVML_ERROR_DRIVER_NOT_LOADED = pynvml.NVML_ERROR_DRIVER_NOT_LOADED
    NVML_ERROR_LIB_RM_VERSION_MISMATCH = pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH
    NVML_ERROR_NO_PERMISSION = pynvml.NVML_ERROR_NO_PERMISSION
    NVML_TEMPERATURE_GPU = pynvml.NVML_TEMPERATURE_GPU
    NVML_DEVICE_MIG_ENABLE = pynvml.NVML_DEVICE_MIG_ENABLE

    def __init__(self, gpus: list[dict[str, Any]], *, init_error: int | None = None,
                 driver: str = "580.159.04", cuda: int = 13000) -> None:
        self.gpus = gpus
        self.init_error = init_error
        self.driver = driver
        self.cuda = cuda
        self.initialised = 0

    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise pynvml.NVMLError(self.init_error)
        self.initialised += 1

    def nvmlShutdown(self) -> None:
        self.initialised -= 1

    def nvmlSystemGetDriverVersion(self) -> str:
        return self.driver

    def nvmlSystemGetNVMLVersion(self) -> str:
        return "13." + self.driver

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        return self.cuda

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self.gpus):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return self.gpus[index]

    def nvmlDeviceGetName(self, handle: dict[str, Any]) -> str:
        return handle["name"]

    def nvmlDeviceGetUUID(self, handle: dict[str, Any]) -> str:
        return handle["uuid"]

    def nvmlDeviceGetPciInfo(self, handle: dict[str, Any]) -> SimpleNamespace:
        return SimpleNamespace(busId=handle["bus"].encode())  # old pynvml returns bytes

    def nvmlDeviceGetCudaComputeCapability(self, handle: dict[str, Any]) -> tuple[int, int]:
        return handle["cc"]

    def nvmlDeviceGetMemoryInfo(self, handle: dict[str, Any]) -> SimpleNamespace:
        return SimpleNamespace(total=handle["total"], used=handle["used"],
                               free=handle["total"] - handle["used"])

    def nvmlDeviceGetUtilizationRates(self, handle: dict[str, Any]) -> SimpleNamespace:
        if handle["util"] is None:
            raise _not_supported()
        return SimpleNamespace(gpu=handle["util"], memory=handle["util"] // 2)

    def nvmlDeviceGetTemperature(self, handle: dict[str, Any], sensor: int) -> int:
        assert sensor == self.NVML_TEMPERATURE_GPU
        return handle["temp"]

    def nvmlDeviceGetPowerUsage(self, handle: dict[str, Any]) -> int:
        if handle["power_mw"] is None:
            raise _not_supported()
        return handle["power_mw"]

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: dict[str, Any]) -> int:
        if handle["limit_mw"] is None:
            raise _not_supported()
        return handle["limit_mw"]

    def nvmlDeviceGetMigMode(self, handle: dict[str, Any]) -> tuple[int, int]:
        if handle["mig"] is None:
            raise _not_supported()
        mode = self.NVML_DEVICE_MIG_ENABLE if handle["mig"] else 0
        return mode, mode

    def nvmlDeviceGetMaxMigDeviceCount(self, handle: dict[str, Any]) -> int:
        return 7

    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle: dict[str, Any], slot: int) -> dict[str, Any]:
        instances = handle["mig_instances"]
        if slot >= len(instances) or instances[slot] is None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)
        return instances[slot]

    def nvmlDeviceGetEccMode(self, handle: dict[str, Any]) -> tuple[int, int]:
        if "ecc" not in handle:
            raise _not_supported()
        return (0, 0) if handle["ecc"] is None else (1, 1)

    def nvmlDeviceGetTotalEccErrors(self, handle: dict[str, Any], error_type: int, counter_type: int) -> int:
        if handle.get("ecc") is None:
            raise _not_supported()
        corrected, uncorrected, lifetime = handle["ecc"]
        if error_type == pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED:
            assert counter_type == pynvml.NVML_VOLATILE_ECC
            return corrected
        return uncorrected if counter_type == pynvml.NVML_VOLATILE_ECC else lifetime

    def nvmlDeviceGetRetiredPages(self, handle: dict[str, Any], cause: int) -> list[int]:
        if handle.get("retired") is None:
            raise _not_supported()
        single, double, _ = handle["retired"]
        count = single if cause == pynvml.NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS else double
        return [0x1000 * i for i in range(count)]

    def nvmlDeviceGetRetiredPagesPendingStatus(self, handle: dict[str, Any]) -> int:
        if handle.get("retired") is None:
            raise _not_supported()
        return handle["retired"][2]

    def nvmlDeviceGetRemappedRows(self, handle: dict[str, Any]) -> tuple[int, int, int, int]:
        if handle.get("remapped") is None:
            raise _not_supported()
        return handle["remapped"]

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: dict[str, Any]) -> int:
        if handle.get("throttle") is None:
            raise _not_supported()
        return handle["throttle"]

    def nvmlDeviceGetComputeRunningProcesses(self, handle: dict[str, Any]) -> list[SimpleNamespace]:
        return [SimpleNamespace(pid=pid, usedGpuMemory=memory) for pid, memory in handle["processes"]]


def servers(count: int) -> FakeNvml:
    """``count`` identical H100s, GPU i using i GiB and i*10 % utilization."""
    return FakeNvml([make_gpu(i, used_gib=float(i), util=10 * i) for i in range(count)])


def visible_processes(pid: int) -> tuple[str | None, str | None]:
    """A process describer that sees every process."""
    return "alice", f"python train.py --rank {pid}"


def hidden_processes(pid: int) -> tuple[str | None, str | None]:
    """A process describer inside a container that sees none of the host's processes."""
    return None, None
