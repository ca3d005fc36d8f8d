"""``ptools gpu-info`` through CliRunner with recorded NVML answers, and as a real process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pynvml
import pytest
from typer.testing import CliRunner

from ptools.cli.app import app
from ptools.core import gpu
from tests.conftest import nvidia_gpu_count
from tests.fake_nvml import GIB, FakeNvml, hidden_processes, make_gpu, make_mig, servers

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def machine(monkeypatch: pytest.MonkeyPatch):
    """Install a recorded NVML (and a torch that must not be asked unless allowed)."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
    state = {"torch_asked": 0}

    def install(nvml: FakeNvml, *, describer=None, kernel_log: list[str] | None = None) -> dict:
        monkeypatch.setattr(gpu, "load_nvml", lambda: nvml)
        # The kernel log of the machine running the tests is not the recorded server's.
        monkeypatch.setattr(gpu, "read_kernel_log", lambda: [] if kernel_log is None else kernel_log)

        def probe() -> gpu.TorchInfo:
            state["torch_asked"] += 1
            return gpu.TorchInfo(version="2.14.1+cu130", cuda_version="13.0", cuda_available=True,
                                 device_count=len(nvml.gpus),
                                 devices=[{"uuid": g["uuid"]} for g in nvml.gpus])

        monkeypatch.setattr(gpu, "probe_torch", probe)
        if describer is not None:
            monkeypatch.setattr(gpu, "describe_process", describer)
        return state

    return install


def run(*args: str, env: dict[str, str] | None = None):
    return runner.invoke(app, ["gpu-info", *args], env=env)


def test_human_report_lists_devices_and_processes(machine) -> None:
    machine(FakeNvml([make_gpu(0, processes=[(4242, 2 * GIB)]), make_gpu(1)]),
            describer=hidden_processes)
    result = run()
    assert result.exit_code == 0, result.output
    assert "Devices (2 usable by CUDA)" in result.stdout
    assert "NVIDIA H100 80GB HBM3" in result.stdout
    assert "580.159.04" in result.stdout
    assert "4242" in result.stdout and "(not visible from here)" in result.stdout
    assert "\x1b[" not in result.stdout  # no colour off a terminal
    assert "note: 1 GPU process(es) are not visible" in result.stderr
    assert "note:" not in result.stdout


def test_json_is_the_same_data_as_the_core_report(machine) -> None:
    state = machine(servers(4))
    result = run("--json")
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert data == gpu.query_devices(env={}).to_dict()
    assert data["sources"] == {"devices": "nvml", "cuda_order": "torch", "torch": "torch"}
    assert [d["cuda_index"] for d in data["devices"]] == [0, 1, 2, 3]
    assert state["torch_asked"] == 2


@pytest.mark.parametrize("flags", [["--no-torch"], ["--require", "1"], ["--select", "1"],
                                   ["--require", "1", "--json"]])
def test_fast_paths_never_ask_torch(machine, flags: list[str]) -> None:
    state = machine(servers(2))
    result = run(*flags)
    assert result.exit_code == 0, result.output
    assert state["torch_asked"] == 0


def test_select_prints_visible_devices_value_best_first(machine) -> None:
    machine(FakeNvml([make_gpu(0, used_gib=40), make_gpu(1, used_gib=1), make_gpu(2, used_gib=20)]))
    result = run("--select", "2")
    assert (result.exit_code, result.stdout, result.stderr) == (0, "1,2\n", "")


def test_select_inside_a_restricted_environment(machine) -> None:
    machine(FakeNvml([make_gpu(i, used_gib=10 - i) for i in range(4)]))
    result = run("--select", "1", env={"CUDA_VISIBLE_DEVICES": "1,2"})
    assert result.stdout == "2\n"


def test_select_notes_a_guessed_order_on_stderr(machine) -> None:
    machine(FakeNvml([make_gpu(0, name="NVIDIA GeForce RTX 3090", cc=(8, 6), used_gib=1),
                      make_gpu(1, name="NVIDIA GeForce RTX 4090", cc=(8, 9), used_gib=2)]))
    result = run("--select", "1")
    assert result.stdout == "1\n"  # the 3090 is guessed to be cuda:1 (4090 first)
    assert "note: the GPUs differ and CUDA_DEVICE_ORDER is not PCI_BUS_ID" in result.stderr
    pci = run("--select", "1", env={"CUDA_DEVICE_ORDER": "PCI_BUS_ID"})
    assert (pci.stdout, pci.stderr) == ("0\n", "")


def test_select_json(machine) -> None:
    machine(servers(3))
    data = json.loads(run("--select", "2", "--order", "index", "--json").stdout)
    assert data["cuda_visible_devices"] == "0,1"
    assert [d["nvml_index"] for d in data["devices"]] == [0, 1]


def test_select_that_cannot_be_met_exits_3(machine) -> None:
    machine(servers(2))
    result = run("--select", "3")
    assert result.exit_code == 3
    assert result.stdout == ""
    assert result.stderr == "error: 3 usable GPUs required, 2 found\n"


def test_select_with_filters(machine) -> None:
    machine(FakeNvml([make_gpu(0, used_gib=70, util=0), make_gpu(1, used_gib=1, util=90),
                      make_gpu(2, used_gib=5, util=10)]))
    result = run("--select", "1", "--min-free-memory", "20GiB", "--max-utilization", "50")
    assert result.stdout == "2\n"


def test_require_success_prints_nothing(machine) -> None:
    machine(servers(4))
    result = run("--require", "4")
    assert (result.exit_code, result.stdout) == (0, "")


def test_require_failure(machine) -> None:
    machine(FakeNvml([], init_error=pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH))
    result = run("--require", "1")
    assert result.exit_code == 3
    assert result.stderr.startswith("error: 1 usable GPU required, 0 found: driver/library version mismatch")
    assert len(result.stderr.splitlines()) == 1


def test_no_driver_still_succeeds(machine) -> None:
    machine(FakeNvml([], init_error=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND))
    result = run("--no-torch")
    assert result.exit_code == 0
    assert "Devices (none)" in result.stdout and "no NVIDIA GPU found" in result.stdout
    assert "Memory used" not in result.stdout and "CUDA order: none" in result.stdout  # no empty 13-column table
    assert "note: no NVIDIA driver found" in result.stderr


@pytest.mark.parametrize(("flags", "message"), [
    (["--watch", "1", "--select", "1"], "error: --watch cannot be combined with --select or --require"),
])
def test_bad_values_exit_1_with_one_line(machine, flags: list[str], message: str) -> None:
    machine(servers(1))
    result = run(*flags)
    assert result.exit_code == 1
    assert result.stderr.startswith(message)
    assert len(result.stderr.splitlines()) == 1
    assert result.stdout == ""


@pytest.mark.parametrize("flags", [["--select", "0"], ["--require", "-1"], ["--max-utilization", "101"],
                                   ["--watch", "0"], ["--bogus"]])
def test_usage_errors_exit_2(machine, flags: list[str]) -> None:
    machine(servers(1))
    assert run(*flags).exit_code == 2


def test_debug_shows_traceback(machine) -> None:
    machine(servers(1))
    result = run("--watch", "1", "--select", "1", env={"PTOOLS_DEBUG": "1"})
    assert result.exit_code == 1
    assert "Traceback" in result.stderr and "error: --watch cannot be combined" in result.stderr


# ---------------------------------------------------------------- the real process, this machine


def ptools(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ptools", *args], capture_output=True, text=True,
                          timeout=120, **kwargs)


def test_real_json_report() -> None:
    result = ptools("gpu-info", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["sources"]["torch"] == "torch"
    assert data["system"]["torch_version"]
    if nvidia_gpu_count() == 0:
        assert data["devices"] == []
        assert data["problems"], "a machine without GPUs must say why"


def test_real_require_without_gpu_exits_3() -> None:
    if nvidia_gpu_count():
        pytest.skip("this machine has a GPU")
    result = ptools("gpu-info", "--require", "1")
    assert result.returncode == 3
    assert result.stdout == ""
    assert result.stderr.startswith("error: 1 usable GPU required, 0 found")


def test_real_watch_stops_cleanly_on_ctrl_c() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "ptools", "gpu-info", "--watch", "0.2", "--json", "--no-torch"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = [process.stdout.readline() for _ in range(2)]
        assert all(json.loads(line)["sources"]["torch"] == "skipped" for line in lines)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 130
    assert "Traceback" not in stderr


def test_human_watch_off_a_terminal_repeats_tables() -> None:
    process = subprocess.Popen([sys.executable, "-m", "ptools", "gpu-info", "--watch", "0.1", "--no-torch"],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    seen = ""
    try:  # read until two tables came, however slow the start (a loaded machine): no fixed sleep
        deadline = time.monotonic() + 60
        while seen.count("System") < 2 and time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            seen += line
        process.send_signal(signal.SIGINT)
        stdout, _ = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 130
    assert (seen + stdout).count("System") >= 2


@pytest.mark.cuda
def test_real_gpu_report_matches_nvidia_smi() -> None:
    result = ptools("gpu-info", "--json", "--no-torch")
    data = json.loads(result.stdout)
    smi = subprocess.run(["nvidia-smi", "--query-gpu=uuid,memory.total,name", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=True).stdout
    rows = [line.split(", ") for line in smi.strip().splitlines()]
    gpus = [d for d in data["devices"] if d["kind"] == "gpu"]
    assert [d["uuid"] for d in gpus] == [r[0] for r in rows]
    assert [d["memory_total_bytes"] // 2**20 for d in gpus] == [int(r[1]) for r in rows]
    assert [d["name"] for d in gpus] == [r[2] for r in rows]


@pytest.mark.cuda
def test_real_cuda_indices_match_torch() -> None:
    script = ("import json, torch; print(json.dumps([[torch.cuda.get_device_properties(i).name, "
              "str(torch.cuda.get_device_properties(i).uuid)] for i in range(torch.cuda.device_count())]))")
    data = json.loads(ptools("gpu-info", "--json", "--no-torch").stdout)
    first = next(d for d in data["devices"] if d["cuda_index"] == 0)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": first["uuid"]}
    seen = json.loads(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                     check=True, env=env).stdout)
    assert len(seen) == 1 and seen[0][0] == first["name"]
    assert first["uuid"].lower().endswith(seen[0][1].lower())
    selected = ptools("gpu-info", "--select", "1", "--order", "index", env=env)
    assert selected.stdout.strip() == first["uuid"]


@pytest.mark.cuda
def test_real_report_creates_no_cuda_context() -> None:
    """The full report (which imports torch) must not appear among the GPU's processes."""
    script = """
import os, sys, pynvml
from ptools.core.gpu import query_devices
def my_gpu_pids():
    pynvml.nvmlInit()
    try:
        return {p.pid for i in range(pynvml.nvmlDeviceGetCount())
                for p in pynvml.nvmlDeviceGetComputeRunningProcesses(pynvml.nvmlDeviceGetHandleByIndex(i))}
    finally:
        pynvml.nvmlShutdown()
report = query_devices(use_torch=True)
assert report.sources["torch"] == "torch" and report.system.torch_cuda_available, report
before = os.getpid() in my_gpu_pids()
import torch
torch.ones(1, device="cuda")
after = os.getpid() in my_gpu_pids()
print(before, after)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    before, after = result.stdout.split()
    if after != "True":
        pytest.skip("NVML does not show this process's PID here (PID namespace), cannot check")
    assert before == "False"


# ---------------------------------------------------------------- launching a command on the chosen GPUs

LAUNCHER = """
import sys
from ptools.core import gpu
from tests.fake_nvml import FakeNvml, make_gpu
gpu.load_nvml = lambda: FakeNvml([make_gpu(i, used_gib=float(10 * i)) for i in range(4)])
from ptools.cli.app import main
sys.argv = ["ptools", "gpu-info", *sys.argv[1:]]
main()
"""


def launch(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """ptools as a real process (its exec must replace a real process) on a recorded 4-GPU machine."""
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-c", LAUNCHER, *args], capture_output=True, text=True, timeout=120,
                          env=env, cwd=tmp_path)


def test_select_runs_the_command_on_the_chosen_gpus(tmp_path: Path) -> None:
    child = "import os, sys; print(os.environ['CUDA_VISIBLE_DEVICES']); sys.exit(5)"
    result = launch(tmp_path, "--select", "2", "--", sys.executable, "-c", child, "--lr", "1")
    assert result.returncode == 5, result.stderr  # the command's own exit code
    assert result.stdout == "0,1\n"  # stdout is the command's
    assert "CUDA_VISIBLE_DEVICES=0,1" in result.stderr


def test_unmet_request_never_starts_the_command(tmp_path: Path) -> None:
    child = "open('started', 'w').close()"
    for flags in (["--select", "5"], ["--select", "2", "--min-free-memory", "75GiB"], ["--require", "5"]):
        result = launch(tmp_path, *flags, "--", sys.executable, "-c", child)
        assert result.returncode == 3 and result.stderr.startswith("error: ")
        assert not (tmp_path / "started").exists()
    required = launch(tmp_path, "--require", "2", "--", sys.executable, "-c", child)
    assert required.returncode == 0 and (tmp_path / "started").exists()


def test_launch_errors(tmp_path: Path) -> None:
    missing = launch(tmp_path, "--select", "1", "--", "no-such-command-ptools")
    assert missing.returncode == 127 and "no-such-command-ptools: command not found" in missing.stderr
    alone = launch(tmp_path, "--", "python", "train.py")
    assert alone.returncode == 1 and "needs --select N or --require N" in alone.stderr


# --------------------------------------------------------------------------- health

XID_LOG = [
    "nvidia-nvswitch: probing",
    "NVRM: Xid (PCI:0000:28:00): 79, pid=4242, name=python, GPU has fallen off the bus.",
    "NVRM: Xid (PCI:0000:99:00): 13, pid=1, Graphics Exception on another machine's bus",
    *[f"NVRM: Xid (PCI:0000:18:00): 31, pid={i}, MMU Fault" for i in range(12)],
]


def test_health_fields_in_json(machine) -> None:
    machine(FakeNvml([
        make_gpu(0, ecc=(5, 0, 0), throttle=0x1),
        make_gpu(1, ecc=(9, 2, 7), remapped=(3, 1, 1, 0), throttle=0x8 | 0x40),
        make_gpu(2, ecc=None, remapped=None, retired=(2, 1, 1), throttle=None),
    ]), kernel_log=XID_LOG)
    devices = json.loads(run("--json", "--no-torch").stdout)["devices"]
    healthy, faulty, old = devices
    assert (healthy["ecc_mode"], healthy["ecc_errors_corrected"], healthy["ecc_errors_uncorrected"]) == (
        "enabled", 5, 0)
    assert healthy["throttle_reasons"] == ["gpu_idle"] and healthy["remapped_rows_correctable"] == 0
    assert healthy["retired_pages"] is None  # H100s remap rows instead
    assert [e["xid"] for e in healthy["xid_errors"]] == [31] * 10  # the last ten of twelve
    assert faulty["ecc_errors_uncorrected"] == 2 and faulty["ecc_errors_uncorrected_lifetime"] == 7
    assert (faulty["remapped_rows_correctable"], faulty["remapped_rows_uncorrectable"],
            faulty["remapping_pending"], faulty["remapping_failed"]) == (3, 1, True, False)
    assert faulty["throttle_reasons"] == ["hw_slowdown", "hw_thermal_slowdown"]
    assert faulty["xid_errors"] == [{"xid": 79, "message": "pid=4242, name=python, GPU has fallen off the bus."}]
    assert old["ecc_mode"] == "disabled" and old["ecc_errors_uncorrected"] is None
    assert (old["retired_pages"], old["retired_pages_pending"]) == (3, True)
    assert old["throttle_reasons"] is None and old["xid_errors"] == []


def test_xid_errors_are_unknown_when_the_kernel_log_is_unreadable(machine, monkeypatch) -> None:
    machine(FakeNvml([make_gpu(0)]))
    monkeypatch.setattr(gpu, "read_kernel_log", lambda: None)
    device = json.loads(run("--json", "--no-torch").stdout)["devices"][0]
    assert device["xid_errors"] is None


def test_health_table_for_people(machine) -> None:
    machine(FakeNvml([make_gpu(0), make_gpu(1, ecc=(9, 2, 7), remapped=(3, 1, 0, 1), throttle=0x8)]),
            kernel_log=XID_LOG)
    result = run("--no-torch", env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "Health" in result.stdout
    assert "9 corrected, 2 uncorrected (7 uncorrected ever)" in result.stdout
    assert "REMAPPING FAILED" in result.stdout and "hw slowdown" in result.stdout and "79" in result.stdout


def test_no_ecc_errors_leaves_out_faulty_gpus(machine) -> None:
    machine(FakeNvml([
        make_gpu(0, used_gib=1, ecc=(0, 3, 3)),       # uncorrected errors since the driver loaded
        make_gpu(1, used_gib=2),
        make_gpu(2, used_gib=3, remapped=(0, 1, 1, 0)),  # remapping pending a reset
        make_gpu(3, used_gib=4, ecc=None, remapped=None),  # no ECC on the board: passes
    ]))
    assert run("--select", "2").stdout.strip() == "0,1"
    assert run("--select", "2", "--no-ecc-errors").stdout.strip() == "1,3"
    refused = run("--require", "3", "--no-ecc-errors")
    assert refused.exit_code == 3
    assert "3 usable GPUs with no memory errors" in refused.stderr
    assert "GPU-00000000-1111-2222-3333-000000000000: 3 uncorrected ECC errors" in refused.stderr
    assert "row remapping pending a reset" in refused.stderr
    assert run("--require", "2", "--no-ecc-errors").exit_code == 0


def test_mig_instances_share_their_gpus_memory_errors(machine) -> None:
    machine(FakeNvml([make_gpu(0, mig=True, ecc=(0, 1, 1),
                               mig_instances=[make_mig(0, 0), make_mig(0, 1)]), make_gpu(1)]))
    assert run("--select", "3").exit_code == 0
    chosen = run("--select", "1", "--no-ecc-errors", "--json")
    assert [d["uuid"] for d in json.loads(chosen.stdout)["devices"]] == ["GPU-00000001-1111-2222-3333-000000000001"]
    assert run("--require", "2", "--no-ecc-errors").exit_code == 3


# --------------------------------------------------------------------------- --wait


class FreeingNvml(FakeNvml):
    """GPU 1 is full for the first ``busy_queries`` NVML sessions, then its job ends."""

    def __init__(self, busy_queries: int) -> None:
        super().__init__([make_gpu(0, used_gib=79), make_gpu(1, used_gib=79)])
        self.busy_queries = busy_queries

    def nvmlInit(self) -> None:
        super().nvmlInit()
        self.busy_queries -= 1
        if self.busy_queries < 0:
            self.gpus[1]["used"] = GIB


def test_wait_polls_until_a_gpu_frees_up(machine, monkeypatch) -> None:
    monkeypatch.setattr(gpu, "WAIT_POLL_S", 0.01)
    machine(FreeingNvml(busy_queries=3))
    result = run("--select", "1", "--min-free-memory", "20GiB", "--wait", "30s")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "1"
    assert result.stderr.count("waiting up to 30s: 1 usable GPU with at least 20.0 GiB free required, 0 found") == 1


def test_wait_gives_up_with_exit_3(machine, monkeypatch) -> None:
    monkeypatch.setattr(gpu, "WAIT_POLL_S", 0.01)
    machine(FreeingNvml(busy_queries=10**6))
    result = run("--require", "1", "--min-free-memory", "20GiB", "--wait", "0.1s")
    assert result.exit_code == 3
    assert "(still, after waiting 0.1 s)" in result.stderr and result.stdout == ""


@pytest.mark.parametrize(("args", "code"), [(["--wait", "10s"], 1), (["--select", "1", "--wait", "soon"], 2)])
def test_wait_refusals(machine, args: list[str], code: int) -> None:
    machine(FakeNvml([make_gpu(0)]))
    assert run(*args).exit_code == code


# --------------------------------------------------------------------------- --format prometheus


def test_prometheus_textfile_parses_with_prometheus_client(machine) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    machine(FakeNvml([
        make_gpu(0, used_gib=10, util=55, processes=[(42, GIB)]),
        make_gpu(1, ecc=(4, 1, 1), throttle=0x8 | 0x40, power=False, name='Odd "name"\\with\nescapes'),
        make_gpu(2, mig=True, mig_instances=[make_mig(2, 0)]),
    ]), kernel_log=XID_LOG)
    result = run("--format", "prometheus", "--no-torch")
    assert result.exit_code == 0, result.output
    families = {f.name: f for f in text_string_to_metric_families(result.stdout)}
    assert all(f.type == "gauge" for f in families.values())
    used = {s.labels["uuid"]: s.value for s in families["ptools_gpu_memory_used_bytes"].samples}
    assert used["GPU-00000000-1111-2222-3333-000000000000"] == 10 * GIB
    first = next(s for s in families["ptools_gpu_utilization_ratio"].samples if s.labels["nvml_index"] == "0")
    assert first.value == pytest.approx(0.55) and first.labels["cuda_index"] == "0" and first.labels["node"]
    names = {s.labels["name"] for s in families["ptools_gpu_memory_total_bytes"].samples}
    assert 'Odd "name"\\with\nescapes' in names  # escaped on the way out, intact on the way in
    power = {s.labels["nvml_index"] for s in families["ptools_gpu_power_draw_watts"].samples}
    assert "1" not in power  # NVML gave no power for GPU 1: no series, not a 0
    assert {s.labels["reason"] for s in families["ptools_gpu_clock_event_active"].samples} >= {
        "hw_slowdown", "hw_thermal_slowdown", "gpu_idle"}
    assert {s.labels["nvml_index"]: s.value for s in families["ptools_gpu_xid_errors"].samples}["1"] == 1
    assert {s.labels["nvml_index"]: s.value for s in families["ptools_gpu_ecc_errors_uncorrected"].samples}["1"] == 1
    processes = {s.labels["uuid"]: s.value for s in families["ptools_gpu_processes"].samples}
    assert processes["GPU-00000000-1111-2222-3333-000000000000"] == 1
    mig = [s for s in families["ptools_gpu_memory_total_bytes"].samples if s.labels["kind"] == "mig"]
    assert len(mig) == 1 and mig[0].labels["cuda_index"] == "2"


@pytest.mark.parametrize("args", [["--json"], ["--select", "1"], ["--watch", "1"]])
def test_prometheus_format_is_a_snapshot_only(machine, args: list[str]) -> None:
    machine(FakeNvml([make_gpu(0)]))
    result = run("--format", "prometheus", *args)
    assert result.exit_code == 1 and "one snapshot" in result.stderr


# --------------------------------------------------------------------------- --ray without a cluster


def test_ray_not_installed(machine, monkeypatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    result = run("--ray")
    assert result.exit_code == 3 and "Ray is not installed" in result.stderr and "ptools[ray]" in result.stderr


@pytest.mark.parametrize(("args", "expect"), [
    (["--ray-address", "127.0.0.1:1"], "no Ray cluster answers at 127.0.0.1:1"),
    (["--ray"], "no Ray cluster found from this machine"),
])
def test_no_ray_cluster_is_a_quick_one_line_error(args: list[str], expect: str, tmp_path: Path) -> None:
    pytest.importorskip("ray")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = str(tmp_path)  # no cluster recorded by `ray start` there
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "ptools", "gpu-info", *args], capture_output=True, text=True,
                          env=env, timeout=60)
    assert time.monotonic() - started < 30  # ray.init alone would retry for minutes
    assert done.returncode == 3 and expect in done.stderr and "--ray-address host:6379" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
