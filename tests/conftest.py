"""Shared test set-up: the ``cuda`` marker, and Ctrl-C for the commands the tests interrupt."""

from __future__ import annotations

import functools
import signal

import pytest

# A runner started as a background job (`bash .ci/run &` without job control) inherits SIGINT
# ignored, and every child it starts would too: the tests that stop a command with Ctrl-C
# would wait for ever. Handled here, the signal goes back to its default in each child.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@functools.lru_cache(maxsize=1)
def nvidia_gpu_count() -> int:
    """GPUs NVML sees here (0 without driver); asks NVML, never torch, to keep collection fast."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # any NVML failure means: no usable GPU here
        return 0
    try:
        return pynvml.nvmlDeviceGetCount()
    finally:
        pynvml.nvmlShutdown()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_cuda = pytest.mark.skip(reason="needs an NVIDIA GPU and driver")
    for item in items:
        if "cuda" in item.keywords and nvidia_gpu_count() == 0:
            item.add_marker(skip_cuda)
