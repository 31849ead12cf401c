"""The backends of the PaCa ops, one file each, registered in the order ``python -m paca_kernels``
lists them, and the automatic priority per device.

=========  ============================================  ===================================
backend    what                                          where
=========  ============================================  ===================================
reference  pure PyTorch, the oracle                       any device, any floating dtype
cpu        fused C++ kernels (csrc/cpu)                   CPU
triton     fused Triton kernels (paca_kernels/triton)     CUDA; CPU under TRITON_INTERPRET=1
cuda       fused CUDA C++ kernels (csrc/cuda)             CUDA, sm_80+
=========  ============================================  ===================================

Each file declares its backend's devices, dtypes, limits and test tolerances
(:class:`~paca_kernels.ops.dispatch.Backend`); :mod:`paca_kernels.ops.dispatch` chooses among them.
A new backend is a new file here plus one line below.
"""

from __future__ import annotations

from ..dispatch import AUTO_PRIORITY, register_backend
from . import cpu, cuda, reference, triton

__all__ = ["BACKENDS"]

#: Every backend, in listing order.
BACKENDS = (reference.BACKEND, cpu.BACKEND, triton.BACKEND, cuda.BACKEND)
for _backend in BACKENDS:
    register_backend(_backend)

# The automatic choice on the CPU: at the layer level (PaCaAttention at the PaCa-ViT-Tiny stages,
# BENCHMARKS.md) the fused kernels beat the reference; the reference serves what they cannot.
# Triton runs on the CPU (its interpreter) only when asked for by name.
AUTO_PRIORITY["cpu"] = ["cpu", "reference"]
# On CUDA: Triton first, then the CUDA C++ kernels, until a GPU measurement decides between them.
AUTO_PRIORITY["cuda"] = ["triton", "cuda", "reference"]
