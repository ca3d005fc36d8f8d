"""GPU inventory across a Ray cluster: one lightweight task per alive node, pinned to that
node, asking NVML there (no CUDA context, no GPU or CPU slot taken), gathered into one report.

Ray is an optional extra (``pip install 'ptools[ray]'``); nothing here imports it until asked.
A node that is dead, does not answer in time, or fails is listed with the reason, never dropped.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from ptools.core.choices import SelectOrder
from ptools.core.gpu import GpuDevice, GpuReport, SystemInfo, filter_devices, rank_devices, select_devices
from ptools.errors import BadInputError, RequirementNotMetError

QUERY_TIMEOUT_S = 30.0
NO_CLUSTER_HINT = "start one (ray start, on its head node) or give its address (`ray_address='host:6379'`)"


@dataclass
class NodeReport:
    """One node of the cluster. ``state``: ``alive`` (it answered), ``dead`` (Ray lists it as
    dead), ``unreachable`` (no answer in time), ``failed`` (the query task failed there, e.g.
    the node died during the query)."""

    node: str
    hostname: str | None
    ip: str | None
    state: str
    report: GpuReport | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def devices(self) -> list[GpuDevice]:
        return self.report.devices if self.report is not None else []

    def to_dict(self) -> dict[str, Any]:
        data = self.report.to_dict() if self.report is not None else {"system": None, "devices": [], "sources": None}
        return {
            "node": self.node,
            "hostname": self.hostname,
            "ip": self.ip,
            "state": self.state,
            "system": data["system"],
            "devices": data["devices"],
            "problems": [*self.problems, *(self.report.problems if self.report is not None else [])],
        }


@dataclass
class ClusterReport:
    nodes: list[NodeReport]

    def to_dict(self) -> dict[str, Any]:
        return {"nodes": [node.to_dict() for node in self.nodes]}


def _ask_this_node() -> dict[str, Any]:
    """Runs on a Ray worker: this node's devices, as plain data."""
    import ray

    from ptools.core.gpu import query_devices

    report = query_devices(use_torch=False)
    return {"hostname": socket.gethostname(), "ip": ray.util.get_node_ip_address(), "report": report.to_dict()}


def _report_from_dict(data: dict[str, Any]) -> GpuReport:
    from ptools.core.gpu import GpuProcess

    devices = []
    for raw in data["devices"]:
        fields = dict(raw)
        fields.pop("memory_errors", None)  # derived, not a field
        fields["processes"] = [GpuProcess(**p) for p in fields.get("processes", [])]
        devices.append(GpuDevice(**fields))
    return GpuReport(
        system=SystemInfo(**data["system"]), devices=devices, sources=data["sources"], problems=data["problems"]
    )


def connect(ray_address: str | None) -> Any:
    """The ``ray`` module, connected to the cluster at ``ray_address`` (``auto``/None: the one
    this machine belongs to, or ``RAY_ADDRESS``); an existing connection is reused.

    Raises:
        RequirementNotMetError: Ray is not installed, or no cluster answers at ``address``.
    """
    try:
        import ray
    except ImportError:
        raise RequirementNotMetError("Ray is not installed", "pip install 'ptools[ray]', or leave out `ray`") from None
    if ray.is_initialized():
        return ray
    target = _reachable_address(ray_address)
    try:
        ray.init(
            address=target,
            log_to_driver=False,
            logging_level=logging.ERROR,
            configure_logging=False,
            include_dashboard=False,
        )
    except (ConnectionError, RuntimeError, ValueError) as failure:
        raise RequirementNotMetError(
            f"no Ray cluster at {target}: {str(failure).splitlines()[0][:200]}",
            NO_CLUSTER_HINT,
        ) from None
    return ray


PROBE_TIMEOUT_S = 3.0


def _reachable_address(address: str | None) -> str:
    """The cluster's address, checked to accept a connection: ``ray.init`` keeps retrying an
    address nobody listens on for minutes, so a dead cluster would hang the command.

    ``auto`` (or None) is ``RAY_ADDRESS``, else the cluster ``ray start`` recorded on this
    machine. A Ray Client address (``ray://``) is passed on as it is.

    Raises:
        RequirementNotMetError: no address known, or nothing listens there.
    """
    hint = NO_CLUSTER_HINT
    if address in (None, "auto"):
        address = os.environ.get("RAY_ADDRESS") or None
        if address is None:
            recorded = os.path.join(os.environ.get("RAY_TMPDIR", "/tmp"), "ray", "ray_current_cluster")
            try:
                with open(recorded, encoding="utf-8") as handle:
                    address = handle.read().strip() or None
            except OSError:
                address = None
        if address is None:
            raise RequirementNotMetError("no Ray cluster found from this machine (no RAY_ADDRESS, no ray start)", hint)
    if address.startswith("ray://"):
        return address
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=PROBE_TIMEOUT_S):
            pass
    except (OSError, ValueError):
        raise RequirementNotMetError(f"no Ray cluster answers at {address}", hint) from None
    return address


def query_cluster(
    ray_address: str | None = None,
    *,
    timeout_s: float = QUERY_TIMEOUT_S,
    ask: Callable[[], dict[str, Any]] | None = None,
) -> ClusterReport:
    """Every node of the Ray cluster at ``ray_address`` with its GPUs, by node IP.

    Raises:
        RequirementNotMetError: no Ray, or no cluster (see :func:`connect`).
    """
    ray = connect(ray_address)
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # num_cpus=0: an inventory must not wait behind (or block) the jobs that fill the nodes.
    task = ray.remote(num_cpus=0, max_retries=0)(ask or _ask_this_node)
    nodes: list[NodeReport] = []
    pending: dict[Any, NodeReport] = {}
    for info in ray.nodes():
        node = NodeReport(
            node=info["NodeID"],
            hostname=info.get("NodeManagerHostname"),
            ip=info.get("NodeManagerAddress"),
            state="alive" if info.get("Alive") else "dead",
        )
        nodes.append(node)
        if node.state == "dead":
            node.problems.append(f"Ray lists the node as dead ({info.get('DeathReasonMessage') or 'no reason given'})")
            continue
        strategy = NodeAffinitySchedulingStrategy(node_id=node.node, soft=False)
        pending[task.options(scheduling_strategy=strategy).remote()] = node
    ready, late = ray.wait(list(pending), num_returns=len(pending), timeout=timeout_s) if pending else ([], [])
    for ref in ready:
        node = pending[ref]
        try:
            answer = ray.get(ref)
        except ray.exceptions.NodeDiedError:
            node.state = "failed"
            node.problems.append("the node died during the query")
            continue
        except Exception as failure:  # a task that failed there: a crashed worker, a broken install
            node.state = "failed"
            node.problems.append(f"the query failed on the node: {type(failure).__name__}: {_first_line(failure)}")
            continue
        node.hostname = answer["hostname"]
        node.ip = answer["ip"]
        node.report = _report_from_dict(answer["report"])
    for ref in late:
        node = pending[ref]
        node.state = "unreachable"
        node.problems.append(f"no answer within {timeout_s:g} s")
        ray.cancel(ref, force=True)
    nodes.sort(key=lambda n: (n.ip or "", n.node))
    return ClusterReport(nodes)


def _first_line(failure: BaseException) -> str:
    text = str(failure).strip()
    lines = [line for line in text.splitlines() if line.strip()]
    return (lines[-1] if lines else type(failure).__name__)[:200]


@dataclass
class NodeSelection:
    """``count`` devices on one node: where to launch and what to export."""

    node: str
    hostname: str | None
    ip: str | None
    cuda_visible_devices: str
    devices: list[GpuDevice]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["devices"] = [device.to_dict() for device in self.devices]
        return data


def select_on_one_node(
    cluster: ClusterReport,
    count: int,
    *,
    order: SelectOrder = "free-memory",
    **limits: Any,
) -> NodeSelection:
    """Pick ``count`` devices on one node, with :func:`ptools.core.gpu.select_devices`' policy
    on each node. The node that wins: with ``free-memory``, the most free memory summed over its
    chosen devices; ``utilization``, the lowest summed utilization; ``index``, the first by IP.
    Ties go to the node first by IP.

    Raises:
        BadInputError: ``count`` below 1.
        RequirementNotMetError: no node has ``count`` usable devices (each node's reason said).
    """
    if count < 1:
        raise BadInputError(f"cannot select {count} devices; ask for 1 or more")
    candidates: list[tuple[Any, NodeSelection]] = []
    reasons = []
    for position, node in enumerate(cluster.nodes):
        if node.report is None:
            reasons.append(f"{_name(node)}: {node.state}")
            continue
        try:
            chosen = select_devices(node.report, count, order=order, **limits)
        except RequirementNotMetError as failure:
            reasons.append(f"{_name(node)}: {failure.message}")
            continue
        if order == "free-memory":
            key: Any = (-sum(d.memory_free_bytes or 0 for d in chosen), position)
        elif order == "utilization":
            key = (sum(d.utilization_gpu_percent or 0 for d in chosen), position)
        else:
            key = (position,)
        entries = ",".join(d.visible_devices_entry or str(d.cuda_index) for d in chosen)
        candidates.append((key, NodeSelection(node.node, node.hostname, node.ip, entries, chosen)))
    if not candidates:
        noun = "GPU" if count == 1 else "GPUs"
        raise RequirementNotMetError(f"no node has {count} usable {noun} ({'; '.join(reasons) or 'no nodes'})")
    return min(candidates, key=lambda candidate: candidate[0])[1]


def require_across_cluster(cluster: ClusterReport, count: int, **limits: Any) -> dict[str, list[GpuDevice]]:
    """At least ``count`` usable devices across the cluster; return them by node id.

    Raises:
        RequirementNotMetError: fewer (each node's count, and why a node has none, said).
    """
    found = {node.node: rank_devices(filter_devices(node.devices, **limits), "index") for node in cluster.nodes}
    total = sum(len(devices) for devices in found.values())
    if total < count:
        parts = []
        for node in cluster.nodes:
            detail = f"{len(found[node.node])}" + (f" ({node.state})" if node.state != "alive" else "")
            parts.append(f"{_name(node)}: {detail}")
        noun = "GPU" if count == 1 else "GPUs"
        raise RequirementNotMetError(
            f"{count} usable {noun} required across the cluster, {total} found ({'; '.join(parts)})"
        )
    return found


def _name(node: NodeReport) -> str:
    """A node as people know it: host (or IP), and the start of Ray's node id, since several
    nodes may share a host."""
    return f"{node.hostname or node.ip or 'node'} {node.node[:8]}"
