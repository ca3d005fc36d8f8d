"""``PTOOLS_NVML_RECORDING``: a recording that lies (missing fields, wrong types, sizes that
cannot be, a delay without end, not JSON, deep nesting) is refused in one line, exit 1,
instead of failing deep inside a query."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fake_nvml import make_gpu, make_mig


def good() -> dict:
    return {"gpus": [make_gpu(0, mig=True, mig_instances=[make_mig(0, 0), None]), make_gpu(1)]}


def lie(change) -> dict:
    data = json.loads(json.dumps(good()))
    change(data)
    return data


CASES = {
    "not json": b"\x00\xff{",
    "deep nesting": b"[" * 100_000,
    "no gpus": json.dumps({"gpu": []}).encode(),
    "gpus not a list": json.dumps({"gpus": {"0": {}}}).encode(),
    "missing field": json.dumps(lie(lambda d: d["gpus"][1].pop("uuid"))).encode(),
    "wrong type": json.dumps(lie(lambda d: d["gpus"][1].update(total="80GB"))).encode(),
    "used above total": json.dumps(lie(lambda d: d["gpus"][1].update(used=2**70))).encode(),
    "bad process": json.dumps(lie(lambda d: d["gpus"][1].update(processes=[["1", 2]]))).encode(),
    "short ecc": json.dumps(lie(lambda d: d["gpus"][1].update(ecc=[1]))).encode(),
    "bad mig instance": json.dumps(lie(lambda d: d["gpus"][0]["mig_instances"].__setitem__(1, {"name": 1}))).encode(),
    "endless delay": json.dumps({**good(), "delay_s": 1e9}).encode(),
    "negative delay": json.dumps({**good(), "delay_s": -1}).encode(),
    "bad init error": json.dumps({**good(), "init_error": "boom"}).encode(),
    # Magnitudes: a few hundred bytes that asked for gigabytes or overflowed a float.
    "a billion retired pages": json.dumps(lie(lambda d: d["gpus"][1].update(retired=[10**9, 0, 0]))).encode(),
    "watts past a float": json.dumps(lie(lambda d: d["gpus"][1].update(power_mw=10**400))).encode(),
    "limit past a float": json.dumps(lie(lambda d: d["gpus"][1].update(limit_mw=10**400))).encode(),
    "total past a petabyte": json.dumps(lie(lambda d: d["gpus"][1].update(total=10**30, used=0))).encode(),
    "negative ecc": json.dumps(lie(lambda d: d["gpus"][1].update(ecc=[-1, 0, 0]))).encode(),
    "process bytes past a float": json.dumps(lie(lambda d: d["gpus"][1].update(processes=[[1, 10**400]]))).encode(),
    "utilisation 1e6": json.dumps(lie(lambda d: d["gpus"][1].update(util=10**6))).encode(),
    "temperature 1e30": json.dumps(lie(lambda d: d["gpus"][1].update(temp=10**30))).encode(),
    "compute capability 1e30": json.dumps(lie(lambda d: d["gpus"][1].update(cc=[10**30, 0]))).encode(),
}


def gpu_info(recording: Path) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "PTOOLS_NVML_RECORDING": str(recording)}
    return subprocess.run([sys.executable, "-m", "ptools", "gpu-info", "--no-torch", "--json"], capture_output=True,
                          text=True, env=env, timeout=60)


@pytest.mark.parametrize("name", list(CASES))
def test_a_lying_recording_is_one_line_error(name: str, tmp_path: Path) -> None:
    recording = tmp_path / "answer.json"
    recording.write_bytes(CASES[name])
    done = gpu_info(recording)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "not a readable NVML recording" in lines[0] and len(lines[0]) < 600, lines


def test_the_good_recording_replays(tmp_path: Path) -> None:
    recording = tmp_path / "answer.json"
    recording.write_text(json.dumps(good()))
    done = gpu_info(recording)
    assert done.returncode == 0, done.stderr
    assert len(json.loads(done.stdout)["devices"]) == 3  # two GPUs and one MIG instance
