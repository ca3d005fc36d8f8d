"""A recorded NVML: answers the pynvml calls ptools makes from plain data.

``PTOOLS_NVML_RECORDING=answer.json`` makes every NVML query of this process (and of the Ray
workers started with it) replay that file instead of asking the driver: for tests, demos and
reproducing a user's report on a machine without their GPUs. The file is data only (JSON):
``{"gpus": [{"name", "uuid", "bus", "cc": [9, 0], "total", "used", "util", "temp", "power_mw",
"limit_mw", "processes": [[pid, bytes]], "mig": false, "mig_instances": [], "ecc": [corrected,
uncorrected, lifetime] | null, "retired": [single, double, pending] | null, "remapped":
[correctable, uncorrectable, pending, failed] | null, "throttle": mask | null}], "driver",
"cuda", "init_error": NVML error code | null, "delay_s": seconds nvmlInit takes}``.

It raises the real pynvml error classes, so the code takes the same paths as on a real
driver. A handle is the dict describing its device (or MIG instance).
"""

from __future__ import annotations

import json
import time
from types import SimpleNamespace
from typing import Any

import pynvml

from ptools.errors import BadInputError

RECORDING_VARIABLE = "PTOOLS_NVML_RECORDING"


def _not_supported() -> pynvml.NVMLError:
    return pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)


class RecordedNvml:
    """Stands in for the ``pynvml`` module, answering from a recording."""

    NVMLError = pynvml.NVMLError
    NVML_ERROR_LIBRARY_NOT_FOUND = pynvml.NVML_ERROR_LIBRARY_NOT_FOUND
    NVML_ERROR_DRIVER_NOT_LOADED = pynvml.NVML_ERROR_DRIVER_NOT_LOADED
    NVML_ERROR_LIB_RM_VERSION_MISMATCH = pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH
    NVML_ERROR_NO_PERMISSION = pynvml.NVML_ERROR_NO_PERMISSION
    NVML_TEMPERATURE_GPU = pynvml.NVML_TEMPERATURE_GPU
    NVML_DEVICE_MIG_ENABLE = pynvml.NVML_DEVICE_MIG_ENABLE

    def __init__(
        self,
        gpus: list[dict[str, Any]],
        *,
        init_error: int | None = None,
        driver: str = "580.159.04",
        cuda: int = 13000,
        delay_s: float = 0.0,
    ) -> None:
        self.gpus = gpus
        self.init_error = init_error
        self.driver = driver
        self.cuda = cuda
        self.initialised = 0
        self.delay_s = delay_s

    def nvmlInit(self) -> None:
        if self.delay_s:
            time.sleep(self.delay_s)  # a slow or hanging driver
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
        return SimpleNamespace(total=handle["total"], used=handle["used"], free=handle["total"] - handle["used"])

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


MAX_DELAY_S = 600.0
_COUNT = (int, type(None))
# What the reader asks of every device (a MIG instance too), and of whole GPUs besides.
_DEVICE: dict[str, Any] = {
    "name": str,
    "uuid": str,
    "cc": list,
    "total": int,
    "used": int,
    "util": _COUNT,
    "processes": list,
}
_WHOLE_GPU: dict[str, Any] = {
    **_DEVICE,
    "bus": str,
    "temp": _COUNT,
    "power_mw": _COUNT,
    "limit_mw": _COUNT,
    "mig": (bool, type(None)),
    "mig_instances": list,
}
_HEALTH_LENGTHS = {"ecc": 3, "retired": 3, "remapped": 4}  # each a list of that many integers, or null
# Magnitudes a real device can report, so that a 400-byte recording cannot ask for 9 GB
# (a list of 10^9 retired pages) or overflow a float (watts of 10^400 mW).
_PETABYTE = 1 << 50
_RANGES: dict[str, tuple[int, int]] = {
    "total": (0, _PETABYTE),
    "used": (0, _PETABYTE),
    "util": (0, 100),
    "temp": (-273, 1000),
    "power_mw": (0, 10**8),
    "limit_mw": (0, 10**8),
    "throttle": (0, (1 << 64) - 1),
}
_HEALTH_RANGES = {"ecc": (0, (1 << 64) - 1), "retired": (0, 1 << 16), "remapped": (0, 1 << 20)}
_MAX_ITEMS = 4096  # GPUs, processes, MIG instances in one recording
_MAX_TEXT = 1024


def _in_range(value: Any, low: int, high: int) -> bool:
    return value is None or (isinstance(value, int) and not isinstance(value, bool) and low <= value <= high)


def _check_device(device: Any, where: str, fields: dict[str, Any]) -> None:
    """A recorded device holds every field the reader asks for, of the type it expects: a
    recording that lies fails here, in one line, not deep inside a query."""
    if not isinstance(device, dict):
        raise ValueError(f"{where} is not an object")
    for name, kind in fields.items():
        if name not in device or not isinstance(device[name], kind):
            raise ValueError(f"{where}.{name} is missing or of the wrong type")
    for name, (low, high) in _RANGES.items():
        if name in device and not _in_range(device[name], low, high):
            raise ValueError(f"{where}.{name} must be {low:,} to {high:,}")
    for name in ("name", "uuid", "bus"):
        if len(device.get(name) or "") > _MAX_TEXT:
            raise ValueError(f"{where}.{name} is longer than {_MAX_TEXT} characters")
    for name in ("processes", "mig_instances"):
        if len(device.get(name) or ()) > _MAX_ITEMS:
            raise ValueError(f"{where}.{name} holds more than {_MAX_ITEMS:,} entries")
    cc = device["cc"]
    if len(cc) != 2 or not all(_in_range(part, 0, 99) and part is not None for part in cc):
        raise ValueError(f"{where}.cc must be [major, minor]")
    if device["total"] < 0 or not 0 <= device["used"] <= device["total"]:
        raise ValueError(f"{where}: memory must satisfy 0 <= used <= total")
    for process in device["processes"]:
        if not (isinstance(process, list) and len(process) == 2 and isinstance(process[0], int)
                and _in_range(process[0], 0, (1 << 32) - 1)
                and _in_range(process[1], 0, _PETABYTE)):  # fmt: skip
            raise ValueError(f"{where}.processes holds [pid, bytes or null] pairs")
    for name, length in _HEALTH_LENGTHS.items():
        value = device.get(name)
        low, high = _HEALTH_RANGES[name]
        if value is not None and not (
            isinstance(value, list)
            and len(value) == length
            and all(isinstance(v, int) and _in_range(v, low, high) for v in value)
        ):
            raise ValueError(f"{where}.{name} must be {length} integers of {low:,} to {high:,}, or null")
    if not isinstance(device.get("throttle"), _COUNT):
        raise ValueError(f"{where}.throttle must be an integer mask or null")


def load_recording(path: str) -> RecordedNvml:
    """A :class:`RecordedNvml` from a JSON recording (see the module's docstring).

    Raises:
        BadInputError: the file cannot be read or is not a recording.
    """
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
        if not isinstance(data, dict) or not isinstance(data.get("gpus"), list):
            raise ValueError('not an object with a "gpus" list')
        if len(data["gpus"]) > _MAX_ITEMS:
            raise ValueError(f"more than {_MAX_ITEMS:,} GPUs")
        for number, gpu in enumerate(data["gpus"]):
            _check_device(gpu, f"gpus[{number}]", _WHOLE_GPU)
            for slot, instance in enumerate(gpu["mig_instances"]):
                if instance is not None:
                    _check_device(instance, f"gpus[{number}].mig_instances[{slot}]", _DEVICE)
        delay = float(data.get("delay_s", 0.0))
        if not 0 <= delay <= MAX_DELAY_S:
            raise ValueError(f"delay_s must be 0 to {MAX_DELAY_S:g} seconds")
        if not _in_range(data.get("init_error"), 0, 1 << 16):
            raise ValueError("init_error must be an NVML error code or null")
        if not _in_range(data.get("cuda", 13000), 0, 10**6) or len(str(data.get("driver", ""))) > _MAX_TEXT:
            raise ValueError("cuda must be a version number like 13000, driver a version string")
        return RecordedNvml(
            list(data["gpus"]),
            init_error=data.get("init_error"),
            driver=str(data.get("driver", "580.159.04")),
            cuda=int(data.get("cuda", 13000)),
            delay_s=delay,
        )
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as failure:  # deep nesting: RecursionError
        reason = "nested too deeply" if isinstance(failure, RecursionError) else str(failure)[:200]
        raise BadInputError(f"{RECORDING_VARIABLE}={path}: not a readable NVML recording ({reason})") from None
