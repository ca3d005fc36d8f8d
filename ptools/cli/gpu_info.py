"""``ptools gpu-info``: what a person or a script wants to know before launching a job."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Annotated, Any

import typer

from ptools.cli import output
from ptools.cli.help_format import command_help
from ptools.cli.options import JsonOption, RayAddressOption, usage_check
from ptools.core import gpu
from ptools.core.choices import GpuFormat, SelectOrder
from ptools.core.units import format_bytes, parse_duration, parse_size
from ptools.errors import BadInputError

NAME = "gpu-info"
SHORT_HELP = "Show GPUs, memory, utilization, processes and CUDA/torch versions; pick free GPUs."
DETAILS = "Asks NVML first (no CUDA context is created); torch is imported once, only for its own build and only in the full report. --select, --require and --no-torch never import it."
EXAMPLES = [
    "ptools gpu-info",
    "ptools gpu-info --json | jq '.devices[].memory_free_bytes'",
    "ptools gpu-info --select 2 --min-free-memory 20GiB -- python train.py",
    "GPUS=$(ptools gpu-info --select 2) && CUDA_VISIBLE_DEVICES=$GPUS python train.py",
    "ptools gpu-info --require 4 && torchrun --nproc-per-node 4 train.py",
    "ptools gpu-info --watch 2",
]
HELP = command_help(SHORT_HELP, DETAILS, EXAMPLES)


def command(
    launch: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="[-- COMMAND...]",
            show_default=False,
            help="With --select: run COMMAND with CUDA_VISIBLE_DEVICES set to the chosen GPUs (it replaces "
            "ptools, keeping its exit code); with --require: run it only if the GPUs exist. Exit 3 "
            "without running it when the request cannot be met.",
        ),
    ] = None,
    json_output: JsonOption = False,
    no_torch: Annotated[
        bool, typer.Option("--no-torch", help="Do not import torch: NVML only (fast; no torch/cuDNN/NCCL versions).")
    ] = False,
    require: Annotated[
        int | None,
        typer.Option(
            "--require",
            min=1,
            metavar="N",
            help="Exit 3 unless at least N usable GPUs (within the limits below) exist. "
            "Prints nothing on success unless --json.",
        ),
    ] = None,
    select: Annotated[
        int | None,
        typer.Option(
            "--select",
            min=1,
            metavar="N",
            help="Print the CUDA_VISIBLE_DEVICES value naming the N best GPUs, best first "
            "(it becomes cuda:0); exit 3 if fewer qualify.",
        ),
    ] = None,
    min_free_memory: Annotated[
        str | None,
        typer.Option(
            "--min-free-memory",
            metavar="SIZE",
            callback=usage_check(parse_size),
            help="Only GPUs with at least this much free memory, e.g. 20GiB, 8GB, 512MiB.",
        ),
    ] = None,
    max_utilization: Annotated[
        float | None,
        typer.Option(
            "--max-utilization",
            min=0,
            max=100,
            metavar="PCT",
            help="Only GPUs whose utilization is at most PCT percent.",
        ),
    ] = None,
    no_ecc_errors: Annotated[
        bool,
        typer.Option(
            "--no-ecc-errors",
            help="Only GPUs without uncorrected ECC errors since the driver loaded, pages waiting to be "
            "retired, or pending/failed row remapping (a GPU without ECC passes).",
        ),
    ] = False,
    order: Annotated[
        SelectOrder,
        typer.Option(
            "--order",
            help="Ranking for --select: free-memory (most free, then least busy, then lowest "
            "index), utilization (least busy, then most free, then lowest index) or index.",
        ),
    ] = "free-memory",
    ray: Annotated[
        bool,
        typer.Option(
            "--ray",
            help="Every node of the Ray cluster this machine belongs to (or RAY_ADDRESS): one task per node "
            "asks NVML there. --select picks N GPUs on one node and prints its IP and CUDA_VISIBLE_DEVICES; "
            "--require counts GPUs cluster-wide. Needs pip install 'ptools[ray]'.",
        ),
    ] = False,
    ray_address: RayAddressOption = None,
    output_format: Annotated[
        GpuFormat,
        typer.Option(
            "--format",
            help="prometheus: the Prometheus text format, for node_exporter's textfile collector "
            "(gauges per device, labelled by node, uuid and CUDA index).",
        ),
    ] = "table",
    wait: Annotated[
        str | None,
        typer.Option(
            "--wait",
            metavar="DURATION",
            callback=usage_check(parse_duration),
            help="With --select/--require: poll every 2 s until the request can be met, up to DURATION "
            "(90s, 10m, 2h); then exit 3 with the reason.",
        ),
    ] = None,
    watch: Annotated[
        float | None,
        typer.Option(
            "--watch",
            min=0.1,
            metavar="SECONDS",
            help="Refresh every SECONDS until Ctrl-C (with --json: one JSON object per line).",
        ),
    ] = None,
) -> None:
    min_free = parse_size(min_free_memory) if min_free_memory is not None else None
    limits: dict[str, Any] = {
        "min_free_memory_bytes": min_free,
        "max_utilization_percent": max_utilization,
        "no_memory_errors": no_ecc_errors,
    }
    gating = select is not None or require is not None
    if watch is not None and gating:
        raise BadInputError("--watch cannot be combined with --select or --require")
    if launch and not gating:
        raise BadInputError(
            f"a command to run ({' '.join(launch)[:60]}) needs --select N or --require N",
            "e.g. ptools gpu-info --select 2 -- python train.py",
        )
    if launch and json_output:
        raise BadInputError("--json prints on stdout, which belongs to the command; drop --json")

    if output_format == "prometheus" and (json_output or gating or watch is not None):
        raise BadInputError(
            "--format prometheus prints one snapshot of every device: it does not combine with --json, "
            "--select, --require or --watch"
        )
    if wait is not None and not gating:
        raise BadInputError("--wait needs --select N or --require N (what to wait for)")
    if ray or ray_address is not None:
        if launch:
            raise BadInputError(
                "--ray picks GPUs on another machine: a command given here would run here",
                "start it there, e.g. with the printed IP and CUDA_VISIBLE_DEVICES",
            )
        if watch is not None:
            raise BadInputError("--watch does not combine with --ray; run it on the node itself")
        _cluster(ray_address, select, require, order, limits, wait, output_format, json_output)
        return
    if watch is not None:
        _watch(watch, use_torch=not no_torch, json_output=json_output)
        return

    report = gpu.query_devices(use_torch=not (no_torch or gating))
    asked = [report]  # the first attempt uses the report above; each retry (--wait) asks NVML again

    def attempt() -> Any:
        nonlocal report
        report = asked.pop() if asked else gpu.query_devices(use_torch=False)
        if select is not None:
            return gpu.select_devices(report, select, order=order, **limits)
        return gpu.require_devices(report, require or 0, **limits)

    if select is not None:
        chosen = _patiently(attempt, wait)
        value = ",".join(d.visible_devices_entry or str(d.cuda_index) for d in chosen)
        for problem in report.problems:  # e.g. a guessed CUDA order: worth seeing before a launch
            output.info(f"note: {problem}")
        if launch:
            _run(launch, {"CUDA_VISIBLE_DEVICES": value})
        output.emit(
            {"cuda_visible_devices": value, "devices": [d.to_dict() for d in chosen]},
            json_output,
            lambda data: [data["cuda_visible_devices"]],
        )
        return
    if require is not None:
        _patiently(attempt, wait)
        if launch:
            _run(launch, {})
        output.emit(report.to_dict(), json_output, lambda data: [])  # success is silent for people
        return

    data = report.to_dict()
    if output_format == "prometheus":
        import socket

        from ptools.core.gpu_metrics import to_prometheus

        sys.stdout.write(to_prometheus([(socket.gethostname(), data["devices"])]))
        for problem in data["problems"]:
            output.info(f"note: {problem}")
        return
    output.emit(data, json_output, render)
    if not json_output:
        for problem in data["problems"]:
            output.info(f"note: {problem}")


def _cluster(
    address: str | None,
    select: int | None,
    require: int | None,
    order: SelectOrder,
    limits: dict[str, Any],
    wait: str | None,
    output_format: str,
    json_output: bool,
) -> None:
    """``--ray``: the same questions, asked of every node of a Ray cluster."""
    from ptools.core import cluster

    def attempt() -> Any:
        report = cluster.query_cluster(address)
        if select is not None:
            return cluster.select_on_one_node(report, select, order=order, **limits)
        if require is not None:
            cluster.require_across_cluster(report, require, **limits)
        return report

    result = _patiently(attempt, wait)
    if select is not None:
        output.emit(result.to_dict(), json_output, lambda data: [f"{data['ip']} {data['cuda_visible_devices']}"])
        return
    data = result.to_dict()
    if require is not None:
        output.emit(data, json_output, lambda data: [])  # success is silent for people
        return
    if output_format == "prometheus":
        from ptools.core.gpu_metrics import to_prometheus

        sys.stdout.write(
            to_prometheus([(f"{n['hostname'] or n['ip']}/{n['node'][:8]}", n["devices"]) for n in data["nodes"]])
        )
        return
    output.emit(data, json_output, render_cluster)
    if not json_output:
        for node in data["nodes"]:
            for problem in node["problems"]:
                output.info(f"note: {node['hostname'] or node['ip']} {node['node'][:8]}: {problem}")


def _patiently(attempt: Callable[[], Any], wait: str | None) -> Any:
    """``attempt()`` once; with ``--wait``, again every poll (saying why once) until it can be
    met or the time runs out (exit 3 with the last reason)."""
    if wait is None:
        return attempt()
    return gpu.wait_until_met(
        attempt, parse_duration(wait), on_wait=lambda reason: output.info(f"waiting up to {wait}: {reason}")
    )


def render_cluster(data: dict[str, Any]) -> list[Any]:
    """Rich renderables for a cluster report: every node, then every device with its node."""
    nodes = data["nodes"]
    node_rows = [
        (
            f"{n['hostname'] or '?'} {n['node'][:8]}",
            n["ip"],
            n["state"],
            len(n["devices"]),
            (n["system"] or {}).get("driver_version"),
            "; ".join(n["problems"]) or "-",
        )
        for n in nodes
    ]
    device_rows = []
    for n in nodes:
        for d in n["devices"]:
            used, total = d["memory_used_bytes"], d["memory_total_bytes"]
            device_rows.append(
                (
                    f"{n['hostname'] or n['ip']} {n['node'][:8]}",
                    d["cuda_index"],
                    d["name"] if d["kind"] == "gpu" else f"└ MIG {d['mig_index']}: {d['name']}",
                    f"{format_bytes(used)} / {format_bytes(total)}" if total is not None else None,
                    format_bytes(d["memory_free_bytes"]),
                    _percent(d["utilization_gpu_percent"]),
                    f"{d['temperature_c']} °C" if d["temperature_c"] is not None else None,
                    len(d["processes"]),
                    ", ".join(d["memory_errors"]) or None,
                    d["uuid"],
                )
            )
    return [
        output.make_table(
            f"Nodes ({sum(n['state'] == 'alive' for n in nodes)} of {len(nodes)} answered)",
            ["Node", "IP", "State", ("GPUs", "right"), "Driver", "Problems"],
            node_rows,
        ),
        output.make_table(
            f"Devices ({len(device_rows)})",
            [
                "Node",
                ("CUDA", "right"),
                "Name",
                ("Memory used / total", "right"),
                ("Free", "right"),
                ("Util", "right"),
                ("Temp", "right"),
                ("Procs", "right"),
                "Memory errors",
                "UUID",
            ],
            device_rows,
            optional=("UUID", "Memory errors", "Temp"),
        ),
    ]


def _run(launch: list[str], environment: dict[str, str]) -> None:
    """Replace this process with ``launch`` (``exec``), its environment updated: signals, the
    exit code and the terminal go straight to the command."""
    import os

    for name, value in environment.items():
        output.info(f"{name}={value}")
        os.environ[name] = value
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execvp(launch[0], launch)  # searches PATH itself; returns only on failure
    except (FileNotFoundError, PermissionError, NotADirectoryError):
        output.error(f"{launch[0]}: command not found")
        raise typer.Exit(127) from None


def _watch(interval: float, *, use_torch: bool, json_output: bool) -> None:
    """Refresh until Ctrl-C; torch (if used) is asked once, NVML on every refresh."""
    # torch's answers do not change while we watch: ask once, replay them on every refresh.
    torch_info = gpu.probe_torch() if use_torch else None
    first = gpu.query_devices(use_torch=use_torch, torch_probe=lambda: torch_info)

    def refresh() -> dict[str, Any]:
        return gpu.query_devices(use_torch=use_torch, torch_probe=lambda: torch_info).to_dict()

    data = first.to_dict()
    if json_output or not sys.stdout.isatty():
        while True:
            if json_output:
                output.print_ndjson([data])
            else:
                console = output.stdout_console()
                for renderable in render(data):
                    console.print(renderable)
            time.sleep(interval)
            data = refresh()
    from rich.console import Group
    from rich.live import Live
    from rich.text import Text

    def view(data: dict[str, Any]) -> Group:
        # A live screen has no separate stderr lines, so the notes go under the tables.
        notes = Text("\n".join(f"note: {p}" for p in data["problems"]), style="dim")
        return Group(*render(data), notes)

    with Live(view(data), console=output.stdout_console(), auto_refresh=False) as live:
        while True:
            time.sleep(interval)
            live.update(view(refresh()), refresh=True)


def _percent(value: float | None) -> str | None:
    return None if value is None else f"{value:g}%"


def render(data: dict[str, Any]) -> list[Any]:
    """Rich renderables for a report dict (the same data ``--json`` prints)."""
    system = data["system"]
    sources = data["sources"]
    torch_line = system["torch_version"]
    if torch_line is not None:
        build = (
            f"CUDA {system['torch_cuda_version']}"
            if system["torch_cuda_version"]
            else (f"ROCm/HIP {system['torch_hip_version']}" if system["torch_hip_version"] else "CPU-only")
        )
        torch_line = f"{torch_line} ({build})"
    else:
        torch_line = "not asked (--no-torch)" if sources["torch"] == "skipped" else "not installed"
    rows = [
        ("NVIDIA driver", system["driver_version"] or "not found"),
        ("CUDA driver API", system["cuda_driver_version"]),
        ("torch", torch_line),
    ]
    if sources["torch"] == "torch":
        rows += [
            ("cuDNN", system["torch_cudnn_version"]),
            ("NCCL", system["torch_nccl_version"]),
            ("torch sees CUDA", f"{system['torch_cuda_available']} ({system['torch_device_count']} device(s))"),
            ("MPS (Apple)", system["mps_available"]),
        ]
    rows += [
        (
            "CUDA_VISIBLE_DEVICES",
            system["cuda_visible_devices"] if system["cuda_visible_devices"] is not None else "(unset)",
        ),
        ("CUDA_DEVICE_ORDER", system["cuda_device_order"]),
        ("sources", f"devices: {sources['devices']}, CUDA order: {sources['cuda_order']}, torch: {sources['torch']}"),
    ]
    renderables: list[Any] = [output.make_table("System", ["", "value"], rows)]

    devices = data["devices"]
    device_rows = []
    for d in devices:
        used, total = d["memory_used_bytes"], d["memory_total_bytes"]
        memory = f"{format_bytes(used)} / {format_bytes(total)}" if total is not None else None
        power = None
        if d["power_draw_watts"] is not None:
            limit = f" / {d['power_limit_watts']:.0f} W" if d["power_limit_watts"] else " W"
            power = f"{d['power_draw_watts']:.0f}{limit}"
        name = d["name"] if d["kind"] == "gpu" else f"  └ MIG {d['mig_index']}: {d['name']}"
        device_rows.append(
            (
                d["cuda_index"],
                d["nvml_index"],
                name,
                d["compute_capability"],
                memory,
                format_bytes(d["memory_free_bytes"]),
                _percent(d["utilization_gpu_percent"]),
                f"{d['temperature_c']} °C" if d["temperature_c"] is not None else None,
                power,
                d["mig_mode"] if d["kind"] == "gpu" else "instance",
                len(d["processes"]),
                d["uuid"],
                d["pci_bus_id"],
            )
        )
    if not devices:  # one plain row instead of thirteen empty columns; the notes say why
        renderables.append(output.make_table("Devices (none)", ["device"], [("no NVIDIA GPU found",)]))
    else:
        renderables.append(_device_table(devices, device_rows))

    health_rows = [_health_row(d) for d in devices if d["kind"] == "gpu"]
    if any(row[2:] != ("-", "-", "-", "-") for row in health_rows):
        renderables.append(
            output.make_table(
                "Health",
                [("CUDA", "right"), ("NVML", "right"), "ECC errors", "Retired / remapped", "Clock events", "XID"],
                health_rows,
            )
        )

    process_rows = [
        (
            d["cuda_index"],
            d["nvml_index"],
            p["pid"],
            p["user"] or "?",
            format_bytes(p["used_memory_bytes"]),
            p["command"] or "(not visible from here)",
        )
        for d in devices
        for p in d["processes"]
    ]
    if process_rows:
        renderables.append(
            output.make_table(
                "Compute processes",
                [("CUDA", "right"), ("NVML", "right"), ("PID", "right"), "User", ("GPU memory", "right"), "Command"],
                process_rows,
            )
        )
    return renderables


def _health_row(d: dict[str, Any]) -> tuple[Any, ...]:
    """ECC, retired pages or remapped rows, clock events and XID errors of one GPU ("-": NVML or
    the kernel log did not say)."""
    ecc = "-"
    if d["ecc_mode"] == "disabled":
        ecc = "ECC off"
    elif d["ecc_errors_uncorrected"] is not None:
        ecc = f"{d['ecc_errors_corrected'] or 0} corrected, {d['ecc_errors_uncorrected']} uncorrected"
        if d["ecc_errors_uncorrected_lifetime"]:
            ecc += f" ({d['ecc_errors_uncorrected_lifetime']} uncorrected ever)"
    memory = "-"
    if d["remapped_rows_correctable"] is not None:
        memory = f"{d['remapped_rows_correctable'] + d['remapped_rows_uncorrectable']} rows remapped"
        memory += "; pending reset" if d["remapping_pending"] else ""
        memory += "; REMAPPING FAILED" if d["remapping_failed"] else ""
    elif d["retired_pages"] is not None:
        memory = f"{d['retired_pages']} pages retired" + ("; pending reset" if d["retired_pages_pending"] else "")
    events = "-"
    if d["throttle_reasons"] is not None:
        events = ", ".join(r.replace("_", " ") for r in d["throttle_reasons"]) or "none"
    xid = "-"
    if d["xid_errors"] is not None:
        xid = "none" if not d["xid_errors"] else ", ".join(str(e["xid"]) for e in d["xid_errors"])
    return (d["cuda_index"], d["nvml_index"], ecc, memory, events, xid)


def _device_table(devices: list[dict[str, Any]], device_rows: list[Any]) -> Any:
    return output.make_table(
        f"Devices ({sum(d['cuda_index'] is not None for d in devices)} usable by CUDA)",
        [
            ("CUDA", "right"),
            ("NVML", "right"),
            "Name",
            "CC",
            ("Memory used / total", "right"),
            ("Free", "right"),
            ("Util", "right"),
            ("Temp", "right"),
            ("Power", "right"),
            "MIG",
            ("Procs", "right"),
            "UUID",
            "PCI bus",
        ],
        device_rows,
        optional=("PCI bus", "UUID", "NVML", "MIG", "CC", "Power", "Temp"),
    )
