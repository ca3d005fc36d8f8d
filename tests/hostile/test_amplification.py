"""Small files that claim a lot, opened for real: the memory a command takes follows what the
file holds, not what it claims (a peak-RSS bound in a subprocess, never a timing)."""

from __future__ import annotations

from pathlib import Path

from tests.hostile.corpus import Call, G, state_zip, storage, tensor, zero_run
from tests.hostile.harness import TORCH_FREE_LIMIT, run_ptools


def test_averaging_an_expanded_tensor_runs_in_bounded_chunks(tmp_path: Path) -> None:
    """One allowed stride-0 tensor (2^27 float32 elements from 1 stored) took 3.7 GB to
    average (several whole float64 copies); now a chunk at a time, under a 3 GiB address space."""
    import numpy as np
    from safetensors.numpy import load_file

    source = state_zip(tmp_path / "one.pt", {"w": tensor(storage("0", 1), (2**27,), (0,))},
                       storages={"0": np.float32(0.25).tobytes()})
    out = tmp_path / "out"
    out.mkdir()
    run = run_ptools(["convert-ckpt", str(source), str(source), "--average", "-o", str(out / "a.safetensors")],
                     TORCH_FREE_LIMIT)
    assert run.returncode == 0, run.stderr[-2000:]
    averaged = load_file(out / "a.safetensors")["w"]
    assert averaged.shape == (2**27,) and bool((averaged == 0.25).all())


def test_a_zero3_listing_holds_parameters_not_ranks_times_parameters(tmp_path: Path) -> None:
    """1,000 ranks × 3,000 parameters are 3M byte runs: a listing held them all (380 MB peak);
    now it holds one deferred description per parameter."""
    ranks, parameters = 1000, 3000
    run_folder = zero_run(tmp_path, stage=3, shapes={f"p{i}": (ranks,) for i in range(parameters)},
                          partitions=[parameters] * ranks, partition_count=ranks, ranks=(0,))
    step = run_folder / "global_step1"
    optimizer = (step / "zero_pp_rank_0_mp_rank_00_optim_states.pt").read_bytes()
    small = {"module": Call(G("collections", "OrderedDict"), []), "param_shapes": []}
    for rank in range(1, ranks):
        state_zip(step / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt", small, storages={})
        (step / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(optimizer)
    run = run_ptools(["inspect-state-dict", str(run_folder), "--json"], TORCH_FREE_LIMIT)
    assert run.returncode == 0, run.stderr[-2000:]
    assert '"p2999"' in run.stdout
    assert run.peak_rss_bytes < 160 << 20, f"{run.peak_rss_bytes / 2**20:.0f} MiB"


def _shared_deflated_record(folder: Path) -> Path:
    """30,000 tensors over one deflated 100 MB record (1.2 MB compressed, within the ratio bound)."""
    import os

    raw = (os.urandom(1000) + b"\0" * 99000) * 1024
    pid = storage("0", len(raw) // 4)
    entries = {f"t{i}": tensor(pid, (100,), (1,), i * 850) for i in range(30000)}
    return state_zip(folder / "m.pt", entries, storages={"0": raw}, compress={"archive/data/0"})


def test_a_deflated_record_is_inflated_once_per_command(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """Each tensor inflated the shared record from its start (minutes; killed at 120 s); now it
    is inflated once, and what a command inflates in all is bounded (PTOOLS_MAX_INFLATED_BYTES)."""
    source = _shared_deflated_record(tmp_path)
    run = run_ptools(["inspect-state-dict", str(source), "--stats", "--json"], TORCH_FREE_LIMIT)
    assert not run.timed_out and run.returncode == 0, run.stderr[-2000:]
    assert '"t29999"' in run.stdout
    monkeypatch.setenv("PTOOLS_MAX_INFLATED_BYTES", "50MB")
    refused = run_ptools(["inspect-state-dict", str(source), "--stats"], TORCH_FREE_LIMIT)
    assert refused.returncode == 1 and "PTOOLS_MAX_INFLATED_BYTES" in refused.stderr, refused.stderr[-2000:]
