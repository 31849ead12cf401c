"""p2c_attention as ``torch.library`` ops: fake kernels, autograd, FLOP formulas, and the backends' entry points.

The C++ schemas live in ``csrc/registration.cpp`` (namespace ``paca_kernels``; CPU kernels in
csrc/cpu/p2c_attention.cpp, CUDA kernels in csrc/cuda/p2c_attention.cu):

- ``p2c_attention_fwd(q, k, v, scale) -> (out, lse)``: q (B, N, h, d), k and v (B, M, h, d); out
  (B, N, h, d) in q's dtype, lse (B, h, N) = logsumexp over M of the scaled scores, in the accumulation
  dtype (float64 for float64 inputs, float32 otherwise); not differentiable, not used by the backward.
- ``p2c_attention_bwd(grad_out, q, k, v, scale, deterministic) -> (dq, dk, dv)``.
- CPU only, the training pair the cpu backend takes when a gradient is wanted:
  ``p2c_attention_saved_fwd(q, k, v, scale) -> (out, exp_scores, exp_sums)`` keeps the softmax
  numerators e = exp(s − rowmax s) (B, h, N, M) and their sums (B, h, N), in the accumulation dtype,
  and ``p2c_attention_saved_bwd(grad_out, q, k, v, exp_scores, exp_sums, scale) -> (dq, dk, dv)``
  reads them instead of recomputing the scores and their exps: three products instead of four and no
  exp (the backward 20-25 % faster at the PaCa-ViT-Tiny stages), for the memory of the probabilities
  a PyTorch composition saves. Its gradients are the recomputing pair's bit for bit (e and its sums
  come from the same products and row kernels, in the same blocks). Above
  :data:`SAVED_SCORES_MAX_BYTES` per call the cpu backend recomputes instead (memory).

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
from ._registration import register_p2c_attention, register_p2c_attention_saved

__all__ = ["REGISTERED", "SAVED_SCORES_MAX_BYTES", "p2c_attention_cpp", "p2c_attention_triton"]

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
    register_p2c_attention_saved(f"{_LIB}::p2c_attention_saved_fwd", f"{_LIB}::p2c_attention_saved_bwd")
    return True


REGISTERED = _register()

#: The most bytes of softmax numerators (B·h·N·M in the accumulation dtype) the cpu backend keeps for
#: one call's backward; a larger call recomputes them in its backward (the flash-attention way: no
#: (B, h, N, M) tensor held). 256 MiB: PaCa-ViT-Tiny at 224² holds 20 MiB at its first stage for B = 8;
#: the detection shape 800×1216 (N = 60 800, h = 2, M = 100) stays under it up to B = 5.
SAVED_SCORES_MAX_BYTES = 256 << 20


def _keeps_scores(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether this call records a backward on the CPU and its numerators fit the cap."""
    if not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
        return False
    b, n, h, _ = q.shape
    itemsize = 8 if q.dtype == torch.float64 else 4
    return q.device.type == "cpu" and b * h * n * k.shape[1] * itemsize <= SAVED_SCORES_MAX_BYTES


def p2c_attention_cpp(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """The C++ backend (differentiable); returns out. In a call that records a backward on the CPU,
    ``p2c_attention_saved_fwd`` (the forward keeps the softmax numerators for a backward with one
    product fewer), up to :data:`SAVED_SCORES_MAX_BYTES`; else ``p2c_attention_fwd``."""
    if _keeps_scores(q, k, v):
        return torch.ops.paca_kernels.p2c_attention_saved_fwd(q, k, v, scale)[0]
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
