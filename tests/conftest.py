"""Shared test set-up: the ``cuda`` and ``slow`` markers."""

from __future__ import annotations

import functools

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow")


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
    skip_slow = pytest.mark.skip(reason="slow; pass --run-slow")
    for item in items:
        if "cuda" in item.keywords and nvidia_gpu_count() == 0:
            item.add_marker(skip_cuda)
        if "slow" in item.keywords and not config.getoption("--run-slow"):
            item.add_marker(skip_slow)
