"""The Triton backend: ``torch.library.custom_op`` twins of the PaCa ops, their fake kernels, autograd,
FLOP formulas, and :func:`make_backend`.

Raw ops (namespace ``paca_kernels``; defined only when Triton imports):

- ``p2c_attention_fwd_triton(q, k, v, scale) -> (out, lse)``: out (B, N, h, d) in q's dtype,
  lse (B, h, N) fp32 = logsumexp of the scaled scores over M, kept for the backward.
- ``p2c_attention_bwd_triton(grad_out, q, k, v, out, lse, scale, deterministic) -> (dq, dk, dv)``.
- ``cluster_pool_fwd_triton(logits, x, weight?, bias?, eps) -> (out, pooled, lse)``: the same outputs as
  the C++ ``cluster_pool_fwd`` (pooled and lse fp32), so it shares that op's fake kernels.
- ``cluster_pool_bwd_triton(grad_out, logits, x, weight?, pooled, lse, eps) -> (dlogits, dx, dweight, dbias)``.

The kernels take every stride as an argument, so the op bodies copy nothing (not even stride-0
gradients). The p2c backward reduces dk/dv with fp32 atomics, or, when
``torch.are_deterministic_algorithms_enabled()``, through per-tile partial sums reduced in a fixed order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ..triton import TRITON_AVAILABLE, TRITON_UNAVAILABLE_REASON, interpreted
from ._backends import Backend

__all__ = ["cluster_pool_triton", "make_backend", "p2c_attention_triton"]

_LIB = "paca_kernels"
MAX_KEYS = 256
MAX_HEAD_DIM = 128
MAX_CHANNELS = 1024


if TRITON_AVAILABLE:
    from ..triton import cluster_pool as _cp
    from ..triton import p2c_attention as _p2c
    from ._registration import register_cluster_pool, register_p2c_attention

    assert _p2c.MAX_KEYS == MAX_KEYS and _p2c.MAX_HEAD_DIM == MAX_HEAD_DIM
    assert _cp.MAX_CHANNELS == MAX_CHANNELS

    # -- p2c_attention ------------------------------------------------------------------------------

    @torch.library.custom_op(f"{_LIB}::p2c_attention_fwd_triton", mutates_args=())
    def p2c_attention_fwd_triton(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
        """softmax(q·kᵀ·scale over M)·v: out (B, N, h, d) and lse (B, h, N) fp32."""
        return _p2c.p2c_attention_fwd(q, k, v, scale)

    @torch.library.custom_op(f"{_LIB}::p2c_attention_bwd_triton", mutates_args=())
    def p2c_attention_bwd_triton(
        grad_out: Tensor,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        out: Tensor,
        lse: Tensor,
        scale: float,
        deterministic: bool,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """dq (B, N, h, d), dk and dv (B, M, h, d) of p2c attention (see the kernel module for the math)."""
        return _p2c.p2c_attention_bwd(grad_out, q, k, v, out, lse, scale, deterministic)

    # Bitwise-reproducible dk/dv whenever PyTorch is asked for deterministic algorithms.
    register_p2c_attention(
        f"{_LIB}::p2c_attention_fwd_triton", f"{_LIB}::p2c_attention_bwd_triton",
        lambda q: torch.are_deterministic_algorithms_enabled(),
    )

    # -- cluster_pool -------------------------------------------------------------------------------

    @torch.library.custom_op(f"{_LIB}::cluster_pool_fwd_triton", mutates_args=())
    def cluster_pool_fwd_triton(
        logits: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        """LayerNorm(softmax(logits over N)·x): out (B, M, C), pooled (B, M, C) fp32, lse (B, M) fp32."""
        return _cp.cluster_pool_fwd(logits, x, weight, bias, eps)

    @torch.library.custom_op(f"{_LIB}::cluster_pool_bwd_triton", mutates_args=())
    def cluster_pool_bwd_triton(
        grad_out: Tensor,
        logits: Tensor,
        x: Tensor,
        weight: Tensor | None,
        pooled: Tensor,
        lse: Tensor,
        eps: float,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """dlogits (B, M, N), dx (B, N, C), dweight (C,), dbias (C,) of cluster_pool."""
        return _cp.cluster_pool_bwd(grad_out, logits, x, weight, pooled, lse, eps)

    # Fake kernels, autograd and FLOP formulas shared with the C++ twins (same outputs, same dtypes).
    register_cluster_pool(f"{_LIB}::cluster_pool_fwd_triton", f"{_LIB}::cluster_pool_bwd_triton")


def p2c_attention_triton(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> Tensor:
    """The Triton backend of p2c_attention (differentiable): q (B, N, h, d), k, v (B, M, h, d)."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    return torch.ops.paca_kernels.p2c_attention_fwd_triton(q, k, v, scale)[0]


def cluster_pool_triton(
    logits: Tensor, x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-6
) -> Tensor:
    """The Triton backend of cluster_pool (differentiable): logits (B, M, N), x (B, N, C) -> (B, M, C)."""
    return torch.ops.paca_kernels.cluster_pool_fwd_triton(logits, x, weight, bias, eps)[0]


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


def _device_reason(t: Tensor) -> list[str]:
    if t.device.type == "cpu" and not interpreted():
        return ["CPU tensors need Triton's interpreter (TRITON_INTERPRET=1)"]
    return []


def _p2c_limits(inputs: Sequence[Tensor]) -> list[str]:
    q, k = inputs[0], inputs[1]
    reasons = _device_reason(q)
    if k.shape[1] > MAX_KEYS:
        reasons.append(f"p2c_attention holds all keys on chip: M = {k.shape[1]} > {MAX_KEYS}")
    if q.shape[-1] > MAX_HEAD_DIM:
        reasons.append(f"p2c_attention head dim d = {q.shape[-1]} > {MAX_HEAD_DIM}")
    return reasons


def _cp_limits(inputs: Sequence[Tensor]) -> list[str]:
    x = inputs[1]
    reasons = _device_reason(x)
    if x.shape[-1] > MAX_CHANNELS:
        reasons.append(f"cluster_pool holds a cluster's channels on chip: C = {x.shape[-1]} > {MAX_CHANNELS}")
    return reasons


def make_backend() -> Backend:
    """The "triton" backend (register with :func:`paca_kernels.ops.register_backend`)."""
    return Backend(
        name="triton",
        description="Triton kernels (fused, one pass; CUDA, or the CPU interpreter with TRITON_INTERPRET=1)",
        device_types=("cuda", "cpu"),
        dtypes=(torch.float16, torch.bfloat16, torch.float32),
        impls={"cluster_pool": cluster_pool_triton, "p2c_attention": p2c_attention_triton},
        availability=_availability,
        limits={"cluster_pool": _cp_limits, "p2c_attention": _p2c_limits},
    )
