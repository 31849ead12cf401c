"""p2c_attention as ``torch.library`` ops: fake kernels, autograd, FLOP formulas, and the backends' entry points.

The C++ schemas live in ``csrc/registration.cpp`` (namespace ``paca_kernels``; CPU kernels in
csrc/cpu/p2c_attention.cpp, CUDA kernels in csrc/cuda/p2c_attention.cu):

- ``p2c_attention_fwd(q, k, v, scale) -> (out, lse)``: q (B, N, h, d), k and v (B, M, h, d); out
  (B, N, h, d) in q's dtype, lse (B, h, N) = logsumexp over M of the scaled scores, in the accumulation
  dtype (float64 for float64 inputs, float32 otherwise); not differentiable, not used by the backward.
- ``p2c_attention_bwd(grad_out, q, k, v, scale, deterministic) -> (dq, dk, dv)``.

Backward math: every kernel recomputes the scores and their softmax from q and k alone (M is small,
so a row's M scores are on hand), as PyTorch's softmax backward does:

    s = q·kᵀ·scale,   P = exp(s − rowmax s) / rowsum,   dP = dO·vᵀ
    D = rowsum(P ∘ dP),   dS = P ∘ (dP − D)
    dq = dS·k·scale,   dk = dSᵀ·q·scale,   dv = Pᵀ·dO   (the last two summed over N)

Why not the flash-attention shortcuts: P = exp(s − lse) from a saved fp32 lse carries the lse's
rounding, ~|s|·2⁻²⁴ relative (6e-4 at |s| ~ 1e4), into every P; and D = rowsum(dO ∘ O) from the
stored output (rounded to the output dtype) does not cancel dP where a row is saturated (P one-hot,
true dS = 0), so dq/dk got noise proportional to the scale. With P and D from the same recomputed
scores, the gradients are as accurate as fp32 PyTorch autograd of the composition, and exactly 0
where it gives exactly 0.

The Triton kernels (paca_kernels/triton/p2c_attention.py) have twin ops with the same signatures,
defined here when Triton imports: ``p2c_attention_fwd_triton`` and ``p2c_attention_bwd_triton``. The
Triton backward reduces dk/dv with fp32 atomics, or, when ``torch.are_deterministic_algorithms_enabled()``,
through per-tile partial sums reduced in a fixed order.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import _ext
from ..triton import TRITON_AVAILABLE
from ._registration import register_p2c_attention

__all__ = ["REGISTERED", "p2c_attention_cpp", "p2c_attention_triton"]

_LIB = "paca_kernels"


def _deterministic(q: Tensor) -> bool:
    # The CPU kernel's reduction over N is always in a fixed order; ask for determinism everywhere
    # on CPU so that the flag means the same thing to every kernel.
    return q.device.type == "cpu" or torch.are_deterministic_algorithms_enabled()


def _register() -> bool:
    """Attach the Python pieces to the C++ schemas; False when the extension is unavailable."""
    if not _ext.load():
        return False
    register_p2c_attention(f"{_LIB}::p2c_attention_fwd", f"{_LIB}::p2c_attention_bwd", _deterministic)
    return True


REGISTERED = _register()


def p2c_attention_cpp(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """The C++ backend: ``torch.ops.paca_kernels.p2c_attention_fwd`` (differentiable); returns out."""
    return torch.ops.paca_kernels.p2c_attention_fwd(q, k, v, scale)[0]


if TRITON_AVAILABLE:
    from ..triton import p2c_attention as _kernels

    @torch.library.custom_op(f"{_LIB}::p2c_attention_fwd_triton", mutates_args=())
    def p2c_attention_fwd_triton(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
        """softmax(q·kᵀ·scale over M)·v: out (B, N, h, d) and lse (B, h, N) fp32."""
        return _kernels.p2c_attention_fwd(q, k, v, scale)

    @torch.library.custom_op(f"{_LIB}::p2c_attention_bwd_triton", mutates_args=())
    def p2c_attention_bwd_triton(
        grad_out: Tensor,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        scale: float,
        deterministic: bool,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """dq (B, N, h, d), dk and dv (B, M, h, d) of p2c attention (see the module docstring for the math)."""
        return _kernels.p2c_attention_bwd(grad_out, q, k, v, scale, deterministic)

    # Bitwise-reproducible dk/dv whenever PyTorch is asked for deterministic algorithms.
    register_p2c_attention(
        f"{_LIB}::p2c_attention_fwd_triton", f"{_LIB}::p2c_attention_bwd_triton",
        lambda q: torch.are_deterministic_algorithms_enabled(),
    )


def p2c_attention_triton(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> Tensor:
    """The Triton backend: ``torch.ops.paca_kernels.p2c_attention_fwd_triton`` (differentiable); q
    (B, N, h, d), k and v (B, M, h, d) -> out (B, N, h, d); scale defaults to d^-1/2."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    return torch.ops.paca_kernels.p2c_attention_fwd_triton(q, k, v, scale)[0]
