"""cluster_pool as ``torch.library`` ops: fake kernels, autograd, FLOP formulas, and the backends' entry points.

The C++ schemas live in ``csrc/registration.cpp`` (namespace ``paca_kernels``; CPU kernels in
csrc/cpu/cluster_pool.cpp, CUDA kernels in csrc/cuda/cluster_pool.cu):

- ``cluster_pool_fwd(logits, x, weight?, bias?, eps) -> (out, pooled, stats)``: out (B, M, C) in x's
  dtype; pooled (B, M, C) = softmax(logits)·x before the LayerNorm and stats (B, M, 2) = (row max
  m = max_n logits, row sum s = Σ_n exp(logits − m)), both in the accumulation dtype (float64 for
  float64 inputs, float32 otherwise), kept for the backward.
- ``cluster_pool_bwd(grad_out, logits, x, weight?, pooled, stats, eps) -> (dlogits, dx, dweight, dbias)``.

Backward math (one streaming pass over N in the fused kernels). With P the pooled tokens, x̂ their
normalised form and S = exp(logits − m) / s:

    dP        = rstd · (g − mean_c g − x̂ · mean_c(g·x̂)),   g = grad_out · weight
    dlogits   = S ∘ (dP·xᵀ − rowsum(S ∘ dP·xᵀ)),   and rowsum(S ∘ dP·xᵀ) = Σ_c dP·P (no extra pass)
    dx        = Sᵀ·dP,   dweight = Σ grad_out·x̂,   dbias = Σ grad_out

Why m and s rather than lse = m + log s: logits − m is exact in floating point, so S is recomputed as
accurately as torch.softmax computes it, whatever the logits' magnitude; exp(logits − lse) would carry
lse's rounding, |lse|·2⁻²⁴ relative in float32 (2e-4 at the logits of 1e4 that small-temperature
clustering heads reach), into S and so into dlogits and dx.

The Triton kernels (paca_kernels/triton/cluster_pool.py) have twin ops with the same outputs, defined
here when Triton imports: ``cluster_pool_fwd_triton`` and ``cluster_pool_bwd_triton``. Their bodies
launch on the inputs' strides, so nothing is copied (not even stride-0 gradients).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _ext
from ..reference import layer_norm_stats
from ..triton import TRITON_AVAILABLE
from ._registration import register_cluster_pool

__all__ = ["REGISTERED", "cluster_pool_backward_math", "cluster_pool_cpp", "cluster_pool_triton"]

_LIB = "paca_kernels"


def cluster_pool_backward_math(
    grad_out: Tensor,
    logits: Tensor,
    x: Tensor,
    weight: Tensor | None,
    pooled: Tensor,
    stats: Tensor,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The cluster_pool backward in plain PyTorch, in the accumulation dtype (see module docstring).

    The unfused statement of what the fused kernels compute (the C++ CPU kernel of ``cluster_pool_bwd``
    lives in csrc/cpu/cluster_pool.cpp); kept as a readable specification and for debugging.
    Returns dlogits (B, M, N), dx (B, N, C), dweight (C,), dbias (C,).
    """
    acc = pooled.dtype
    g_out = grad_out.to(acc)
    # Overflow-free LayerNorm statistics (reference.layer_norm_stats, the kernels' rule).
    inv_scale, mean, rstd_q = layer_norm_stats(pooled, eps)
    xhat = (pooled * inv_scale - mean) * rstd_q
    rstd = rstd_q * inv_scale
    dweight = (g_out * xhat).sum((0, 1))
    dbias = g_out.sum((0, 1))
    g = g_out * weight.to(acc) if weight is not None else g_out
    dpooled = rstd * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))
    s = torch.exp(logits.to(acc) - stats[..., :1]) / stats[..., 1:]  # (B, M, N)
    xa = x.to(acc)
    ds = torch.matmul(dpooled, xa.transpose(1, 2))  # (B, M, N)
    rowdot = (dpooled * pooled).sum(-1, keepdim=True)  # (B, M, 1) = rowsum(S ∘ dS)
    dlogits = s * (ds - rowdot)
    dx = torch.matmul(s.transpose(1, 2), dpooled)  # (B, N, C)
    pdtype = weight.dtype if weight is not None else x.dtype
    return dlogits.to(logits.dtype), dx.to(x.dtype), dweight.to(pdtype), dbias.to(pdtype)


def _register() -> bool:
    """Attach the Python pieces to the C++ schemas; False when the extension is unavailable."""
    if not _ext.load():
        return False
    register_cluster_pool(f"{_LIB}::cluster_pool_fwd", f"{_LIB}::cluster_pool_bwd", cpp=True)
    return True


REGISTERED = _register()


def cluster_pool_cpp(
    logits: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> Tensor:
    """The C++ backend: ``torch.ops.paca_kernels.cluster_pool_fwd`` (differentiable)."""
    return torch.ops.paca_kernels.cluster_pool_fwd(logits, x, weight, bias, eps)[0]


if TRITON_AVAILABLE:
    from ..triton import cluster_pool as _kernels

    @torch.library.custom_op(f"{_LIB}::cluster_pool_fwd_triton", mutates_args=())
    def cluster_pool_fwd_triton(
        logits: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        """LayerNorm(softmax(logits over N)·x): out (B, M, C), pooled (B, M, C) fp32, stats (B, M, 2) fp32."""
        return _kernels.cluster_pool_fwd(logits, x, weight, bias, eps)

    @torch.library.custom_op(f"{_LIB}::cluster_pool_bwd_triton", mutates_args=())
    def cluster_pool_bwd_triton(
        grad_out: Tensor,
        logits: Tensor,
        x: Tensor,
        weight: Tensor | None,
        pooled: Tensor,
        stats: Tensor,
        eps: float,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """dlogits (B, M, N), dx (B, N, C), dweight (C,), dbias (C,) of cluster_pool."""
        return _kernels.cluster_pool_bwd(grad_out, logits, x, weight, pooled, stats, eps)

    # Fake kernels, autograd and FLOP formulas shared with the C++ ops (same outputs, same dtypes).
    register_cluster_pool(f"{_LIB}::cluster_pool_fwd_triton", f"{_LIB}::cluster_pool_bwd_triton")


def cluster_pool_triton(
    logits: Tensor, x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-6
) -> Tensor:
    """The Triton backend: ``torch.ops.paca_kernels.cluster_pool_fwd_triton`` (differentiable);
    logits (B, M, N), x (B, N, C) -> (B, M, C)."""
    return torch.ops.paca_kernels.cluster_pool_fwd_triton(logits, x, weight, bias, eps)[0]
