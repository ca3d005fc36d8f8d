"""Shared test set-up: the ``cuda`` marker."""

from __future__ import annotations

import functools

import pytest


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
