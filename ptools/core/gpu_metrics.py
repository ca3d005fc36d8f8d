"""GPU reports in the Prometheus text exposition format, as node_exporter's textfile collector
reads it: one gauge family per quantity, one series per device, labelled by node, UUID, CUDA
and NVML index, kind and name. Torch-free and numpy-free."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

PREFIX = "ptools_gpu_"

# (metric, help, the device field it reads, scale)
GAUGES = (
    ("memory_total_bytes", "Total GPU memory, in bytes.", "memory_total_bytes", 1),
    ("memory_used_bytes", "GPU memory in use, in bytes.", "memory_used_bytes", 1),
    ("memory_free_bytes", "Free GPU memory, in bytes.", "memory_free_bytes", 1),
    ("utilization_ratio", "GPU utilization over the last sample period, 0 to 1.", "utilization_gpu_percent", 0.01),
    ("memory_utilization_ratio", "Memory controller utilization, 0 to 1.", "utilization_memory_percent", 0.01),
    ("temperature_celsius", "GPU temperature, in degrees Celsius.", "temperature_c", 1),
    ("power_draw_watts", "Power draw, in watts.", "power_draw_watts", 1),
    ("power_limit_watts", "Enforced power limit, in watts.", "power_limit_watts", 1),
    ("ecc_errors_corrected", "Corrected ECC errors since the driver loaded.", "ecc_errors_corrected", 1),
    ("ecc_errors_uncorrected", "Uncorrected ECC errors since the driver loaded.", "ecc_errors_uncorrected", 1),
    ("retired_pages", "Retired memory pages (before Ampere).", "retired_pages", 1),
    (
        "remapped_rows_uncorrectable",
        "Rows remapped for uncorrectable errors (Ampere and later).",
        "remapped_rows_uncorrectable",
        1,
    ),
)


def _escape(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(node: str, device: dict[str, Any], **extra: Any) -> str:
    labels = {
        "node": node,
        "uuid": device["uuid"],
        "cuda_index": "" if device["cuda_index"] is None else device["cuda_index"],
        "nvml_index": device["nvml_index"],
        "kind": device["kind"],
        "name": device["name"],
        **extra,
    }
    return "{" + ",".join(f'{key}="{_escape(value)}"' for key, value in labels.items()) + "}"


def _number(value: float) -> str:
    return repr(float(value)) if isinstance(value, float) and not value.is_integer() else str(int(value))


def to_prometheus(nodes: Iterable[tuple[str, list[dict[str, Any]]]]) -> str:
    """The text exposition of ``(node name, device dicts)`` pairs. A value NVML did not give is
    left out (no series), never written as 0."""
    nodes = list(nodes)
    lines: list[str] = []

    def family(name: str, help_text: str, series: list[str]) -> None:
        lines.append(f"# HELP {PREFIX}{name} {help_text}")
        lines.append(f"# TYPE {PREFIX}{name} gauge")
        lines.extend(series)

    for metric, help_text, key, scale in GAUGES:
        series = [
            f"{PREFIX}{metric}{_labels(node, d)} {_number(d[key] * scale if scale != 1 else d[key])}"
            for node, devices in nodes
            for d in devices
            if d.get(key) is not None
        ]
        family(metric, help_text, series)
    family(
        "processes",
        "Compute processes running on the device.",
        [f"{PREFIX}processes{_labels(node, d)} {len(d['processes'])}" for node, devices in nodes for d in devices],
    )
    family(
        "xid_errors",
        "XID errors the driver logged for the device (in the kernel's ring buffer).",
        [
            f"{PREFIX}xid_errors{_labels(node, d)} {len(d['xid_errors'])}"
            for node, devices in nodes
            for d in devices
            if d.get("xid_errors") is not None
        ],
    )
    family(
        "clock_event_active",
        "1 while a clock-event (throttle) reason is active.",
        [
            f"{PREFIX}clock_event_active{_labels(node, d, reason=reason)} 1"
            for node, devices in nodes
            for d in devices
            for reason in d.get("throttle_reasons") or []
        ],
    )
    family(
        "devices",
        "Devices reported for the node.",
        [f'{PREFIX}devices{{node="{_escape(node)}"}} {len(devices)}' for node, devices in nodes],
    )
    return "\n".join(lines) + "\n"
