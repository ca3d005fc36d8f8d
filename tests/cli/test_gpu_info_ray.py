"""``gpu-info --ray`` on real local Ray clusters (``ray.cluster_utils.Cluster``: several raylets on
this machine), each node answering NVML from its own recording (PTOOLS_NVML_RECORDING in the
node's environment): 2 nodes x 4 GPUs, a node without GPUs, a dead node, a node that dies
mid-query."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ptools.cli.app import app
from tests.fake_nvml import GIB, make_gpu

ray = pytest.importorskip("ray")
cluster_utils = pytest.importorskip("ray.cluster_utils")

pytestmark = pytest.mark.ray
runner = CliRunner()
DRIVER_NOT_LOADED = 9  # NVML_ERROR_DRIVER_NOT_LOADED


def record(folder: Path, name: str, gpus: list[dict], **extra) -> str:
    path = folder / f"{name}.json"
    path.write_text(json.dumps({"gpus": gpus, **extra}))
    return str(path)


def node(path: str) -> dict:
    return {"num_cpus": 1, "env_vars": {"PTOOLS_NVML_RECORDING": path}}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    """Head: 4 idle GPUs; a second node: 4 busier GPUs, one with uncorrected ECC errors; a third
    node without a GPU driver."""
    folder = tmp_path_factory.mktemp("nvml")
    head = record(folder, "head", [make_gpu(i, used_gib=i) for i in range(4)])
    busy = record(folder, "busy", [make_gpu(i, used_gib=40 + i, util=50, ecc=(0, 2 if i == 3 else 0, 2))
                                   for i in range(4)])
    bare = record(folder, "bare", [], init_error=DRIVER_NOT_LOADED)
    local = cluster_utils.Cluster(initialize_head=True, head_node_args=node(head))
    nodes = [local.head_node, local.add_node(**node(busy)), local.add_node(**node(bare))]
    ray.init(address=local.address, log_to_driver=False)
    ids = {"head": nodes[0].node_id, "busy": nodes[1].node_id, "bare": nodes[2].node_id}
    yield local, ids, folder
    ray.shutdown()
    local.shutdown()


def invoke(*args: str):
    return runner.invoke(app, ["gpu-info", "--ray", *args])


def by_node(data: dict, ids: dict) -> dict:
    names = {value: key for key, value in ids.items()}
    return {names.get(n["node"], n["node"]): n for n in data["nodes"]}


def test_every_node_is_listed_with_its_gpus(cluster) -> None:
    _, ids, _ = cluster
    result = invoke("--json")
    assert result.exit_code == 0, result.output
    nodes = by_node(json.loads(result.stdout), ids)
    assert set(nodes) == {"head", "busy", "bare"}
    assert [d["memory_used_bytes"] for d in nodes["head"]["devices"]] == [0, GIB, 2 * GIB, 3 * GIB]
    assert [d["utilization_gpu_percent"] for d in nodes["busy"]["devices"]] == [50] * 4
    assert all(n["state"] == "alive" and n["ip"] and n["hostname"] for n in nodes.values())
    assert nodes["bare"]["devices"] == [] and "driver is not loaded" in nodes["bare"]["problems"][0]
    assert nodes["head"]["system"]["driver_version"] == "580.159.04"


def test_human_report_has_a_node_column(cluster) -> None:
    result = runner.invoke(app, ["gpu-info", "--ray"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "Nodes (3 of 3 answered)" in result.stdout and "Devices (8)" in result.stdout
    assert "2 uncorrected ECC errors" in result.stdout
    assert "driver is not loaded" in result.stderr


def test_select_picks_gpus_on_one_node(cluster) -> None:
    _, ids, _ = cluster
    data = json.loads(invoke("--select", "2", "--json").stdout)
    assert data["node"] == ids["head"] and data["cuda_visible_devices"] == "0,1"  # most free memory
    line = invoke("--select", "2").stdout.strip()
    assert line == f"{data['ip']} 0,1"
    idle = json.loads(invoke("--select", "3", "--order", "utilization", "--json").stdout)
    assert idle["node"] == ids["head"]  # 0 % against 50 %
    assert invoke("--select", "4", "--min-free-memory", "77GiB").stdout.split()[1] == "0,1,2,3"
    refused = invoke("--select", "4", "--min-free-memory", "78GiB")
    assert refused.exit_code == 3 and "3 found" in refused.stderr
    five = invoke("--select", "5")
    assert five.exit_code == 3 and "no node has 5 usable GPUs" in five.stderr


def test_require_counts_across_the_cluster(cluster) -> None:
    assert invoke("--require", "8").exit_code == 0
    nine = invoke("--require", "9")
    assert nine.exit_code == 3
    assert "9 usable GPUs required across the cluster, 8 found" in nine.stderr
    healthy = invoke("--require", "8", "--no-ecc-errors")
    assert healthy.exit_code == 3 and "7 found" in healthy.stderr


def test_prometheus_labels_each_node(cluster) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    result = invoke("--format", "prometheus")
    assert result.exit_code == 0, result.output
    families = {f.name: f for f in text_string_to_metric_families(result.stdout)}
    nodes = {s.labels["node"] for s in families["ptools_gpu_memory_used_bytes"].samples}
    assert len(nodes) == 2  # the node without GPUs has no device series
    counts = sorted(s.value for s in families["ptools_gpu_devices"].samples)
    assert counts == [0, 4, 4]


def test_launching_a_command_with_ray_is_refused(cluster) -> None:
    result = invoke("--select", "1", "--", "python", "train.py")
    assert result.exit_code == 1 and "would run here" in result.stderr


def test_dead_and_dying_nodes_are_listed_with_the_reason(cluster) -> None:
    local, ids, folder = cluster
    from ptools.core.cluster import query_cluster

    gone = local.add_node(**node(record(folder, "gone", [make_gpu(0)])))
    local.remove_node(gone)
    slow = local.add_node(**node(record(folder, "slow", [make_gpu(0)], delay_s=60)))
    killer = threading.Timer(3.0, local.remove_node, args=(slow,))
    killer.start()
    started = time.monotonic()
    report = query_cluster(timeout_s=30).to_dict()
    killer.join()
    assert time.monotonic() - started < 25  # the dying node's failure arrives, no timeout waited out
    nodes = by_node(report, {**ids, "gone": gone.node_id, "slow": slow.node_id})
    assert nodes["gone"]["state"] == "dead" and "dead" in nodes["gone"]["problems"][0]
    assert nodes["slow"]["state"] == "failed" and nodes["slow"]["problems"] == ["the node died during the query"]
    assert nodes["head"]["state"] == "alive" and len(nodes["head"]["devices"]) == 4


def test_a_node_that_does_not_answer_in_time(cluster) -> None:
    local, ids, folder = cluster
    from ptools.core.cluster import query_cluster

    hanging = local.add_node(**node(record(folder, "hanging", [make_gpu(0)], delay_s=30)))
    try:
        report = query_cluster(timeout_s=3).to_dict()
    finally:
        local.remove_node(hanging)
    nodes = by_node(report, {**ids, "hanging": hanging.node_id})
    assert nodes["hanging"]["state"] == "unreachable"
    assert nodes["hanging"]["problems"] == ["no answer within 3 s"]
    assert nodes["busy"]["state"] == "alive"


@pytest.mark.cuda
def test_real_nvml_through_ray_matches_the_local_query(tmp_path: Path) -> None:
    """Where a GPU exists: a one-node local cluster asked with the real NVML gives the same
    devices as asking here (uuids and totals; live figures like utilization may move)."""
    import subprocess
    import sys

    local = json.loads(subprocess.run([sys.executable, "-m", "ptools", "gpu-info", "--no-torch", "--json"],
                                      capture_output=True, text=True, check=True).stdout)
    single = cluster_utils.Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        env = {**os.environ, "RAY_ADDRESS": single.address}
        env.pop("PTOOLS_NVML_RECORDING", None)
        done = subprocess.run([sys.executable, "-m", "ptools", "gpu-info", "--ray", "--json"], capture_output=True,
                              text=True, env=env, check=True)
    finally:
        single.shutdown()
    (remote,) = json.loads(done.stdout)["nodes"]
    assert [(d["uuid"], d["memory_total_bytes"]) for d in remote["devices"]] == [
        (d["uuid"], d["memory_total_bytes"]) for d in local["devices"]]
