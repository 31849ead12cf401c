"""The "cpu" backend: the C++ CPU kernels of ``paca_kernels._C`` (csrc/cpu).

Fused, differentiable cluster_pool and p2c_attention for every floating dtype (fp16/bf16 inputs
accumulate in fp32, float64 in float64), with no shape limits. The inference-only fusions of the
layers (csrc/cpu/fused, :mod:`paca_kernels.ops.fused`) run where this backend is the one a layer's
setting resolves to. Available when the extension is built and loads.

Tolerances: those the CPU kernel tests have held since the kernels landed (``testing.TOLERANCES``,
set from the error measured on the tests' shapes: other summation orders, fp32 accumulation), with
the gradients' looser where they sum over N or B·M rows.
"""

from __future__ import annotations

import torch

from ... import _ext
from ..cluster_pool import cluster_pool_cpp
from ..dispatch import Backend
from ..p2c_attention import p2c_attention_cpp

__all__ = ["BACKEND"]

BACKEND = Backend(
    name="cpu",
    description="C++ CPU kernels (paca_kernels._C): fused cluster_pool and p2c_attention",
    device_types=("cpu",),
    dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64),
    impls={"cluster_pool": cluster_pool_cpp, "p2c_attention": p2c_attention_cpp},
    availability=lambda: None if _ext.load() else _ext.unavailable_reason(),
    tolerances={torch.float64: (1e-10, 1e-12), torch.float32: (2e-5, 2e-5)},
    grad_tolerances={torch.float64: (1e-10, 1e-12), torch.float32: (3e-5, 3e-5)},
)
