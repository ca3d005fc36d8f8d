"""ptools.core.gpu against recorded NVML answers: 0/1/4/8 GPUs, MIG, mixed GPUs,
hidden processes, missing library, driver mismatch, CUDA_VISIBLE_DEVICES mapping, policy."""

from __future__ import annotations

import os
import sys

import pynvml
import pytest

from ptools.core import gpu
from ptools.errors import BadInputError, RequirementNotMetError
from tests.fake_nvml import (
    GIB,
    FakeNvml,
    hidden_processes,
    make_gpu,
    make_mig,
    servers,
    visible_processes,
)


def query(nvml: FakeNvml, env: dict[str, str] | None = None, **kwargs) -> gpu.GpuReport:
    kwargs.setdefault("use_torch", False)
    kwargs.setdefault("process_describer", visible_processes)
    return gpu.query_devices(nvml=nvml, env=env or {}, **kwargs)


def cuda_map(report: gpu.GpuReport) -> dict[int, int | None]:
    """nvml index -> cuda index, for whole GPUs."""
    return {d.nvml_index: d.cuda_index for d in report.devices if d.kind == "gpu"}


def torch_info(devices: list[dict] | None = None, **kwargs) -> gpu.TorchInfo:
    devices = devices or []
    return gpu.TorchInfo(version="2.14.1+cu130", cuda_version="13.0", cudnn_version="9.1.0",
                         nccl_version="2.27.3", cuda_available=bool(devices),
                         device_count=len(devices), devices=devices, **kwargs)


# ---------------------------------------------------------------- what NVML cannot do


@pytest.mark.parametrize(("code", "words"), [
    (pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, "no NVIDIA driver found"),
    (pynvml.NVML_ERROR_DRIVER_NOT_LOADED, "kernel driver is not loaded"),
    (pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH, "driver/library version mismatch"),
    (pynvml.NVML_ERROR_NO_PERMISSION, "no permission"),
    (pynvml.NVML_ERROR_UNKNOWN, "NVML could not start"),
])
def test_nvml_failures_are_reported_not_raised(code: int, words: str) -> None:
    report = query(FakeNvml([], init_error=code))
    assert report.devices == []
    assert report.sources["devices"] == "none"
    assert words in report.problems[0]


def test_missing_nvidia_ml_py_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` fail
    report = gpu.query_devices(use_torch=False, env={})
    assert report.devices == []
    assert "nvidia-ml-py is not installed" in report.problems[0]


def test_nvml_is_shut_down_after_reading() -> None:
    nvml = servers(2)
    query(nvml)
    assert nvml.initialised == 0


# ---------------------------------------------------------------- reading devices


@pytest.mark.parametrize("count", [0, 1, 4, 8])
def test_identical_gpus_are_numbered_in_pci_order(count: int) -> None:
    report = query(servers(count))
    assert [d.nvml_index for d in report.devices] == list(range(count))
    assert cuda_map(report) == {i: i for i in range(count)}
    assert [d.visible_devices_entry for d in report.devices] == [str(i) for i in range(count)]
    # No GPU, no order: "CUDA order: pci" beside FASTEST_FIRST on a GPU-less machine misled.
    assert report.sources == {"devices": "nvml", "cuda_order": "pci" if count else "none", "torch": "skipped"}
    assert report.problems == []


def test_device_fields_are_converted_to_plain_units() -> None:
    report = query(servers(2))
    device = report.devices[1]
    assert device.name == "NVIDIA H100 80GB HBM3"
    assert device.uuid.startswith("GPU-")
    assert device.pci_bus_id == "00000000:28:00.0"
    assert device.compute_capability == "9.0"
    assert device.memory_total_bytes == 80 * GIB
    assert device.memory_used_bytes == 1 * GIB
    assert device.memory_free_bytes == 79 * GIB
    assert device.utilization_gpu_percent == 10
    assert device.temperature_c == 31
    assert device.power_draw_watts == pytest.approx(71.0)
    assert device.power_limit_watts == pytest.approx(700.0)
    assert device.mig_mode == "disabled"
    assert device.source == "nvml"


def test_system_versions() -> None:
    report = query(FakeNvml([], driver="550.54.15", cuda=12040))
    assert report.system.driver_version == "550.54.15"
    assert report.system.cuda_driver_version == "12.4"


def test_unsupported_fields_are_none_not_errors() -> None:
    report = query(FakeNvml([make_gpu(0, power=False, mig=None)]))
    device = report.devices[0]
    assert device.power_draw_watts is None and device.power_limit_watts is None
    assert device.mig_mode == "unsupported"
    assert device.cuda_index == 0


def test_processes_with_user_and_command() -> None:
    nvml = FakeNvml([make_gpu(0, processes=[(4242, 3 * GIB), (4343, None)])])
    device = query(nvml).devices[0]
    assert [(p.pid, p.used_memory_bytes) for p in device.processes] == [(4242, 3 * GIB), (4343, None)]
    assert device.processes[0].user == "alice"
    assert "train.py" in device.processes[0].command


def test_hidden_processes_are_listed_and_explained() -> None:
    nvml = FakeNvml([make_gpu(0, processes=[(1, GIB), (2, GIB)])])
    report = query(nvml, process_describer=hidden_processes)
    assert [p.pid for p in report.devices[0].processes] == [1, 2]
    assert all(p.user is None and p.command is None for p in report.devices[0].processes)
    assert any("2 GPU process(es) are not visible" in p for p in report.problems)


def test_describe_process_reads_proc_for_this_process() -> None:
    user, command = gpu.describe_process(os.getpid())
    if not os.path.isdir("/proc"):
        pytest.skip("no /proc on this OS")
    assert user
    assert "python" in command or "pytest" in command


def test_describe_process_of_a_missing_pid() -> None:
    assert gpu.describe_process(2**22 + 12345) == (None, None)


# ---------------------------------------------------------------- MIG


def mig_server() -> FakeNvml:
    """GPU 0 in MIG mode with instances in slots 0 and 2 (slot 1 empty); GPU 1 a whole A100."""
    return FakeNvml([
        make_gpu(0, name="NVIDIA A100-SXM4-80GB", cc=(8, 0), mig=True,
                 mig_instances=[make_mig(0, 0, used_gib=10, processes=[(7, 9 * GIB)]), None,
                                make_mig(0, 2)]),
        make_gpu(1, name="NVIDIA A100-SXM4-80GB", cc=(8, 0)),
    ])


def test_mig_instances_replace_their_gpu_in_cuda_numbering() -> None:
    report = query(mig_server())
    kinds = [(d.kind, d.nvml_index, d.mig_index, d.cuda_index) for d in report.devices]
    assert kinds == [("gpu", 0, None, None), ("mig", 0, 0, 0), ("mig", 0, 2, 1), ("gpu", 1, None, 2)]
    assert report.devices[0].mig_mode == "enabled"
    mig = report.devices[1]
    assert mig.parent_uuid == report.devices[0].uuid
    assert mig.memory_total_bytes == 40 * GIB
    assert mig.utilization_gpu_percent is None
    assert [p.pid for p in mig.processes] == [7]


def test_cuda_visible_devices_by_mig_uuid() -> None:
    nvml = mig_server()
    target = nvml.gpus[0]["mig_instances"][2]["uuid"]
    report = query(nvml, env={"CUDA_VISIBLE_DEVICES": target})
    chosen = [d for d in report.devices if d.addressable]
    assert [(d.uuid, d.cuda_index, d.visible_devices_entry) for d in chosen] == [(target, 0, target)]


# ---------------------------------------------------------------- CUDA_VISIBLE_DEVICES


def test_visible_devices_by_index_reorders() -> None:
    report = query(servers(4), env={"CUDA_VISIBLE_DEVICES": "2,0"})
    assert cuda_map(report) == {0: 1, 1: None, 2: 0, 3: None}
    assert report.devices[2].visible_devices_entry == "2"


def test_visible_devices_by_uuid_and_unique_prefix() -> None:
    nvml = servers(4)
    full = nvml.gpus[3]["uuid"]
    prefix = nvml.gpus[1]["uuid"][:12]  # "GPU-00000001" is unique
    report = query(nvml, env={"CUDA_VISIBLE_DEVICES": f"{full},{prefix}"})
    assert cuda_map(report) == {0: None, 1: 1, 2: None, 3: 0}
    assert report.devices[1].visible_devices_entry == prefix


def test_visible_devices_stop_at_ambiguous_prefix() -> None:
    report = query(servers(4), env={"CUDA_VISIBLE_DEVICES": "1,GPU-0000"})
    assert cuda_map(report) == {0: None, 1: 0, 2: None, 3: None}
    assert any("'GPU-0000' names no device" in p for p in report.problems)


@pytest.mark.parametrize(("value", "expected"), [
    ("1,9,2", {0: None, 1: 0, 2: None, 3: None}),  # out of range stops the list
    ("1,x,2", {0: None, 1: 0, 2: None, 3: None}),
    ("0,0,1", {0: 0, 1: None, 2: None, 3: None}),  # a repeat stops the list
    (" 3 , 1 ", {0: None, 1: 1, 2: None, 3: 0}),
    ("-1", {0: None, 1: None, 2: None, 3: None}),
    ("", {0: None, 1: None, 2: None, 3: None}),
])
def test_visible_devices_follow_cuda_rules(value: str, expected: dict[int, int | None]) -> None:
    report = query(servers(4), env={"CUDA_VISIBLE_DEVICES": value})
    assert cuda_map(report) == expected
    if not any(v is not None for v in expected.values()):
        assert any("no GPU is visible" in p for p in report.problems)


# ---------------------------------------------------------------- mixed GPUs, torch


def mixed_server() -> FakeNvml:
    return FakeNvml([make_gpu(0, name="NVIDIA GeForce RTX 3090", cc=(8, 6), total_gib=24),
                     make_gpu(1, name="NVIDIA GeForce RTX 4090", cc=(8, 9), total_gib=24)])


def test_mixed_gpus_without_pci_order_are_a_stated_guess() -> None:
    report = query(mixed_server())
    assert report.sources["cuda_order"] == "guess"
    assert cuda_map(report) == {0: 1, 1: 0}  # newer architecture first
    assert any("CUDA_DEVICE_ORDER=PCI_BUS_ID" in p for p in report.problems)


def test_mixed_gpus_with_pci_order() -> None:
    report = query(mixed_server(), env={"CUDA_DEVICE_ORDER": "PCI_BUS_ID"})
    assert report.sources["cuda_order"] == "pci"
    assert cuda_map(report) == {0: 0, 1: 1}
    assert report.problems == []


def test_torch_gives_the_order_when_asked() -> None:
    nvml = mixed_server()
    # torch enumerates the 3090 first (what CUDA decided), without the GPU- prefix.
    uuids = [nvml.gpus[0]["uuid"][4:], nvml.gpus[1]["uuid"][4:]]
    info = torch_info([{"name": "x", "uuid": u} for u in uuids])
    report = query(nvml, use_torch=True, torch_probe=lambda: info)
    assert report.sources["cuda_order"] == "torch"
    assert cuda_map(report) == {0: 0, 1: 1}
    assert report.system.torch_version == "2.14.1+cu130"
    assert report.system.torch_device_count == 2


def test_torch_order_keeps_visible_devices_entries() -> None:
    nvml = servers(4)
    info = torch_info([{"name": "x", "uuid": nvml.gpus[i]["uuid"]} for i in (3, 1)])
    report = query(nvml, env={"CUDA_VISIBLE_DEVICES": "3,1"}, use_torch=True, torch_probe=lambda: info)
    assert cuda_map(report) == {0: None, 1: 1, 2: None, 3: 0}
    assert report.devices[3].visible_devices_entry == "3"


def test_devices_come_from_torch_when_nvml_is_missing() -> None:
    info = torch_info([{"name": "NVIDIA H100", "uuid": "abc", "compute_capability": "9.0",
                        "memory_total_bytes": 80 * GIB}])
    report = query(FakeNvml([], init_error=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND),
                   use_torch=True, torch_probe=lambda: info)
    assert report.sources["devices"] == "torch"
    (device,) = report.devices
    assert (device.cuda_index, device.source, device.memory_total_bytes) == (0, "torch", 80 * GIB)
    assert device.memory_free_bytes is None  # would need a CUDA context
    assert any("device details from torch" in p for p in report.problems)


def test_cpu_only_torch_build_is_explained() -> None:
    info = gpu.TorchInfo(version="2.14.1+cpu")
    report = query(servers(1), use_torch=True, torch_probe=lambda: info)
    assert any("CPU-only build" in p for p in report.problems)


def test_torch_that_sees_no_gpu_is_explained() -> None:
    report = query(servers(2), use_torch=True, torch_probe=lambda: torch_info([]))
    assert any("sees no GPU although NVML lists 2" in p for p in report.problems)


def test_torch_not_installed() -> None:
    report = query(servers(1), use_torch=True, torch_probe=lambda: None)
    assert report.sources["torch"] == "not-installed"
    assert "torch is not installed" in report.problems


@pytest.mark.parametrize(("code", "text"), [(90100, "9.1.0"), (91000, "9.10.0"), (8902, "8.9.2"),
                                            (None, None)])
def test_format_cudnn_version(code: int | None, text: str | None) -> None:
    assert gpu.format_cudnn_version(code) == text


# ---------------------------------------------------------------- select / require policy


def policy_server() -> FakeNvml:
    """Free memory: 0→70, 1→79, 2→79, 3→40 GiB; utilization: 0→0, 1→50, 2→20, 3→0 %."""
    return FakeNvml([make_gpu(0, used_gib=10, util=0), make_gpu(1, used_gib=1, util=50),
                     make_gpu(2, used_gib=1, util=20), make_gpu(3, used_gib=40, util=0)])


@pytest.mark.parametrize(("order", "expected"), [
    ("free-memory", [2, 1, 0, 3]),  # 1 and 2 tie on memory: less busy first
    ("utilization", [0, 3, 2, 1]),  # 0 and 3 tie on utilization: more free first
    ("index", [0, 1, 2, 3]),
])
def test_rank_orders(order: str, expected: list[int]) -> None:
    report = query(policy_server())
    assert [d.cuda_index for d in gpu.rank_devices(report.devices, order)] == expected


def test_rank_ties_break_on_lowest_index() -> None:
    report = query(FakeNvml([make_gpu(i) for i in range(3)]))
    assert [d.cuda_index for d in gpu.rank_devices(report.devices)] == [0, 1, 2]


def test_select_with_limits() -> None:
    report = query(policy_server())
    chosen = gpu.select_devices(report, 2, min_free_memory_bytes=60 * GIB, max_utilization_percent=30)
    assert [d.cuda_index for d in chosen] == [2, 0]


def test_select_shortfall_raises_requirement_error() -> None:
    report = query(policy_server())
    with pytest.raises(RequirementNotMetError) as failure:
        gpu.select_devices(report, 3, min_free_memory_bytes=75 * GIB)
    assert failure.value.exit_code == 3
    assert "3 usable GPUs with at least 75.0 GiB free required, 2 found" in str(failure.value)


def test_unknown_values_fail_limits() -> None:
    report = query(mig_server())  # MIG instances report no utilization
    eligible = gpu.filter_devices(report.devices, max_utilization_percent=100)
    assert [d.kind for d in eligible] == ["gpu"]


def test_select_skips_hidden_devices_and_prints_parent_entries() -> None:
    report = query(policy_server(), env={"CUDA_VISIBLE_DEVICES": "3,2"})
    chosen = gpu.select_devices(report, 1)
    # GPU 2 is cuda:1 inside this environment; CUDA_VISIBLE_DEVICES must still say "2".
    assert (chosen[0].nvml_index, chosen[0].cuda_index, chosen[0].visible_devices_entry) == (2, 1, "2")
    report = query(policy_server(), env={"CUDA_VISIBLE_DEVICES": "0,3"})
    chosen = gpu.select_devices(report, 2)
    # cuda indices are 0 and 1 inside this environment; CUDA_VISIBLE_DEVICES needs 0 and 3.
    assert [d.visible_devices_entry for d in chosen] == ["0", "3"]


def test_select_rejects_bad_arguments() -> None:
    report = query(servers(1))
    with pytest.raises(BadInputError):
        gpu.select_devices(report, 0)
    with pytest.raises(BadInputError, match="choose one of: free-memory, utilization, index"):
        gpu.select_devices(report, 1, order="fastest")


def test_require() -> None:
    report = query(servers(4))
    assert [d.cuda_index for d in gpu.require_devices(report, 4)] == [0, 1, 2, 3]
    with pytest.raises(RequirementNotMetError, match="5 usable GPUs required, 4 found"):
        gpu.require_devices(report, 5)


def test_require_without_driver_says_why() -> None:
    report = query(FakeNvml([], init_error=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND))
    with pytest.raises(RequirementNotMetError, match="1 usable GPU required, 0 found: no NVIDIA"):
        gpu.require_devices(report, 1)


def test_report_to_dict_is_json_ready() -> None:
    import json

    data = query(mig_server(), process_describer=hidden_processes).to_dict()
    assert json.loads(json.dumps(data)) == data
    assert set(data) == {"system", "devices", "sources", "problems"}
    assert data["devices"][1]["processes"][0] == {"pid": 7, "used_memory_bytes": 9 * GIB,
                                                  "user": None, "command": None}


def test_kernel_log_unreadable_is_none(tmp_path) -> None:
    from ptools.core.gpu import read_kernel_log

    assert read_kernel_log(str(tmp_path / "no-such-kmsg")) is None


def test_xid_lines_match_by_pci_address_whatever_the_domain_width() -> None:
    from ptools.core.gpu import GpuDevice, attach_xid_errors

    gpu = GpuDevice(kind="gpu", nvml_index=0, uuid="GPU-a", name="x", source="nvml", pci_bus_id="00000000:3B:00.0")
    attach_xid_errors([gpu], ["NVRM: Xid (PCI:0000:3b:00): 48, pid=7, DBE (double bit error)",
                              "NVRM: Xid (PCI:3b:00.0): 63, ECC page retirement",
                              "NVRM: Xid (PCI:0000:3c:00): 48, another GPU"])
    assert [e["xid"] for e in gpu.xid_errors] == [48, 63]
    attach_xid_errors([gpu], None)  # unreadable: what was known stays
    assert len(gpu.xid_errors) == 2


def test_wait_until_met_retries_until_the_request_can_be_met() -> None:
    from ptools.core.gpu import wait_until_met
    from ptools.errors import RequirementNotMetError

    now = [0.0]
    heard: list[str] = []
    answers = iter(["busy", "busy", "still busy", None])

    def attempt() -> str:
        reason = next(answers)
        if reason:
            raise RequirementNotMetError(reason)
        return "chosen"

    def sleep(seconds: float) -> None:
        now[0] += seconds

    assert wait_until_met(attempt, 60, poll_s=2, on_wait=heard.append, clock=lambda: now[0], sleep=sleep) == "chosen"
    assert heard == ["busy", "still busy"] and now[0] == 6


def test_wait_until_met_gives_up_with_the_last_reason() -> None:
    from ptools.core.gpu import wait_until_met
    from ptools.errors import RequirementNotMetError

    now = [0.0]

    def attempt() -> None:
        raise RequirementNotMetError(f"2 usable GPUs required, 1 found at t={now[0]:g}")

    def sleep(seconds: float) -> None:
        now[0] += seconds

    with pytest.raises(RequirementNotMetError, match=r"1 found at t=5 \(still, after waiting 5 s\)"):
        wait_until_met(attempt, 5, poll_s=2, clock=lambda: now[0], sleep=sleep)
