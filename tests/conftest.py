"""Shared test setup: Triton's CPU interpreter where no GPU is present, seeds, the compat fixtures, the
``gpu`` and ``extension`` markers, and a spy on the fused ops' entry points.

The tests live in tests/ (modules, models, tools), tests/ops/ (one module per op, parametrized over every
backend) and tests/backends/ (backend-only cases); no __init__.py, so module basenames are unique."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch

# Must be set before anything imports Triton kernels (they are decorated at import time).
# torch.cuda.is_available() asks the driver for a device count; it creates no CUDA context.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Only now may the package load (its Triton kernels are decorated at import, in the mode set above).
from paca_kernels.testing import isolate_inductor_cache

ROOT = Path(__file__).resolve().parents[1]
# A TorchInductor cache per source state (paca_kernels.testing.isolate_inductor_cache): a graph compiled
# against older op outputs must not be served after the ops change. Before anything compiles.
isolate_inductor_cache(ROOT)
# The official compatibility data lives in ../shared/compat beside the project's root (CI has it there).
COMPAT = Path(os.environ.get("PACA_KERNELS_COMPAT_DIR", ROOT.parent / "shared" / "compat"))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA device")
    config.addinivalue_line("markers", "slow: long-running; deselect with -m 'not slow'")
    config.addinivalue_line("markers", "extension: needs the C++ extension (paca_kernels._C)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    from paca_kernels import _ext

    no_ext = None if _ext.load() else pytest.mark.skip(reason=f"C++ extension: {_ext.unavailable_reason()}")
    no_gpu = None if torch.cuda.is_available() else pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if no_gpu is not None and "gpu" in item.keywords:
            item.add_marker(no_gpu)
        if no_ext is not None and "extension" in item.keywords:
            item.add_marker(no_ext)


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Fresh, reproducible random inputs in every test."""
    random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def compat_dir() -> Path:
    """../shared/compat, or skip with the reason (a user's own clone does not have it)."""
    if not (COMPAT / "README.md").exists():
        pytest.skip(f"official compat fixtures not found at {COMPAT} (set PACA_KERNELS_COMPAT_DIR)")
    return COMPAT


@pytest.fixture
def spy(monkeypatch):
    """``spy(module, name)`` replaces the function ``module.name`` for the test with one that records
    the shape of its first argument, in the returned list, and calls the original."""

    def install(module, name: str, calls: list | None = None, tag=None) -> list:
        calls = [] if calls is None else calls
        real = getattr(module, name)

        def wrapper(*args, **kwargs):
            shape = tuple(args[0].shape)
            calls.append(shape if tag is None else (tag, shape))
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)
        return calls

    return install
