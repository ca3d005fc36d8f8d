"""The app as a whole: version, help, start-up cost, error edge, and README coverage."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import ptools
from ptools.cli.app import app

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "torchvision", "numpy")


def registered_commands() -> list:
    return [c for c in app.registered_commands if not c.hidden]


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert (result.exit_code, result.stdout) == (0, f"ptools {ptools.__version__}\n")


def test_root_help_lists_every_command_with_one_line() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in registered_commands():
        assert command.name in result.stdout
        assert command.short_help and "\n" not in command.short_help


def test_no_arguments_shows_help() -> None:
    result = runner.invoke(app, [])
    assert "Usage" in result.output


@pytest.mark.parametrize("command", [c.name for c in registered_commands()])
def test_every_command_has_help_with_an_example(command: str) -> None:
    result = runner.invoke(app, [command, "-h"])
    assert result.exit_code == 0
    assert "Examples" in result.stdout
    assert f"ptools {command}" in result.stdout


@pytest.mark.parametrize("command", [c.name for c in registered_commands()])
def test_every_command_is_described_in_readme(command: str) -> None:
    readme = (ROOT / "README.md").read_text()
    assert re.search(rf"^#+ `ptools {re.escape(command)}", readme, re.MULTILINE), (
        f"README.md has no section for `ptools {command}`")


def test_readme_quick_start_has_exactly_two_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Quick start\n+```(?:bash|sh)\n(.*?)```", readme, re.DOTALL)
    assert block, "README must open with a Quick start code block"
    commands = [line for line in block.group(1).splitlines() if line.strip() and not line.startswith("#")]
    assert len(commands) == 2
    assert "pytest" in commands[1] and ".[test" in commands[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert commands[1] in ci, ".ci/run must run the README's second quick-start command"


def imported_heavy_modules(*args: str) -> set[str]:
    """Run ptools in a fresh interpreter; return the heavy top-level modules it imported."""
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "ptools", *args],
                            capture_output=True, text=True, timeout=120)
    modules = {line.rsplit("|", 1)[-1].strip().split(".")[0]
               for line in result.stderr.splitlines() if line.startswith("import time:")}
    return modules & set(HEAVY)


@pytest.mark.parametrize("args", [
    ["--help"], ["--version"], *[[c.name, "--help"] for c in registered_commands()],
    ["gpu-info", "--no-torch"], ["gpu-info", "--require", "1"], ["gpu-info", "--select", "1"],
])
def test_startup_never_imports_torch(args: list[str]) -> None:
    assert imported_heavy_modules(*args) == set()


def test_full_gpu_report_does_import_torch() -> None:
    """The start-up check above can fail: the full report really imports torch."""
    assert "torch" in imported_heavy_modules("gpu-info")


def test_console_script_entry_point() -> None:
    script = Path(sys.executable).with_name("ptools")
    if not script.exists():
        pytest.skip("ptools is not installed as a console script in this environment")
    result = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=60)
    assert result.stdout == f"ptools {ptools.__version__}\n"


def test_pick_gpus_example_runs() -> None:
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "pick_gpus.py"), "1"],
                            capture_output=True, text=True, timeout=60)
    from tests.conftest import nvidia_gpu_count

    if nvidia_gpu_count():
        assert result.returncode == 0 and result.stdout.strip()
    else:
        assert result.returncode == 3
        assert "cannot pick GPUs: 1 usable GPU required, 0 found" in result.stderr


def test_files_the_readme_tells_people_to_write_are_ignored_by_git() -> None:
    """Running the quick start in a clone must not leave untracked files behind."""
    readme = (ROOT / "README.md").read_text()
    written = set(re.findall(r"-o ((?:soft|hard)_nms\.json)", readme))
    ignored = set((ROOT / ".gitignore").read_text().split())
    assert written and written <= ignored, written - ignored


def test_readme_and_comments_reference_only_files_in_the_repo() -> None:
    texts = {ROOT / "README.md": (ROOT / "README.md").read_text()}
    for folder in ("ptools", "tests", "benchmarks", "examples"):
        for path in (ROOT / folder).rglob("*.py"):
            texts[path] = path.read_text()
    repo_dirs = ("examples/", "benchmarks/", "tests/", "ptools/", ".ci/")
    for path, text in texts.items():
        assert ".." + "/shared" not in text and "docs/" + "nms.md" not in text, path
        for reference in re.findall(r"`((?:examples|benchmarks|tests|ptools|\.ci)/[\w./-]+)`", text):
            target = reference.split()[0].rstrip(".,:")
            if target.startswith(repo_dirs) and "*" not in target:
                assert (ROOT / target).exists(), f"{path.name} names {target}, which is not in the repo"


def test_the_core_speaks_python_and_the_cli_speaks_flags() -> None:
    """No string the library raises or notes names a command-line flag; the CLI's one
    mapping turns the Python names into flags."""
    import ast

    from ptools.cli.wording import cli_words

    for path in (ROOT / "ptools" / "core").rglob("*.py"):
        tree = ast.parse(path.read_text())
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
                      and node.body and isinstance(node.body[0], ast.Expr)
                      and isinstance(node.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                assert not re.search(r"(^|[\s(])--[a-z]", node.value), f"{path.name}: {node.value!r}"
    assert cli_words("`iou_threshold` must be between 0 and 1") == "--iou must be between 0 and 1"
    assert cli_words("pass `trust=True` only if …; run `git lfs pull`") == "pass --trust only if …; run `git lfs pull`"
    assert cli_words("`key` 'x': no key", "convert-ckpt") == "--extract 'x': no key"
    assert cli_words("`key` 'x': no key", "inspect-state-dict") == "--key 'x': no key"


def _command_options() -> dict[str, list[list[str]]]:
    """Each command's options, as the spellings of each (``["-o", "--output"]``)."""
    import typer.main

    group = typer.main.get_command(app)
    return {name: [list(param.opts) for param in command.params if any(o.startswith("-") for o in param.opts)]
            for name, command in group.commands.items()}


def _readme_section(command: str) -> str:
    readme = (ROOT / "README.md").read_text()
    start = re.search(rf"^### `ptools {re.escape(command)}`", readme, re.MULTILINE)
    assert start, command
    end = re.search(r"^##+ ", readme[start.end():], re.MULTILINE)
    return readme[start.start(): start.end() + (end.start() if end else len(readme))]


@pytest.mark.parametrize("command", [c.name for c in registered_commands()])
def test_readme_documents_exactly_the_options_help_has(command: str) -> None:
    """Docs that cannot drift: every option of the command is described in its README section,
    and every flag that section names exists (in this command or, for cross-references, in
    another one)."""
    options = _command_options()
    every = {opt for spellings in (s for command_options in options.values() for s in command_options)
             for opt in spellings}
    section = _readme_section(command)
    # Model commands share the options described once under "Naming a model".
    if command in ("summary", "count-params", "freeze"):
        section += _readme_section_by_title("Naming a model")
    named = set(re.findall(r"(?<![\w-])--?[a-z][a-z-]*(?=[\s`=|,)\]])", section))
    undocumented = [spellings[-1] for spellings in options[command]
                    if not set(spellings) & named and spellings[-1] not in ("--help", "--json")]
    assert not undocumented, f"undocumented in README's section: {undocumented}"
    flags = {n for n in named if n.startswith("--")}
    elsewhere = {"--nproc-per-node", "--epochs", "--lr", "--runs", "--wall-only", "--max-gmacs", "--keep"}
    assert flags <= every | elsewhere, f"not an option of any command: {sorted(flags - every - elsewhere)}"


def _readme_section_by_title(title: str) -> str:
    readme = (ROOT / "README.md").read_text()
    start = readme.index(f"### {title}")
    end = readme.index("\n### ", start + 4)
    return readme[start:end]



def printed_help(*args: str) -> str:
    """Help as a pipe gets it (`ptools nms -h | less`): 80 columns, no terminal."""
    done = subprocess.run([sys.executable, "-m", "ptools", *args, "--help"], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "COLUMNS": "80"})
    assert done.returncode == 0 and done.stderr == "", done.stderr
    return done.stdout


def option_spellings(command: str | None) -> set[str]:
    import typer.main

    group = typer.main.get_command(app)
    found = group if command is None else group.commands[command]  # type: ignore[attr-defined]
    return {"--help"} | {spelling for param in found.params for spelling in getattr(param, "opts", [])}


@pytest.mark.parametrize("command", [None, *[c.name for c in registered_commands()]])
def test_help_at_80_columns_is_whole_and_copyable(command: str | None) -> None:
    """Rich's panels cut option names with `…`, broke `--class-iou` at its hyphen and showed
    Python types (`<list[str]>`, `(0.5)` defaults) at 80 columns."""
    text = printed_help(*([command] if command else []))
    assert max(len(line) for line in text.splitlines()) <= 80, text
    assert "…" not in text and "─" not in text
    assert not re.search(r"<(?:str|int|float|bool|path|list\[\w+\])>|\(0\.\d+\)|default: \(", text, re.I), text
    assert not re.search(r"\w-\n", text), "a line ends in a hyphen: a flag or file name was split"
    # Every flag the text names is spelt whole: one of ptools' (or torchrun's, in an example).
    known = {"--nproc-per-node", "--version"}.union(*(option_spellings(c.name) for c in registered_commands()))
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*[a-z]", text))
    assert named <= known, named - known


@pytest.mark.parametrize("command", registered_commands(), ids=lambda c: c.name)
def test_every_help_example_is_printed_whole(command) -> None:  # noqa: ANN001
    """Each example in a command's source comes back, whole, out of the printed help."""
    from ptools.cli.help_format import examples_in

    module = sys.modules[command.callback.__module__]
    assert examples_in(printed_help(command.name)) == list(module.EXAMPLES)


def test_a_long_example_breaks_between_words_as_a_shell_continues_it() -> None:
    from ptools.cli.help_format import examples_in, shell_lines

    example = ("ptools nms model_a.json model_b.json --method wbf --class-iou '{\"1\": 0.6, \"person\": 0.4}' "
               "--model-weights 2,1 -o fused.json > log.txt")
    lines = shell_lines(example, width=40)
    assert lines == [
        "ptools nms model_a.json model_b.json \\",
        "    --method wbf \\",
        "    --class-iou '{\"1\": 0.6, \"person\": 0.4}' \\",  # a quoted value is never split
        "    --model-weights 2,1 -o fused.json \\",  # nor an option from its value
        "    > log.txt",
    ]
    assert examples_in("Examples:\n\n" + "\n".join("  " + line for line in lines)) == [example]
    assert shell_lines("ptools gpu-info") == ["ptools gpu-info"]
