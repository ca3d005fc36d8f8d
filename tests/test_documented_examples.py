"""Every command line the documentation shows - each line of a ```bash block in README and each
example in a command's --help - runs in a real shell and exits 0, on stand-in files made here.

A documented path that breaks fails this test, so it cannot break silently. The GPU server is a
recorded one (8 idle H100s, through the fake NVML every gpu-info test uses); `python train.py`,
`torchrun` and (where missing) `jq` are small stand-ins that check what they are given.
"""

from __future__ import annotations

import collections
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ptools.cli.app import app
from ptools.cli.help_format import examples_in
from tests.checkpoint_fixtures import retag_devices, save_safetensors, save_zip

ROOT = Path(__file__).resolve().parents[1]

MODELS_PY = '''
import torch


class Net(torch.nn.Module):
    def __init__(self, width=16):
        super().__init__()
        self.backbone = torch.nn.Sequential(torch.nn.Conv2d(3, width, 3), torch.nn.BatchNorm2d(width),
                                            torch.nn.ReLU())
        self.head = torch.nn.Linear(width, 10)

    def forward(self, x):
        return self.head(self.backbone(x).mean((2, 3)))


class LazyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(torch.nn.LazyConv2d(8, 3), torch.nn.ReLU())
        self.head = torch.nn.LazyLinear(10)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


class Tagger(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(30000, 32)
        self.out = torch.nn.Linear(32, 5)

    def forward(self, ids, mask=None):
        hidden = self.embed(ids)
        if mask is not None:
            hidden = hidden * mask.unsqueeze(-1)
        return self.out(hidden)
'''

TRAIN_PY = """
import os, sys
visible = os.environ.get("CUDA_VISIBLE_DEVICES")
assert visible and all(part.isdigit() for part in visible.split(",")), visible
print("train.py on", visible)
"""

PTOOLS = f"""#!{sys.executable}
import sys
sys.path.insert(0, {str(ROOT)!r})
from ptools.core import gpu
from tests.fake_nvml import FakeNvml, make_gpu
gpu.load_nvml = lambda: FakeNvml([make_gpu(i) for i in range(8)])
from ptools.cli.app import main
sys.argv[0] = "ptools"
main()
"""

TORCHRUN = f"""#!{sys.executable}
import sys
assert "--nproc-per-node" in sys.argv, sys.argv
print("torchrun", *sys.argv[1:])
"""

JQ = f"""#!{sys.executable}
import json, sys
text = sys.stdin.read()
try:
    json.loads(text)
except ValueError:
    [json.loads(line) for line in text.splitlines() if line.strip()]
"""


def _script(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


def _tiny_net_state(width: int = 16) -> collections.OrderedDict[str, torch.Tensor]:
    torch.manual_seed(0)
    net = torch.nn.Sequential(collections.OrderedDict(
        backbone=torch.nn.Sequential(torch.nn.Conv2d(3, width, 3), torch.nn.BatchNorm2d(width), torch.nn.ReLU()),
        head=torch.nn.Linear(width, 10)))
    return net.state_dict()


def make_stand_ins(folder: Path) -> dict[str, str]:
    """The files and commands the documented examples name; returns the environment."""
    shutil.copytree(ROOT / "examples", folder / "examples")
    (folder / "models.py").write_text(MODELS_PY)
    (folder / "inputs.json").write_text(
        json.dumps({"args": [{"shape": [8, 128], "dtype": "int64", "fill": "randint", "high": 30000}]}))
    (folder / "train.py").write_text(TRAIN_PY)
    state = _tiny_net_state()
    optimizer = {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 0.1, "params": [0]}]}
    save_zip({"state_dict": state, "optimizer": optimizer, "epoch": 3}, folder / "last.ckpt")
    (folder / "run").mkdir()
    shutil.copy(folder / "last.ckpt", folder / "run" / "last.ckpt")
    save_safetensors({f"blocks.{i}.attn.qkv.weight": torch.randn(12, 4) for i in range(3)}
                     | {"blocks.0.mlp.weight": torch.randn(4, 4)}, folder / "model.safetensors")
    save_zip({"state_dict": state, "state_dict_ema": state, "model_ema": state, "epoch": 90}, folder / "epoch_90.pth")
    shutil.copy(folder / "epoch_90.pth", folder / "run" / "epoch_90.pth")
    save_zip(state, folder / "ckpt.pt")
    ddp = collections.OrderedDict((f"module.{k}", v) for k, v in state.items())
    save_zip(ddp, folder / "ddp.pt")
    save_zip(state, folder / "plain.pt")
    save_zip({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, folder / "big.pt")
    retag_devices(save_zip(state, folder / "gpu_run.pt"), {"0": "cuda:1"})
    norm_model = {**{f"module.{k}": v for k, v in state.items()}, "module.norm.weight": torch.ones(16)}
    save_zip({"model_state_dict": norm_model, "optimizer_state_dict": optimizer, "epoch": 7}, folder / "ddp.ckpt")
    save_zip(state, folder / "model.pt")
    save_zip(collections.OrderedDict((k.replace("head.", "head.").replace("backbone.", "backbone."), v)
                                     for k, v in state.items()), folder / "old.pt")
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).eval()
    torch.export.save(torch.export.export(model, (torch.randn(1, 3, 16, 16),)), str(folder / "model.pt2"))
    subprocess.run([sys.executable, "-c", "import torch, models; torch.save(models.Net(), 'net_object.pt')"],
                   cwd=folder, check=True, timeout=120)
    for epoch in (8, 9, 10):  # the last checkpoints of a run, to average
        save_zip({name: value + epoch if value.is_floating_point() else value for name, value in state.items()},
                 folder / f"epoch_{epoch}.pt")
    shutil.copytree(ROOT / "tests" / "data" / "zero" / "3-bf16", folder / "ds_run")  # real DeepSpeed runs
    shutil.copytree(ROOT / "tests" / "data" / "zero" / "2-bf16", folder / "ds_zero2")
    shutil.copy(folder / "examples" / "detections.json", folder / "preds.json")
    shutil.copy(folder / "examples" / "detections.json", folder / "sliced.json")  # sliced inference's output
    for name in ("model_a.json", "model_b.json"):  # three models' outputs, to fuse
        shutil.copy(folder / "examples" / "detections.json", folder / name)
    (folder / "model_c.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in json.loads((folder / "examples" / "detections.json").read_text()))
    )
    records = json.loads((folder / "preds.json").read_text())
    (folder / "preds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "preds").mkdir()  # shards written by two inference workers, for nms --ray
    for number in range(2):
        (folder / "preds" / f"worker-{number}.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in records[number::2]))
    shutil.copy(folder / "examples" / "detections_gt.json", folder / "instances_val.json")
    bin_folder = folder / "bin"
    bin_folder.mkdir()
    _script(bin_folder / "ptools", PTOOLS)
    _script(bin_folder / "torchrun", TORCHRUN)
    if shutil.which("jq") is None:
        _script(bin_folder / "jq", JQ)
    environment = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER")}
    environment["PATH"] = f"{bin_folder}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{environment['PATH']}"
    environment["COLUMNS"] = "120"
    return environment


def readme_lines() -> list[str]:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"^```bash\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)
    return [line for block in blocks for line in block.splitlines() if line.strip() and not line.startswith("#")]


def help_lines() -> list[str]:
    """Each command's examples as its printed help shows them at 80 columns, continued lines
    joined: what a user copies out of `ptools X --help | less`."""
    lines = []
    for command in app.registered_commands:
        printed = CliRunner().invoke(app, [command.name, "--help"], env={"COLUMNS": "80"}).stdout
        lines += examples_in(printed)
    return lines


def runnable(line: str) -> str | None:
    """The part of a documented line to run here: installing is CI's job, and the test suite
    must not run itself."""
    if line.startswith("pip install"):
        line = line.partition("&&")[2].strip()
    return None if not line or line.startswith("python -m pytest") else line


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    folder = tmp_path_factory.mktemp("stand_ins")
    return folder, make_stand_ins(folder)


@pytest.fixture
def stand_ins(template, tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A fresh copy per example: each is independent, as a reader would try it."""
    folder = tmp_path / "work"
    shutil.copytree(template[0], folder, symlinks=True)
    environment = dict(template[1])
    environment["PATH"] = environment["PATH"].replace(str(template[0] / "bin"), str(folder / "bin"))
    return folder, environment


def run_line(line: str, folder: Path, environment: dict[str, str]) -> subprocess.CompletedProcess:
    if "--watch" in line:  # runs until Ctrl-C: send one, expect the documented exit 130
        process = subprocess.Popen(["bash", "-c", line], cwd=folder, env=environment, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            process.wait(timeout=8)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGINT)
        out, err = process.communicate(timeout=60)
        return subprocess.CompletedProcess(line, 0 if process.returncode == 130 else process.returncode, out, err)
    return subprocess.run(["bash", "-o", "pipefail", "-c", line], cwd=folder, env=environment,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory):
    """For the `--ray` examples: a local Ray cluster of two nodes with 8 recorded H100s each."""
    cluster_utils = pytest.importorskip("ray.cluster_utils")
    from tests.fake_nvml import make_gpu

    recording = tmp_path_factory.mktemp("ray_nvml") / "server.json"
    recording.write_text(json.dumps({"gpus": [make_gpu(i) for i in range(8)]}))
    node = {"num_cpus": 1, "env_vars": {"PTOOLS_NVML_RECORDING": str(recording)}}
    cluster = cluster_utils.Cluster(initialize_head=True, head_node_args=node)
    cluster.add_node(**node)
    cluster.wait_for_nodes()
    yield cluster.address
    cluster.shutdown()


@pytest.mark.parametrize("line", [line for line in readme_lines() if runnable(line)])
def test_readme_example_runs(stand_ins, line: str, request: pytest.FixtureRequest) -> None:
    folder, environment = stand_ins
    if "--ray" in line:
        environment = {**environment, "RAY_ADDRESS": request.getfixturevalue("ray_cluster")}
    result = run_line(runnable(line), folder, environment)
    assert result.returncode == 0, f"{line}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("line", help_lines())
def test_help_example_runs(stand_ins, line: str) -> None:
    folder, environment = stand_ins
    result = run_line(line, folder, environment)
    assert result.returncode == 0, f"{line}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    assert "Traceback" not in result.stderr


def test_every_documented_command_is_collected() -> None:
    """The parsers above find what they should (a README without bash blocks would pass vacuously)."""
    assert len(readme_lines()) >= 30 and len(help_lines()) >= 25
    assert any(line.startswith("ptools freeze models.py:Net") for line in readme_lines())


# Flags README names that belong to a benchmark script of the section, not to the command.
_BENCHMARK_FLAGS = {"--runs": "bench_ray.py", "--wall-only": "bench_models.py", "--optimizers": "bench_train.py"}


def _command_options() -> dict[str, set[str]]:
    from typer.main import get_command

    commands = get_command(app).commands  # type: ignore[attr-defined]
    return {name: {flag for param in command.params for flag in (*param.opts, *param.secondary_opts)
                   if flag.startswith("--")} | {"--help"} for name, command in commands.items()}


def test_every_option_readme_names_exists_for_that_command() -> None:
    """In each command's README section, every `--flag` is an option of that command (README
    documented a `count-params --weights` that never existed), or of the benchmark named."""
    options = _command_options()
    text = (ROOT / "README.md").read_text()
    sections = re.split(r"^##+ ", text, flags=re.MULTILINE)
    checked = 0
    for section in sections:
        match = re.match(r"`ptools ([a-z-]+)`", section)
        if not match or match.group(1) not in options:
            continue
        command = match.group(1)
        for flag in sorted(set(re.findall(r"`(--[a-z][a-z0-9-]*)", section))):
            checked += 1
            if flag in options[command]:
                continue
            script = _BENCHMARK_FLAGS.get(flag)
            assert script and flag in (ROOT / "benchmarks" / script).read_text(), (
                f"README's `ptools {command}` section names {flag}, which `ptools {command}` does not have"
            )
    assert checked > 100
    for command, flags in options.items():  # "count-params --weights" written in prose anywhere
        for flag in re.findall(rf"`(?:ptools )?{command} (--[a-z][a-z0-9-]*)", text):
            assert flag in flags, f"README writes `{command} {flag}`, which does not exist"
