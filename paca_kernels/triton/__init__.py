"""Triton kernels of paca_kernels (GPU, or Triton's CPU interpreter with ``TRITON_INTERPRET=1``).

Importing this package never fails: when Triton is missing, :data:`TRITON_AVAILABLE` is False and
:data:`TRITON_UNAVAILABLE_REASON` says why; the kernel modules are then not imported.

- :mod:`.p2c_attention`: fused patch-to-cluster attention forward / backward.
- :mod:`.cluster_pool`: fused softmax-over-N pooling + LayerNorm forward / backward, split-N merge.
- :mod:`.plan`: how every launch is planned (tiles, warps, stages, splits, 1-D grids) from the shapes,
  the dtype and a device description; pure Python, shared by the launchers and the resource gate
  (scripts/triton_gate.py), which compiles every plan for sm_90 against the H100's budgets.
- :mod:`._launch`: the inputs' device as the planner sees it, and the guard that launches there.
"""

from __future__ import annotations

import os

__all__ = ["MAX_CHANNELS", "MAX_HEAD_DIM", "MAX_KEYS", "MAX_KEY_TILE", "TRITON_AVAILABLE", "TRITON_UNAVAILABLE_REASON",
           "interpreted"]

# The sizes the kernels' launchers were written for, here (importable without Triton) as their one
# source: the triton backend (paca_kernels.ops.backends.triton) refuses larger calls with these, and
# the resource gate (scripts/triton_gate.py) compiles every launch up to them for sm_90.
#: p2c_attention: all keys of one (batch, head) sit on chip; beyond this the register/shared-memory
#: budget is exceeded.
MAX_KEYS = 256
#: p2c_attention: head dims up to this are padded to a power of two and held on chip whole.
MAX_HEAD_DIM = 128
#: p2c_attention: the padded key/value tile, pow2(max(M, 16)) × pow2(max(d, 16)), at most this: M = 256
#: keys take head dims up to 64, head dims 65-128 take up to 128 keys. Larger tiles spill registers in
#: the backward at every tile/warp choice, and the fp32 ones need more than the H100's 227 KiB of shared
#: memory per block (the resource gate, tests/backends/test_triton_resources.py, measures both).
MAX_KEY_TILE = 256 * 64
#: cluster_pool: the whole (padded) channel row of a cluster block lives on chip.
MAX_CHANNELS = 1024

try:
    import triton
    import triton.language  # noqa: F401
except Exception as exc:  # noqa: BLE001 (a broken install can raise more than ImportError)
    TRITON_AVAILABLE = False
    TRITON_UNAVAILABLE_REASON: str | None = f"triton does not import ({type(exc).__name__}: {exc})"
else:
    TRITON_AVAILABLE = True
    TRITON_UNAVAILABLE_REASON = None


def interpreted() -> bool:
    """True when Triton runs kernels with its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
