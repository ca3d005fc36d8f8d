"""The ``ptools`` Typer app, its error edge and its entry point.

Command modules are imported here to register them; they import torch only inside the
functions that need it, so ``ptools --help`` stays fast.
"""

from __future__ import annotations

import functools
import os
import sys
import traceback
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer

from ptools import __version__
from ptools.cli import help_format, output
from ptools.cli.wording import cli_words
from ptools.errors import PtoolsError

EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM, as a shell reports it


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a scheduler's time limit), raised where the program is so that
    cleanup runs exactly as for Ctrl-C: no temporary file survives."""


app = typer.Typer(
    name="ptools",
    help="A toolbox for people who train and ship PyTorch models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # Click's plain help: copyable at 80 columns (ptools.cli.help_format)
    cls=help_format.Group,
    context_settings={"help_option_names": ["-h", "--help"]},
)

F = TypeVar("F", bound=Callable[..., Any])


def error_edge(function: F, command: str | None = None) -> F:
    """Turn typed ptools errors into ``error: …`` (in command-line words: ``--iou``, not
    ``iou_threshold``) and their exit code; Ctrl-C into 130.

    Anything else is a bug and propagates with its traceback.
    """

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from ptools.core.memory import gc_paused

        try:
            # A command lives seconds and builds up to millions of acyclic records (tensor
            # descriptions, detections): the cyclic collector's passes would cost more than it frees.
            with gc_paused():
                return function(*args, **kwargs)
        except PtoolsError as failure:
            if os.environ.get("PTOOLS_DEBUG") == "1":
                traceback.print_exc()
            output.error(cli_words(str(failure), command))
            raise typer.Exit(failure.exit_code) from None
        except KeyboardInterrupt as interrupt:
            output.info("terminated" if isinstance(interrupt, Terminated) else "interrupted")
            raise typer.Exit(EXIT_TERMINATED if isinstance(interrupt, Terminated) else EXIT_INTERRUPTED) from None

    return wrapper  # type: ignore[return-value]


def _show_version(value: bool) -> None:
    if value:
        sys.stdout.write(f"ptools {__version__}\n")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_show_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """A toolbox for people who train and ship PyTorch models.

    Exit codes: 0 success, 1 error, 2 usage error, 3 a requirement you asked for is not
    met, 130 interrupted. Set PTOOLS_DEBUG=1 for tracebacks.
    """


def _register() -> None:
    from ptools.cli import convert_ckpt, count_params, freeze, gpu_info, inspect_state_dict, nms, summary

    for module in (gpu_info, inspect_state_dict, convert_ckpt, nms, summary, count_params, freeze):
        app.command(
            module.NAME, help=module.HELP, short_help=module.SHORT_HELP, no_args_is_help=False, cls=help_format.Command
        )(error_edge(module.command, module.NAME))


_register()


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


def usage_line(failure: Exception, argv: list[str]) -> str:
    """A usage error (Typer's own exceptions) as one line with the help to read, and a
    suggestion when a choice was mistyped: ``error: --method: 'sfot' is not one of …; did
    you mean 'soft'? (ptools nms -h)``."""
    import difflib
    import re

    message = " ".join(getattr(failure, "format_message", lambda: str(failure))().split())
    message = message.replace("Value error, ", "")
    # Read from the message: recent Typer validates choices with pydantic, and the failing
    # option carries no Click type whose choices could be asked.
    given = re.search(r"'([^']*)' is not one of (.*)", message)
    choices = re.findall(r"'([^']*)'", given.group(2)) if given else []
    if choices and given:
        close = difflib.get_close_matches(given.group(1).lower(), [str(c) for c in choices], n=1, cutoff=0.5)
        if close:
            message += f" Did you mean {close[0]!r}?"
    context = getattr(failure, "ctx", None)
    where = getattr(context, "command_path", None) or "ptools"
    command = next((word for word in argv if not word.startswith("-")), None)
    if where == "ptools" and command and command in {c.name for c in app.registered_commands}:
        where = f"ptools {command}"
    return f"error: {message} (see '{where} -h')"


def main() -> None:
    """Console-script entry point: usage errors are one line (exit 2), as every other error."""
    import signal

    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        code = app(prog_name="ptools", standalone_mode=False)
    except typer.Exit as finished:  # --help, --version: done, nothing wrong
        sys.exit(finished.exit_code)
    except Exception as failure:
        if type(failure).__name__ == "NoArgsIsHelpError" or not hasattr(failure, "exit_code"):
            if hasattr(failure, "show"):  # bare `ptools`: the help, as before
                failure.show()
                sys.exit(failure.exit_code)  # type: ignore[attr-defined]
            raise
        sys.stderr.write(usage_line(failure, sys.argv[1:]) + "\n")
        sys.exit(failure.exit_code)
    sys.exit(code if isinstance(code, int) else 0)
