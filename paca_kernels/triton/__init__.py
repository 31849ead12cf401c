"""Triton kernels of paca_kernels (GPU, or Triton's CPU interpreter with ``TRITON_INTERPRET=1``).

Importing this package never fails: when Triton is missing, :data:`TRITON_AVAILABLE` is False and
:data:`TRITON_UNAVAILABLE_REASON` says why; the kernel modules are then not imported.

- :mod:`.p2c_attention`: fused patch-to-cluster attention forward / backward.
- :mod:`.cluster_pool`: fused softmax-over-N pooling + LayerNorm forward / backward.
"""

from __future__ import annotations

import os

__all__ = ["TRITON_AVAILABLE", "TRITON_UNAVAILABLE_REASON", "interpreted"]

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
