"""cluster_pool as a ``torch.library`` op: fake kernel, autograd, FLOP formula, and its backends.

The schemas live in ``csrc/registration.cpp`` (namespace ``paca_kernels``):

- ``cluster_pool_fwd(logits, x, weight?, bias?, eps) -> (out, pooled, lse)``: out (B, M, C) in x's dtype;
  pooled (B, M, C) = softmax(logits)·x before the LayerNorm and lse (B, M) = logsumexp over N, both in
  the accumulation dtype (float64 for float64 inputs, float32 otherwise), kept for the backward.
- ``cluster_pool_bwd(grad_out, logits, x, weight?, pooled, lse, eps) -> (dlogits, dx, dweight, dbias)``.

Backward math (one streaming pass over N in the fused kernels). With P the pooled tokens, x̂ their
normalised form and S = exp(logits − lse):

    dP        = rstd · (g − mean_c g − x̂ · mean_c(g·x̂)),   g = grad_out · weight
    dlogits   = S ∘ (dP·xᵀ − rowsum(S ∘ dP·xᵀ)),   and rowsum(S ∘ dP·xᵀ) = Σ_c dP·P (no extra pass)
    dx        = Sᵀ·dP,   dweight = Σ grad_out·x̂,   dbias = Σ grad_out
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from .. import _ext

_LIB = "paca_kernels"


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the kernels: float64 stays float64, everything else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def cluster_pool_backward_math(
    grad_out: Tensor,
    logits: Tensor,
    x: Tensor,
    weight: Tensor | None,
    pooled: Tensor,
    lse: Tensor,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The cluster_pool backward in plain PyTorch, in the accumulation dtype (see module docstring).

    The unfused statement of what the fused kernels compute (the C++ CPU kernel of ``cluster_pool_bwd``
    lives in csrc/cpu/cluster_pool.cpp); kept as a readable specification and for debugging.
    Returns dlogits (B, M, N), dx (B, N, C), dweight (C,), dbias (C,).
    """
    acc = pooled.dtype
    g_out = grad_out.to(acc)
    mean = pooled.mean(-1, keepdim=True)
    rstd = torch.rsqrt(pooled.var(-1, unbiased=False, keepdim=True) + eps)
    xhat = (pooled - mean) * rstd
    dweight = (g_out * xhat).sum((0, 1))
    dbias = g_out.sum((0, 1))
    g = g_out * weight.to(acc) if weight is not None else g_out
    dpooled = rstd * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))
    s = torch.exp(logits.to(acc) - lse.unsqueeze(-1))  # (B, M, N)
    xa = x.to(acc)
    ds = torch.matmul(dpooled, xa.transpose(1, 2))  # (B, M, N)
    rowdot = (dpooled * pooled).sum(-1, keepdim=True)  # (B, M, 1) = rowsum(S ∘ dS)
    dlogits = s * (ds - rowdot)
    dx = torch.matmul(s.transpose(1, 2), dpooled)  # (B, N, C)
    pdtype = weight.dtype if weight is not None else x.dtype
    return dlogits.to(logits.dtype), dx.to(x.dtype), dweight.to(pdtype), dbias.to(pdtype)


def _fake_fwd(
    logits: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    b, m, _ = logits.shape
    c = x.shape[2]
    acc = acc_dtype(x.dtype)
    out = x.new_empty((b, m, c))
    return out, x.new_empty((b, m, c), dtype=acc), x.new_empty((b, m), dtype=acc)


def _fake_bwd(
    grad_out: Tensor,
    logits: Tensor,
    x: Tensor,
    weight: Tensor | None,
    pooled: Tensor,
    lse: Tensor,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    c = x.shape[2]
    pdtype = weight.dtype if weight is not None else x.dtype
    return (
        torch.empty_like(logits, memory_format=torch.contiguous_format),
        torch.empty_like(x, memory_format=torch.contiguous_format),
        x.new_empty((c,), dtype=pdtype),
        x.new_empty((c,), dtype=pdtype),
    )


def _setup_context(ctx, inputs, output) -> None:
    logits, x, weight, bias, eps = inputs
    _, pooled, lse = output
    ctx.save_for_backward(logits, x, weight, pooled, lse)
    ctx.eps = eps
    ctx.has_weight = weight is not None
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(pooled, lse)


def _backward(ctx, grad_out: Tensor, _grad_pooled: Tensor | None, _grad_lse: Tensor | None):
    logits, x, weight, pooled, lse = ctx.saved_tensors
    dlogits, dx, dweight, dbias = torch.ops.paca_kernels.cluster_pool_bwd(
        grad_out, logits, x, weight, pooled, lse, ctx.eps
    )
    return (
        dlogits,
        dx,
        dweight if ctx.has_weight else None,
        dbias if ctx.has_bias else None,
        None,
    )


def _register() -> bool:
    """Attach the Python pieces to the C++ schemas; False when the extension is unavailable."""
    if not _ext.load():
        return False
    ns = torch.ops.paca_kernels
    torch.library.register_fake(f"{_LIB}::cluster_pool_fwd")(_fake_fwd)
    torch.library.register_fake(f"{_LIB}::cluster_pool_bwd")(_fake_bwd)
    torch.library.register_autograd(
        f"{_LIB}::cluster_pool_fwd", _backward, setup_context=_setup_context
    )

    # FlopCounterMode counts these like their unfused equivalents: the forward is one bmm
    # (2·B·M·N·C), the backward two (dS = dP·xᵀ and dx = Sᵀ·dP), as autograd of bmm would count.
    @register_flop_formula(ns.cluster_pool_fwd)
    def _fwd_flops(logits_shape, x_shape, *args, **kwargs) -> int:
        b, m, n = logits_shape
        return 2 * b * m * n * x_shape[2]

    @register_flop_formula(ns.cluster_pool_bwd)
    def _bwd_flops(grad_shape, logits_shape, x_shape, *args, **kwargs) -> int:
        b, m, n = logits_shape
        return 4 * b * m * n * x_shape[2]

    return True


REGISTERED = _register()


def cluster_pool_cpp(
    logits: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> Tensor:
    """The C++ backend: ``torch.ops.paca_kernels.cluster_pool_fwd`` (differentiable)."""
    return torch.ops.paca_kernels.cluster_pool_fwd(logits, x, weight, bias, eps)[0]
