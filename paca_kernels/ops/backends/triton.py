"""The "triton" backend: the Triton kernels (paca_kernels/triton), through their twin custom ops
(``*_triton``, defined in :mod:`paca_kernels.ops.cluster_pool` and :mod:`paca_kernels.ops.p2c_attention`).

Runs on CUDA, or on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``, the tests'
setting on machines without a GPU). fp16, bf16 and fp32; the size limits are the launchers'
(:data:`paca_kernels.triton.MAX_KEYS`, ``MAX_HEAD_DIM``, ``MAX_KEY_TILE``, ``MAX_CHANNELS``), held to the
H100's budgets by the resource gate (tests/backends/test_triton_resources.py).

Under the interpreter fp16/bf16 run the GPU's arithmetic: cluster_pool's operands rounded to TF32 before
fp32 products (the GPU's TF32 tensor cores), p2c_attention's P and dS rounded to the inputs' dtype before
their products (as on the GPU); so the low-precision tests' verdicts carry over to the GPU.

Tolerances: fp32 runs its products in IEEE fp32 ("ieee" dot). Measured against float64 on the op
tests' shapes (interpreter): forward ≤ 3.1e-6, gradients ≤ 6.1e-6 (dbias/dweight sum B·M rows, dk/dv
sum N queries); the tolerances leave 3-5× headroom.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ...triton import (
    MAX_CHANNELS,
    MAX_HEAD_DIM,
    MAX_KEY_TILE,
    MAX_KEYS,
    TRITON_AVAILABLE,
    TRITON_UNAVAILABLE_REASON,
    interpreted,
)
from ..cluster_pool import cluster_pool_triton
from ..dispatch import Backend
from ..p2c_attention import p2c_attention_triton

__all__ = ["BACKEND"]

_AVAILABILITY: list[str | None] = []


def _availability() -> str | None:
    """None when Triton imports and has somewhere to run (a CUDA device, or the CPU interpreter)."""
    if not _AVAILABILITY:  # computed once: Triton itself reads TRITON_INTERPRET when kernels are defined
        if not TRITON_AVAILABLE:
            reason: str | None = TRITON_UNAVAILABLE_REASON
        elif torch.cuda.is_available() or interpreted():
            reason = None
        else:
            reason = "no CUDA device, and TRITON_INTERPRET=1 (Triton's CPU interpreter) is not set"
        _AVAILABILITY.append(reason)
    return _AVAILABILITY[0]


def _device_reasons(t: Tensor) -> list[str]:
    if t.device.type == "cpu" and not interpreted():
        return ["CPU tensors need Triton's interpreter (TRITON_INTERPRET=1)"]
    return []


def _p2c_limits(inputs: Sequence[Tensor]) -> list[str]:
    q, k = inputs[0], inputs[1]
    reasons = _device_reasons(q)
    if k.shape[1] > MAX_KEYS:
        reasons.append(f"p2c_attention holds all keys on chip: M = {k.shape[1]} > {MAX_KEYS}")
    if q.shape[-1] > MAX_HEAD_DIM:
        reasons.append(f"p2c_attention head dim d = {q.shape[-1]} > {MAX_HEAD_DIM}")
    if not reasons and _pad(k.shape[1]) * _pad(q.shape[-1]) > MAX_KEY_TILE:
        reasons.append(f"p2c_attention holds the keys and values on chip: M = {k.shape[1]} keys of head dim "
                       f"d = {q.shape[-1]} pad to {_pad(k.shape[1])} × {_pad(q.shape[-1])} > {MAX_KEY_TILE} "
                       f"(M ≤ 256 takes d ≤ 64; d ≤ 128 takes M ≤ 128)")
    return reasons


def _pad(size: int) -> int:
    """A size padded as the kernels pad it: a power of two, at least 16."""
    return max(16, 1 << (size - 1).bit_length())


def _cp_limits(inputs: Sequence[Tensor]) -> list[str]:
    x = inputs[1]
    reasons = _device_reasons(x)
    if x.shape[-1] > MAX_CHANNELS:
        reasons.append(f"cluster_pool holds a cluster's channels on chip: C = {x.shape[-1]} > {MAX_CHANNELS}")
    return reasons


BACKEND = Backend(
    name="triton",
    description="Triton kernels (fused, one pass; CUDA, or the CPU interpreter with TRITON_INTERPRET=1)",
    device_types=("cuda", "cpu"),
    dtypes=(torch.float16, torch.bfloat16, torch.float32),
    impls={"cluster_pool": cluster_pool_triton, "p2c_attention": p2c_attention_triton},
    availability=_availability,
    limits={"cluster_pool": _cp_limits, "p2c_attention": _p2c_limits},
    tolerances={torch.float32: (1e-5, 1e-5)},
    grad_tolerances={torch.float32: (3e-5, 3e-5)},
)
