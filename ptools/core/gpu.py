"""CUDA device queries for servers and scripts: NVML first, torch only where NVML cannot tell.

NVML (package ``nvidia-ml-py``, module ``pynvml``) answers without creating a CUDA context,
which would cost hundreds of MB on every GPU. torch is asked only for its own build
(CUDA/cuDNN/NCCL versions, MPS, ROCm) and for devices when NVML is not there.

Two seams make every path testable without a GPU: ``nvml`` (any object with pynvml's
functions and error codes) and ``torch_probe`` (a callable returning :class:`TorchInfo`).

CUDA numbering, as modelled here:

* NVML numbers physical GPUs by PCI bus. A GPU in MIG mode is not a CUDA device itself; each
  of its MIG instances is.
* CUDA orders those units by PCI bus when ``CUDA_DEVICE_ORDER=PCI_BUS_ID``; by its
  "fastest first" heuristic otherwise, which is PCI order for identical GPUs. For mixed
  GPUs the order is taken from torch when it was asked, else guessed (and said so).
* ``CUDA_VISIBLE_DEVICES`` then keeps and renumbers units: entries are indices into that
  order, ``GPU-…`` or ``MIG-…`` UUIDs (unique prefixes allowed). As in CUDA, the list stops at
  the first entry that is invalid, unknown or repeated; an empty value hides every device.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

from ptools.core.choices import SelectOrder, values
from ptools.errors import BadInputError, RequirementNotMetError

SELECT_ORDERS = values(SelectOrder)


@dataclass
class GpuProcess:
    """A compute process on a device, as NVML reports it.

    ``user`` and ``command`` are None when the process is not visible from here (another
    PID namespace, e.g. inside a container, or no permission).
    """

    pid: int
    used_memory_bytes: int | None
    user: str | None = None
    command: str | None = None


@dataclass
class GpuDevice:
    """One device: a whole GPU, or a MIG instance of one (``kind == "mig"``).

    ``cuda_index`` is the index this process would use (``cuda:N``), None when the unit is
    hidden by ``CUDA_VISIBLE_DEVICES`` or is a GPU in MIG mode. ``visible_devices_entry`` is
    the ``CUDA_VISIBLE_DEVICES`` entry that names the unit from this environment.
    """

    kind: str
    nvml_index: int
    uuid: str
    name: str
    source: str
    cuda_index: int | None = None
    visible_devices_entry: str | None = None
    mig_index: int | None = None
    parent_uuid: str | None = None
    pci_bus_id: str | None = None
    compute_capability: str | None = None
    memory_total_bytes: int | None = None
    memory_used_bytes: int | None = None
    memory_free_bytes: int | None = None
    utilization_gpu_percent: int | None = None
    utilization_memory_percent: int | None = None
    temperature_c: int | None = None
    power_draw_watts: float | None = None
    power_limit_watts: float | None = None
    mig_mode: str | None = None
    processes: list[GpuProcess] = field(default_factory=list)
    # Health (whole GPUs; None where NVML does not say, e.g. no ECC on the board).
    ecc_mode: str | None = None  # enabled, disabled
    ecc_errors_corrected: int | None = None  # since the driver loaded (volatile)
    ecc_errors_uncorrected: int | None = None
    ecc_errors_uncorrected_lifetime: int | None = None  # aggregate, across reboots
    retired_pages: int | None = None  # pre-Ampere page retirement: single + double bit
    retired_pages_pending: bool | None = None
    remapped_rows_correctable: int | None = None  # Ampere and later: row remapping
    remapped_rows_uncorrectable: int | None = None
    remapping_pending: bool | None = None
    remapping_failed: bool | None = None
    throttle_reasons: list[str] | None = None  # active clock-event reasons, NVML's names
    xid_errors: list[dict[str, Any]] | None = None  # from the kernel log, when readable

    @property
    def memory_errors(self) -> list[str]:
        """What says this GPU's memory cannot be trusted: uncorrected ECC errors since the driver
        loaded, pages waiting for retirement, pending or failed row remapping."""
        found = []
        if self.ecc_errors_uncorrected:
            found.append(f"{self.ecc_errors_uncorrected} uncorrected ECC errors")
        if self.retired_pages_pending:
            found.append("retired pages pending a reset")
        if self.remapping_pending:
            found.append("row remapping pending a reset")
        if self.remapping_failed:
            found.append("row remapping failed")
        return found

    @property
    def addressable(self) -> bool:
        """Whether a CUDA program in this environment can use the device."""
        return self.cuda_index is not None

    def to_dict(self) -> dict[str, Any]:
        """The device as plain JSON-ready data (with ``memory_errors``, derived)."""
        data = asdict(self)
        data["memory_errors"] = self.memory_errors
        return data


@dataclass
class TorchInfo:
    """What the installed torch says about itself and the devices it sees."""

    version: str
    cuda_version: str | None = None
    cudnn_version: str | None = None
    nccl_version: str | None = None
    hip_version: str | None = None
    cuda_available: bool = False
    device_count: int = 0
    mps_available: bool = False
    # One dict per CUDA index: name, uuid, compute_capability, memory_total_bytes.
    devices: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class SystemInfo:
    """Driver, CUDA and torch versions, and the environment that decides CUDA numbering."""

    driver_version: str | None = None
    cuda_driver_version: str | None = None
    nvml_version: str | None = None
    cuda_visible_devices: str | None = None
    cuda_device_order: str = "FASTEST_FIRST"
    torch_version: str | None = None
    torch_cuda_version: str | None = None
    torch_cudnn_version: str | None = None
    torch_nccl_version: str | None = None
    torch_hip_version: str | None = None
    torch_cuda_available: bool | None = None
    torch_device_count: int | None = None
    mps_available: bool | None = None


@dataclass
class GpuReport:
    """Everything ``gpu-info`` knows.

    ``sources`` says who answered: ``devices`` is ``nvml``, ``torch`` or ``none``;
    ``cuda_order`` is ``pci``, ``torch``, ``guess`` or ``none`` (no devices); ``torch`` is ``torch``, ``skipped`` or
    ``not-installed``. ``problems`` lists, in plain words, what is missing and why.
    """

    system: SystemInfo
    devices: list[GpuDevice]
    sources: dict[str, str]
    problems: list[str]

    @property
    def addressable_devices(self) -> list[GpuDevice]:
        """Devices a CUDA program started from here can use, by CUDA index."""
        return sorted((d for d in self.devices if d.addressable), key=lambda d: d.cuda_index or 0)

    def to_dict(self) -> dict[str, Any]:
        """The report as plain JSON-ready data (the ``--json`` document)."""
        return {
            "system": asdict(self.system),
            "devices": [device.to_dict() for device in self.devices],
            "sources": dict(self.sources),
            "problems": list(self.problems),
        }


# --------------------------------------------------------------------------- NVML

# NVML's enum values (fixed by its C API), so that any pynvml-like object can be asked.
_ECC_CORRECTED, _ECC_UNCORRECTED = 0, 1  # nvmlMemoryErrorType_t
_ECC_VOLATILE, _ECC_AGGREGATE = 0, 1  # nvmlEccCounterType_t
_RETIRED_SINGLE_BIT, _RETIRED_DOUBLE_BIT = 0, 1  # nvmlPageRetirementCause_t

# NVML's clock-event ("throttle") reason bits, with the names nvidia-smi -q prints in its
# "Clocks Event Reasons" section.
CLOCK_EVENT_REASONS = (
    (0x1, "gpu_idle"),
    (0x2, "applications_clocks_setting"),
    (0x4, "sw_power_cap"),
    (0x8, "hw_slowdown"),
    (0x10, "sync_boost"),
    (0x20, "sw_thermal_slowdown"),
    (0x40, "hw_thermal_slowdown"),
    (0x80, "hw_power_brake_slowdown"),
    (0x100, "display_clock_setting"),
)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _nvml_init_problem(nvml: Any, error: Exception) -> str:
    """Say in plain words why NVML could not start."""
    code = getattr(error, "value", None)
    reasons = {
        getattr(nvml, "NVML_ERROR_LIBRARY_NOT_FOUND", -1): (
            "no NVIDIA driver found: the NVML library (libnvidia-ml.so.1) could not be "
            "loaded, so this machine has no usable NVIDIA GPU"
        ),
        getattr(nvml, "NVML_ERROR_DRIVER_NOT_LOADED", -1): (
            "the NVIDIA kernel driver is not loaded (is the GPU passed through to this machine or container?)"
        ),
        getattr(nvml, "NVML_ERROR_LIB_RM_VERSION_MISMATCH", -1): (
            "driver/library version mismatch: the NVML library does not match the loaded "
            "kernel driver, usually after a driver upgrade without a reboot"
        ),
        getattr(nvml, "NVML_ERROR_NO_PERMISSION", -1): (
            "no permission to query the NVIDIA driver (check access to /dev/nvidia*)"
        ),
    }
    return reasons.get(code, f"NVML could not start: {error}")


class _NvmlReader:
    """Reads devices through a pynvml-like object; a field NVML refuses is left None."""

    def __init__(self, nvml: Any, describe_process: Callable[[int], tuple[str | None, str | None]]):
        self.nvml = nvml
        self.describe_process = describe_process

    def _ask(self, function: str, *args: Any) -> Any:
        ask = getattr(self.nvml, function, None)  # an older nvidia-ml-py may not have it
        if ask is None:
            return None
        try:
            return ask(*args)
        except self.nvml.NVMLError:
            return None

    def system(self, info: SystemInfo) -> None:
        driver = self._ask("nvmlSystemGetDriverVersion")
        info.driver_version = _text(driver) if driver is not None else None
        nvml_version = self._ask("nvmlSystemGetNVMLVersion")
        info.nvml_version = _text(nvml_version) if nvml_version is not None else None
        cuda = self._ask("nvmlSystemGetCudaDriverVersion")
        if cuda:
            info.cuda_driver_version = f"{cuda // 1000}.{cuda % 1000 // 10}"

    def devices(self) -> list[GpuDevice]:
        devices: list[GpuDevice] = []
        for index in range(self.nvml.nvmlDeviceGetCount()):
            handle = self.nvml.nvmlDeviceGetHandleByIndex(index)
            gpu = self._device(handle, kind="gpu", nvml_index=index)
            pci = self._ask("nvmlDeviceGetPciInfo", handle)
            gpu.pci_bus_id = _text(pci.busId) if pci is not None else None
            gpu.power_draw_watts = self._milliwatts(self._ask("nvmlDeviceGetPowerUsage", handle))
            gpu.power_limit_watts = self._milliwatts(self._ask("nvmlDeviceGetEnforcedPowerLimit", handle))
            gpu.temperature_c = self._ask("nvmlDeviceGetTemperature", handle, self.nvml.NVML_TEMPERATURE_GPU)
            self._health(handle, gpu)
            mode = self._ask("nvmlDeviceGetMigMode", handle)
            if mode is None:
                gpu.mig_mode = "unsupported"
            else:
                gpu.mig_mode = "enabled" if mode[0] == self.nvml.NVML_DEVICE_MIG_ENABLE else "disabled"
            devices.append(gpu)
            if gpu.mig_mode == "enabled":
                devices.extend(self._mig_devices(handle, gpu))
        return devices

    def _health(self, handle: Any, gpu: GpuDevice) -> None:
        mode = self._ask("nvmlDeviceGetEccMode", handle)
        if mode is not None:
            gpu.ecc_mode = "enabled" if mode[0] else "disabled"
        if gpu.ecc_mode == "enabled":
            errors = "nvmlDeviceGetTotalEccErrors"
            gpu.ecc_errors_corrected = self._ask(errors, handle, _ECC_CORRECTED, _ECC_VOLATILE)
            gpu.ecc_errors_uncorrected = self._ask(errors, handle, _ECC_UNCORRECTED, _ECC_VOLATILE)
            gpu.ecc_errors_uncorrected_lifetime = self._ask(errors, handle, _ECC_UNCORRECTED, _ECC_AGGREGATE)
        single = self._ask("nvmlDeviceGetRetiredPages", handle, _RETIRED_SINGLE_BIT)
        double = self._ask("nvmlDeviceGetRetiredPages", handle, _RETIRED_DOUBLE_BIT)
        if single is not None or double is not None:
            gpu.retired_pages = len(single or []) + len(double or [])
            pending = self._ask("nvmlDeviceGetRetiredPagesPendingStatus", handle)
            gpu.retired_pages_pending = bool(pending) if pending is not None else None
        rows = self._ask("nvmlDeviceGetRemappedRows", handle)
        if rows is not None:
            correctable, uncorrectable, pending_rows, failed = rows
            gpu.remapped_rows_correctable = int(correctable)
            gpu.remapped_rows_uncorrectable = int(uncorrectable)
            gpu.remapping_pending = bool(pending_rows)
            gpu.remapping_failed = bool(failed)
        reasons = self._ask("nvmlDeviceGetCurrentClocksEventReasons", handle)
        if reasons is None:
            reasons = self._ask("nvmlDeviceGetCurrentClocksThrottleReasons", handle)  # drivers before 535
        if reasons is not None:
            gpu.throttle_reasons = [name for bit, name in CLOCK_EVENT_REASONS if reasons & bit]

    def _mig_devices(self, handle: Any, parent: GpuDevice) -> list[GpuDevice]:
        found = []
        for slot in range(self._ask("nvmlDeviceGetMaxMigDeviceCount", handle) or 0):
            mig_handle = self._ask("nvmlDeviceGetMigDeviceHandleByIndex", handle, slot)
            if mig_handle is None:  # empty slot
                continue
            mig = self._device(mig_handle, kind="mig", nvml_index=parent.nvml_index)
            mig.mig_index = slot
            mig.parent_uuid = parent.uuid
            mig.pci_bus_id = parent.pci_bus_id
            mig.compute_capability = mig.compute_capability or parent.compute_capability
            found.append(mig)
        return found

    def _device(self, handle: Any, kind: str, nvml_index: int) -> GpuDevice:
        name = self._ask("nvmlDeviceGetName", handle)
        device = GpuDevice(
            kind=kind,
            nvml_index=nvml_index,
            uuid=_text(self.nvml.nvmlDeviceGetUUID(handle)),
            name=_text(name) if name is not None else "unknown",
            source="nvml",
        )
        capability = self._ask("nvmlDeviceGetCudaComputeCapability", handle)
        if capability is not None:
            device.compute_capability = f"{capability[0]}.{capability[1]}"
        memory = self._ask("nvmlDeviceGetMemoryInfo", handle)
        if memory is not None:
            device.memory_total_bytes = int(memory.total)
            device.memory_used_bytes = int(memory.used)
            device.memory_free_bytes = int(memory.free)
        utilization = self._ask("nvmlDeviceGetUtilizationRates", handle)
        if utilization is not None:
            device.utilization_gpu_percent = int(utilization.gpu)
            device.utilization_memory_percent = int(utilization.memory)
        for process in self._ask("nvmlDeviceGetComputeRunningProcesses", handle) or []:
            user, command = self.describe_process(int(process.pid))
            used = getattr(process, "usedGpuMemory", None)
            device.processes.append(
                GpuProcess(
                    pid=int(process.pid),
                    used_memory_bytes=int(used) if used is not None else None,
                    user=user,
                    command=command,
                )
            )
        return device

    @staticmethod
    def _milliwatts(value: int | None) -> float | None:
        return value / 1000.0 if value is not None else None


_XID_LINE = re.compile(
    r"NVRM: Xid \(PCI:(?:[0-9A-Fa-f]+:)?([0-9A-Fa-f]+:[0-9A-Fa-f]+)(?:\.[0-9A-Fa-f])?\): (\d+),?\s*(.*)"
)
XID_KEPT = 10  # the most recent XID events kept per GPU
_KERNEL_LOG_RECORDS = 1 << 16


def read_kernel_log(path: str = "/dev/kmsg") -> list[str] | None:
    """The messages in the kernel's ring buffer, oldest first; None when this process may not
    read it (containers and non-root users usually may not)."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    lines: list[str] = []
    try:
        while len(lines) < _KERNEL_LOG_RECORDS:
            try:
                record = os.read(descriptor, 8192)  # one record per read
            except BlockingIOError:
                break  # the end of the buffer
            except BrokenPipeError:
                continue  # a record overwritten while reading: skip it
            except OSError:
                return None if not lines else lines
            if not record:
                break
            lines.append(record.decode(errors="replace").split(";", 1)[-1].strip())
    finally:
        os.close(descriptor)
    return lines


def _bus_key(pci_bus_id: str | None) -> str | None:
    """``00000000:18:00.0`` and ``0000:18:00`` -> ``18:00`` (bus and device)."""
    if not pci_bus_id:
        return None
    parts = pci_bus_id.split(".")[0].split(":")
    return ":".join(parts[-2:]).lower() if len(parts) >= 2 else None


def attach_xid_errors(devices: Sequence[GpuDevice], lines: list[str] | None) -> None:
    """Give each whole GPU the XID errors the NVIDIA driver logged for its PCI address (the
    last :data:`XID_KEPT`); leave them None when the log could not be read."""
    if lines is None:
        return
    by_bus = {_bus_key(d.pci_bus_id): d for d in devices if d.kind == "gpu"}
    for device in by_bus.values():
        device.xid_errors = []
    for line in lines:
        match = _XID_LINE.search(line)
        logged = by_bus.get(match.group(1).lower()) if match else None
        if match and logged is not None and logged.xid_errors is not None:
            logged.xid_errors.append({"xid": int(match.group(2)), "message": match.group(3)[:200]})
    for device in by_bus.values():
        if device.xid_errors is not None:
            device.xid_errors = device.xid_errors[-XID_KEPT:]


def describe_process(pid: int, proc_root: str = "/proc") -> tuple[str | None, str | None]:
    """Return ``(user, command line)`` of a process, or Nones where this OS hides it."""
    path = os.path.join(proc_root, str(pid))
    try:
        uid = os.stat(path).st_uid
        with open(os.path.join(path, "cmdline"), "rb") as handle:
            raw = handle.read()
    except OSError:
        return None, None
    command = raw.replace(b"\0", b" ").decode(errors="replace").strip() or None
    try:
        import pwd

        user = pwd.getpwuid(uid).pw_name
    except (ImportError, KeyError):
        user = str(uid)
    return user, command


# --------------------------------------------------------------------------- torch


def probe_torch() -> TorchInfo | None:
    """Ask the installed torch about its build and devices; None when torch is missing.

    Uses only calls that do not create a CUDA context (device count and properties).
    """
    try:
        import torch
    except ImportError:
        return None
    info = TorchInfo(
        version=torch.__version__, cuda_version=torch.version.cuda, hip_version=getattr(torch.version, "hip", None)
    )
    info.cuda_available = bool(torch.cuda.is_available())
    mps = getattr(torch.backends, "mps", None)
    info.mps_available = bool(mps is not None and mps.is_available())
    if info.cuda_version or info.hip_version:
        try:
            info.cudnn_version = format_cudnn_version(torch.backends.cudnn.version())
        except RuntimeError:
            info.cudnn_version = None
        nccl = getattr(torch.cuda, "nccl", None)
        try:
            version = nccl.version() if nccl is not None else None
        except (RuntimeError, AttributeError):
            version = None
        info.nccl_version = (
            ".".join(map(str, version)) if isinstance(version, tuple) else (str(version) if version else None)
        )
    if info.cuda_available:
        info.device_count = torch.cuda.device_count()
        for index in range(info.device_count):
            properties = torch.cuda.get_device_properties(index)
            uuid = getattr(properties, "uuid", None)
            info.devices.append(
                {
                    "name": properties.name,
                    "uuid": str(uuid) if uuid is not None else None,
                    "compute_capability": f"{properties.major}.{properties.minor}",
                    "memory_total_bytes": int(properties.total_memory),
                }
            )
    return info


def format_cudnn_version(code: int | None) -> str | None:
    """``90100 -> "9.1.0"`` (cuDNN 9 packs major·10000); ``8902 -> "8.9.2"`` (cuDNN 8, ·1000)."""
    if not code:
        return None
    if code >= 90000:
        return f"{code // 10000}.{code % 10000 // 100}.{code % 100}"
    return f"{code // 1000}.{code % 1000 // 100}.{code % 100}"


def _apply_torch_info(system: SystemInfo, torch_info: TorchInfo) -> None:
    system.torch_version = torch_info.version
    system.torch_cuda_version = torch_info.cuda_version
    system.torch_cudnn_version = torch_info.cudnn_version
    system.torch_nccl_version = torch_info.nccl_version
    system.torch_hip_version = torch_info.hip_version
    system.torch_cuda_available = torch_info.cuda_available
    system.torch_device_count = torch_info.device_count
    system.mps_available = torch_info.mps_available


def _torch_problems(torch_info: TorchInfo, nvml_devices: int) -> list[str]:
    if torch_info.cuda_version is None and torch_info.hip_version is None:
        return (
            [f"torch {torch_info.version} is a CPU-only build: install a CUDA build of torch to use the GPU"]
            if nvml_devices
            else []
        )
    if not torch_info.cuda_available and nvml_devices:
        return [
            f"torch {torch_info.version} (CUDA {torch_info.cuda_version}) sees no GPU although "
            f"NVML lists {nvml_devices}: check CUDA_VISIBLE_DEVICES and that the driver "
            "supports this CUDA version"
        ]
    return []


# --------------------------------------------------------------------------- CUDA numbering


def _uuid_key(uuid: str | None) -> str:
    """Compare UUIDs as CUDA does, without their ``GPU-``/``MIG-`` prefix."""
    text = (uuid or "").strip().lower()
    for prefix in ("gpu-", "mig-"):
        if text.startswith(prefix):
            return text[len(prefix) :]
    return text


def _cuda_units(devices: Sequence[GpuDevice]) -> list[GpuDevice]:
    """The devices CUDA can enumerate, in PCI order: MIG instances replace their GPU."""
    return [d for d in devices if d.kind == "mig" or d.mig_mode != "enabled"]


def _parse_visible_entry(entry: str, units: Sequence[GpuDevice]) -> GpuDevice | None:
    if entry.isdigit():
        index = int(entry)
        return units[index] if index < len(units) else None
    lowered = entry.lower()
    if lowered.startswith("gpu-"):
        candidates = [u for u in units if u.kind == "gpu"]
    elif lowered.startswith("mig-"):
        candidates = [u for u in units if u.kind == "mig"]
    else:
        return None
    key = _uuid_key(entry)
    matches = [u for u in candidates if key and _uuid_key(u.uuid).startswith(key)]
    return matches[0] if len(matches) == 1 else None


def assign_cuda_indices(
    devices: Sequence[GpuDevice],
    env: Mapping[str, str],
    torch_uuids: Sequence[str | None] | None = None,
) -> tuple[str, list[str]]:
    """Set ``cuda_index`` and ``visible_devices_entry`` on each device, in place.

    Args:
        devices: NVML devices in NVML order (GPUs, each followed by its MIG instances).
        env: the environment (``CUDA_VISIBLE_DEVICES``, ``CUDA_DEVICE_ORDER``).
        torch_uuids: UUID of each CUDA index as torch reported it, if torch was asked.

    Returns:
        How the order was found (``pci``, ``torch`` or ``guess``) and problems to report.
    """
    for device in devices:
        device.cuda_index = None
        device.visible_devices_entry = None
    units = _cuda_units(devices)
    problems: list[str] = []
    by_key = {_uuid_key(u.uuid): u for u in units}
    if torch_uuids and all(_uuid_key(u) in by_key for u in torch_uuids):
        # torch already applied CUDA's own ordering and CUDA_VISIBLE_DEVICES.
        how = "torch"
        visible = [by_key[_uuid_key(u)] for u in torch_uuids]
        entries = _visible_entries(env.get("CUDA_VISIBLE_DEVICES"), visible)
        for index, (device, entry) in enumerate(zip(visible, entries)):
            device.cuda_index, device.visible_devices_entry = index, entry
        return how, problems

    order = env.get("CUDA_DEVICE_ORDER", "FASTEST_FIRST")
    if order == "PCI_BUS_ID" or len({u.name for u in units}) <= 1:
        how = "pci"
    else:
        how = "guess"
        # Newer architectures first, as CUDA's heuristic tends to; stable within ties.
        units = sorted(units, key=lambda u: -float(u.compute_capability or 0))
        problems.append(
            "the GPUs differ and CUDA_DEVICE_ORDER is not PCI_BUS_ID: CUDA indices are a "
            "guess of CUDA's fastest-first order; export CUDA_DEVICE_ORDER=PCI_BUS_ID for a "
            "stable numbering"
        )
    visible_text = env.get("CUDA_VISIBLE_DEVICES")
    if visible_text is None:
        for index, unit in enumerate(units):
            unit.cuda_index, unit.visible_devices_entry = index, str(index)
        return how, problems
    chosen: list[tuple[GpuDevice, str]] = []
    raw_entries = [e.strip() for e in visible_text.split(",")] if visible_text.strip() else []
    for entry in raw_entries:
        parsed = _parse_visible_entry(entry, units)
        if parsed is None or any(parsed is seen for seen, _ in chosen):
            problems.append(
                f"CUDA_VISIBLE_DEVICES={visible_text!r}: entry {entry!r} names no device "
                "(or repeats one); CUDA ignores it and every entry after it"
            )
            break
        chosen.append((parsed, entry))
    for index, (unit, entry) in enumerate(chosen):
        unit.cuda_index, unit.visible_devices_entry = index, entry
    return how, problems


def _visible_entries(visible_text: str | None, visible: Sequence[GpuDevice]) -> list[str]:
    """The CUDA_VISIBLE_DEVICES entry naming each visible device, when torch gave the order."""
    if visible_text is None:
        return [str(index) for index in range(len(visible))]
    entries = [e.strip() for e in visible_text.split(",")]
    # CUDA keeps the listed order, so the i-th visible device is named by the i-th entry.
    return [entries[i] if i < len(entries) else visible[i].uuid for i in range(len(visible))]


# --------------------------------------------------------------------------- queries


def query_devices(
    *,
    use_torch: bool = True,
    nvml: Any | None = None,
    torch_probe: Callable[[], TorchInfo | None] | None = None,
    env: Mapping[str, str] | None = None,
    process_describer: Callable[[int], tuple[str | None, str | None]] | None = None,
    kernel_log: Callable[[], list[str] | None] | None = None,
) -> GpuReport:
    """Describe this machine's GPUs and the CUDA numbering this process would see.

    Never raises for a missing driver, library or GPU: what is missing is said in
    ``problems``. Never creates a CUDA context.

    Args:
        use_torch: also ask torch (imports it once, ~1.5 s). False never imports torch.
        nvml: a pynvml-like object; default the real ``pynvml``.
        torch_probe: returns :class:`TorchInfo` or None; default :func:`probe_torch`.
        env: environment to read CUDA variables from; default ``os.environ``.
        process_describer: ``pid -> (user, command)``; default :func:`describe_process`.
        kernel_log: returns the kernel's messages (for XID errors) or None when unreadable;
            default :func:`read_kernel_log`. Read only when NVML found GPUs.
    """
    env = os.environ if env is None else env
    system = SystemInfo(
        cuda_visible_devices=env.get("CUDA_VISIBLE_DEVICES"),
        cuda_device_order=env.get("CUDA_DEVICE_ORDER", "FASTEST_FIRST"),
    )
    problems: list[str] = []
    sources = {"devices": "none", "cuda_order": "none", "torch": "skipped"}  # no devices: no order
    devices = _read_nvml(nvml, system, problems, process_describer or describe_process)
    if devices is not None:
        sources["devices"] = "nvml"
        if devices:
            attach_xid_errors(devices, (kernel_log or read_kernel_log)())

    torch_info = None
    if use_torch:
        torch_info = (torch_probe or probe_torch)()
        if torch_info is None:
            sources["torch"] = "not-installed"
            problems.append("torch is not installed")
        else:
            sources["torch"] = "torch"
            _apply_torch_info(system, torch_info)
            problems.extend(_torch_problems(torch_info, len(devices or [])))

    if devices is None and torch_info is not None and torch_info.devices:
        devices = _devices_from_torch(torch_info, env)
        sources["devices"] = sources["cuda_order"] = "torch"
        problems.append(
            "device details from torch: NVML gave no answer, so utilization, "
            "temperature, power and processes are unknown"
        )
    elif devices is not None:
        torch_uuids = [d["uuid"] for d in torch_info.devices] if torch_info else None
        how, order_problems = assign_cuda_indices(devices, env, torch_uuids)
        sources["cuda_order"] = how
        problems.extend(order_problems)
    devices = devices or []
    if not devices:
        sources["cuda_order"] = "none"
    if not any(d.addressable for d in devices) and devices:
        problems.append(
            "no GPU is visible to CUDA programs started from here "
            f"(CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES')!r})"
        )
    return GpuReport(system=system, devices=devices, sources=sources, problems=problems)


def load_nvml() -> Any | None:
    """The real ``pynvml`` module, or None when nvidia-ml-py is not installed; a recorded
    answer instead when ``PTOOLS_NVML_RECORDING`` names one (:mod:`ptools.core.nvml_replay`)."""
    recording = os.environ.get("PTOOLS_NVML_RECORDING")
    if recording:
        from ptools.core.nvml_replay import load_recording

        return load_recording(recording)
    try:
        import pynvml
    except ImportError:
        return None
    return pynvml


def _read_nvml(
    nvml: Any | None,
    system: SystemInfo,
    problems: list[str],
    process_describer: Callable[[int], tuple[str | None, str | None]],
) -> list[GpuDevice] | None:
    """Devices from NVML, or None (with the reason in ``problems``) when NVML cannot answer."""
    if nvml is None:
        nvml = load_nvml()
        if nvml is None:
            problems.append("nvidia-ml-py is not installed: pip install nvidia-ml-py")
            return None
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as error:
        problems.append(_nvml_init_problem(nvml, error))
        return None
    try:
        reader = _NvmlReader(nvml, process_describer)
        reader.system(system)
        devices = reader.devices()
    except nvml.NVMLError as error:
        problems.append(f"NVML failed while listing devices: {error}")
        return None
    finally:
        try:
            nvml.nvmlShutdown()
        except nvml.NVMLError:
            pass
    hidden = sum(1 for d in devices for p in d.processes if p.command is None)
    if hidden:
        problems.append(
            f"{hidden} GPU process(es) are not visible from here (another PID "
            "namespace, e.g. a container, or no permission): user and command unknown"
        )
    return devices


def _devices_from_torch(torch_info: TorchInfo, env: Mapping[str, str]) -> list[GpuDevice]:
    visible = env.get("CUDA_VISIBLE_DEVICES")
    entries = [e.strip() for e in visible.split(",")] if visible else []
    devices = []
    for index, found in enumerate(torch_info.devices):
        devices.append(
            GpuDevice(
                kind="gpu",
                nvml_index=index,
                uuid=found.get("uuid") or "unknown",
                name=found["name"],
                source="torch",
                cuda_index=index,
                visible_devices_entry=entries[index] if index < len(entries) else str(index),
                compute_capability=found.get("compute_capability"),
                memory_total_bytes=found.get("memory_total_bytes"),
            )
        )
    return devices


def filter_devices(
    devices: Sequence[GpuDevice],
    *,
    min_free_memory_bytes: int | None = None,
    max_utilization_percent: float | None = None,
    no_memory_errors: bool = False,
) -> list[GpuDevice]:
    """Addressable devices that meet the limits. A device whose value is unknown fails a limit.
    ``no_memory_errors``: leave out GPUs (and MIG instances of GPUs) with
    :attr:`GpuDevice.memory_errors`; a GPU without ECC has none to report and passes."""
    parents = {device.uuid: device for device in devices if device.kind == "gpu"}
    kept = []
    for device in devices:
        if not device.addressable:
            continue
        if no_memory_errors:
            whole = parents.get(device.parent_uuid or "", device)
            if whole.memory_errors:
                continue
        if min_free_memory_bytes is not None and (
            device.memory_free_bytes is None or device.memory_free_bytes < min_free_memory_bytes
        ):
            continue
        if max_utilization_percent is not None and (
            device.utilization_gpu_percent is None or device.utilization_gpu_percent > max_utilization_percent
        ):
            continue
        kept.append(device)
    return kept


def rank_devices(devices: Sequence[GpuDevice], order: SelectOrder = "free-memory") -> list[GpuDevice]:
    """Sort devices best first.

    ``free-memory``: most free memory, then lowest utilization, then lowest CUDA index.
    ``utilization``: lowest utilization, then most free memory, then lowest CUDA index.
    ``index``: lowest CUDA index. Unknown values rank last.
    """
    if order not in SELECT_ORDERS:
        raise BadInputError(f"unknown order {order!r}; choose one of: {', '.join(SELECT_ORDERS)}")

    def free(device: GpuDevice) -> float:
        return -device.memory_free_bytes if device.memory_free_bytes is not None else float("inf")

    def busy(device: GpuDevice) -> float:
        value = device.utilization_gpu_percent
        return value if value is not None else float("inf")

    keys = {
        "free-memory": lambda d: (free(d), busy(d), d.cuda_index),
        "utilization": lambda d: (busy(d), free(d), d.cuda_index),
        "index": lambda d: (d.cuda_index,),
    }
    return sorted(devices, key=keys[order])


def select_devices(
    report: GpuReport,
    count: int,
    *,
    min_free_memory_bytes: int | None = None,
    max_utilization_percent: float | None = None,
    order: SelectOrder = "free-memory",
    no_memory_errors: bool = False,
) -> list[GpuDevice]:
    """Pick ``count`` devices for a job, best first (see :func:`rank_devices`).

    Raises:
        BadInputError: ``count`` is below 1 or ``order`` is unknown.
        RequirementNotMetError: fewer than ``count`` devices meet the limits.
    """
    if count < 1:
        raise BadInputError(f"cannot select {count} devices; ask for 1 or more")
    eligible = filter_devices(
        report.devices,
        min_free_memory_bytes=min_free_memory_bytes,
        max_utilization_percent=max_utilization_percent,
        no_memory_errors=no_memory_errors,
    )
    ranked = rank_devices(eligible, order)
    if len(ranked) < count:
        raise RequirementNotMetError(
            _shortfall(count, len(ranked), report, min_free_memory_bytes, max_utilization_percent, no_memory_errors)
        )
    return ranked[:count]


def require_devices(
    report: GpuReport,
    count: int,
    *,
    min_free_memory_bytes: int | None = None,
    max_utilization_percent: float | None = None,
    no_memory_errors: bool = False,
) -> list[GpuDevice]:
    """Check that at least ``count`` usable devices exist; return them by CUDA index.

    Raises:
        RequirementNotMetError: fewer than ``count`` devices meet the limits.
    """
    eligible = filter_devices(
        report.devices,
        min_free_memory_bytes=min_free_memory_bytes,
        max_utilization_percent=max_utilization_percent,
        no_memory_errors=no_memory_errors,
    )
    if len(eligible) < count:
        raise RequirementNotMetError(
            _shortfall(count, len(eligible), report, min_free_memory_bytes, max_utilization_percent, no_memory_errors)
        )
    return rank_devices(eligible, "index")


def _shortfall(
    wanted: int,
    found: int,
    report: GpuReport,
    min_free: int | None,
    max_util: float | None,
    no_memory_errors: bool = False,
) -> str:
    from ptools.core.units import format_bytes

    limits = []
    if min_free is not None:
        limits.append(f"at least {format_bytes(min_free)} free")
    if max_util is not None:
        limits.append(f"utilization at most {max_util:g}%")
    if no_memory_errors:
        faulty = [f"{d.uuid}: {', '.join(d.memory_errors)}" for d in report.devices if d.memory_errors]
        limits.append("no memory errors" + (f" ({'; '.join(faulty)})" if faulty else ""))
    which = f" with {' and '.join(limits)}" if limits else ""
    noun = "GPU" if wanted == 1 else "GPUs"
    message = f"{wanted} usable {noun}{which} required, {found} found"
    if not report.devices and report.problems:
        message += f": {report.problems[0]}"
    return message


Result = TypeVar("Result")
WAIT_POLL_S = 2.0


def wait_until_met(
    attempt: Callable[[], Result],
    timeout_s: float,
    *,
    poll_s: float | None = None,
    on_wait: Callable[[str], None] | None = None,
    clock: Callable[[], float] | None = None,
    sleep: Callable[[float], None] | None = None,
) -> Result:
    """Call ``attempt`` every ``poll_s`` (default :data:`WAIT_POLL_S`) until it stops raising
    :class:`RequirementNotMetError` or ``timeout_s`` runs out. ``on_wait`` hears the reason
    the first time it fails, and whenever the reason changes.

    Raises:
        RequirementNotMetError: still not met when the time ran out (the last reason, and how
            long it waited).
    """
    import time

    clock = clock or time.monotonic
    sleep = sleep or time.sleep
    poll_s = poll_s or WAIT_POLL_S
    deadline = clock() + timeout_s
    said = None
    while True:
        try:
            return attempt()
        except RequirementNotMetError as failure:
            remaining = deadline - clock()
            if remaining <= 0:
                raise RequirementNotMetError(
                    f"{failure.message} (still, after waiting {timeout_s:g} s)", failure.hint
                ) from None
            if on_wait is not None and failure.message != said:
                on_wait(failure.message)
                said = failure.message
            sleep(min(poll_s, remaining))
