"""Shared test setup: Triton's CPU interpreter where no GPU is present, seeds, the compat fixtures."""

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

ROOT = Path(__file__).resolve().parents[1]
# The official compatibility data lives in ../shared/compat beside the project's root (CI has it there).
COMPAT = Path(os.environ.get("PACA_KERNELS_COMPAT_DIR", ROOT.parent / "shared" / "compat"))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA device")
    config.addinivalue_line("markers", "slow: long-running; deselect with -m 'not slow'")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


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
