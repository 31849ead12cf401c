"""What every backend's raw ops share: fake kernels, autograd wiring and FLOP formulas.

The C++ ops (``cluster_pool_fwd``/``_bwd``, ``p2c_attention_fwd``/``_bwd``) and their Triton twins
(``*_triton``) have the same signatures and outputs, so each pair is registered from one place; the
CPU's training pair ``p2c_attention_saved_fwd``/``_bwd`` (the forward keeps the softmax
numerators for the backward) has its own, below the others.

FLOP formulas count like the unfused reference, so FlopCounterMode gives the same totals whatever the
backend: cluster_pool is one bmm forward (2·B·M·N·C) and two backward; p2c_attention two bmms
forward (q·kᵀ and P·v, 2·B·h·N·M·d each) and four backward.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

__all__ = ["acc_dtype", "dlogits_patch_major", "register_cluster_pool", "register_p2c_attention", "register_p2c_attention_saved"]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the kernels: float64 stays float64, everything else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# -- cluster_pool ------------------------------------------------------------------------------------


def _pool_fake_fwd(
    logits: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    b, m, _ = logits.shape
    c = x.shape[2]
    acc = acc_dtype(x.dtype)
    return x.new_empty((b, m, c)), x.new_empty((b, m, c), dtype=acc), x.new_empty((b, m, 2), dtype=acc)


def _pool_fake_bwd(
    grad_out: Tensor, logits: Tensor, x: Tensor, weight: Tensor | None, pooled: Tensor, stats: Tensor,
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


def dlogits_patch_major(logits: Tensor, x: Tensor) -> bool:
    """Whether the C++ CPU backward returns dlogits in the logits' patch-major orientation (strides
    (N·M, 1, M)) rather than contiguous: float32/float64, unit stride over M, M and N > 1 (its
    patch-major pass, csrc/cpu/cluster_pool.cpp ``dlogits_patch_major``: the same rule)."""
    _, m, n = logits.shape
    return (logits.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
            and logits.dtype == x.dtype and m > 1 and n > 1 and logits.stride(1) == 1)


def _pool_fake_bwd_cpp(
    grad_out: Tensor, logits: Tensor, x: Tensor, weight: Tensor | None, pooled: Tensor, stats: Tensor,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The C++ op's (CPU and CUDA kernels): as the others, but dlogits patch-major where the CPU
    kernel returns it so."""
    out = _pool_fake_bwd(grad_out, logits, x, weight, pooled, stats, eps)
    if dlogits_patch_major(logits, x):
        b, m, n = logits.shape
        return (logits.new_empty((b, n, m)).transpose(1, 2), *out[1:])
    return out


def _pool_setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    logits, x, weight, bias, eps = inputs
    _, pooled, stats = output
    ctx.save_for_backward(logits, x, weight, pooled, stats)
    ctx.eps = eps
    ctx.has_weight = weight is not None
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(pooled, stats)
    # No zero gradients made for the statistics (their grads are never read).
    ctx.set_materialize_grads(False)


def register_cluster_pool(fwd: str, bwd: str, cpp: bool = False) -> None:
    """Fake kernels, autograd (backward = the ``bwd`` op) and FLOP formulas for a cluster_pool pair,
    given their qualified names ("paca_kernels::cluster_pool_fwd", ...); ``cpp``: the C++ pair (whose
    CPU backward may return dlogits patch-major, :func:`dlogits_patch_major`)."""
    torch.library.register_fake(fwd)(_pool_fake_fwd)
    torch.library.register_fake(bwd)(_pool_fake_bwd_cpp if cpp else _pool_fake_bwd)
    bwd_op = _resolve(bwd)

    def backward(ctx: Any, grad_out: Tensor | None, _grad_pooled: Tensor | None, _grad_stats: Tensor | None):
        if grad_out is None:  # nothing flowed into out (grads are not materialized)
            return None, None, None, None, None
        logits, x, weight, pooled, stats = ctx.saved_tensors
        dlogits, dx, dweight, dbias = bwd_op(grad_out, logits, x, weight, pooled, stats, ctx.eps)
        return dlogits, dx, dweight if ctx.has_weight else None, dbias if ctx.has_bias else None, None

    torch.library.register_autograd(fwd, backward, setup_context=_pool_setup_context)

    @register_flop_formula(_resolve(fwd))
    def _fwd_flops(logits_shape, x_shape, *args, **kwargs) -> int:
        b, m, n = logits_shape
        return 2 * b * m * n * x_shape[2]

    @register_flop_formula(bwd_op)
    def _bwd_flops(grad_shape, logits_shape, x_shape, *args, **kwargs) -> int:
        b, m, n = logits_shape
        return 4 * b * m * n * x_shape[2]


# -- p2c_attention -----------------------------------------------------------------------------------


def _p2c_fake_fwd(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    b, n, h, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((b, h, n), dtype=acc_dtype(q.dtype))


def _p2c_fake_bwd(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, scale: float, deterministic: bool
) -> tuple[Tensor, Tensor, Tensor]:
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _p2c_setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    # Only the inputs are saved: the backward recomputes the scores and their softmax statistics
    # itself (the forward's fp32 lse and its rounded output would put noise proportional to |s| into
    # the gradients where scores are large; see the kernels' backward notes).
    q, k, v, scale = inputs
    _, lse = output
    ctx.save_for_backward(q, k, v)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # no zero gradient made for lse


def _register_p2c_flops(fwd_op: Any, bwd_op: Any) -> None:
    """The FLOP formulas of a p2c_attention pair (both take q, k first): the composition's, two
    products forward (4·B·h·N·M·d) and four backward."""

    @register_flop_formula(fwd_op)
    def _fwd_flops(q_shape, k_shape, *args, **kwargs) -> int:
        b, n, h, d = q_shape
        return 4 * b * h * n * k_shape[1] * d

    @register_flop_formula(bwd_op)
    def _bwd_flops(grad_shape, q_shape, k_shape, *args, **kwargs) -> int:
        b, n, h, d = q_shape
        return 8 * b * h * n * k_shape[1] * d


def register_p2c_attention(fwd: str, bwd: str, deterministic: Callable[[Tensor], bool]) -> None:
    """Fake kernels, autograd and FLOP formulas for a p2c_attention pair; ``deterministic(q)`` gives
    the backward's flag (fixed-order dk/dv reduction) at backward time."""
    torch.library.register_fake(fwd)(_p2c_fake_fwd)
    torch.library.register_fake(bwd)(_p2c_fake_bwd)
    bwd_op = _resolve(bwd)

    def backward(ctx: Any, grad_out: Tensor | None, _grad_lse: Tensor | None):
        if grad_out is None:  # nothing flowed into out (grads are not materialized)
            return None, None, None, None
        q, k, v = ctx.saved_tensors
        dq, dk, dv = bwd_op(grad_out, q, k, v, ctx.scale, deterministic(q))
        return dq, dk, dv, None

    torch.library.register_autograd(fwd, backward, setup_context=_p2c_setup_context)

    _register_p2c_flops(_resolve(fwd), bwd_op)


def _resolve(qualname: str) -> Any:
    ns, name = qualname.split("::")
    return getattr(getattr(torch.ops, ns), name)


def _p2c_fake_saved_fwd(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    b, n, h, _ = q.shape
    acc = acc_dtype(q.dtype)
    return q.new_empty(q.shape), q.new_empty((b, h, n, k.shape[1]), dtype=acc), q.new_empty((b, h, n), dtype=acc)


def _p2c_fake_saved_bwd(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, exp_scores: Tensor, exp_sums: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _p2c_saved_setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    # The softmax numerators e = exp(s - rowmax s) and their row sums, exactly as the backward that
    # recomputes them would get them (same products, same row kernels), so its gradients are bit
    # for bit those of the recomputing pair; q, k, v for dq, dk, dv.
    q, k, v, scale = inputs
    _, exp_scores, exp_sums = output
    ctx.save_for_backward(q, k, v, exp_scores, exp_sums)
    ctx.scale = scale
    ctx.mark_non_differentiable(exp_scores, exp_sums)
    # No zero gradients made for them: a (B, h, N, M) zero fill per call (20 MB at PaCa-ViT-Tiny's
    # first stage, B = 8) cost as much as a third of the backward.
    ctx.set_materialize_grads(False)


def register_p2c_attention_saved(fwd: str, bwd: str) -> None:
    """Fake kernels, autograd and FLOP formulas of the saving pair: ``fwd(q, k, v, scale) -> (out,
    exp_scores (B, h, N, M), exp_sums (B, h, N))`` and ``bwd(grad_out, q, k, v, exp_scores, exp_sums,
    scale) -> (dq, dk, dv)``. Counted as the other pair (the FLOPs of the composition: two products
    forward, four backward), though its backward runs three products and the score recompute is gone."""
    torch.library.register_fake(fwd)(_p2c_fake_saved_fwd)
    torch.library.register_fake(bwd)(_p2c_fake_saved_bwd)
    bwd_op = _resolve(bwd)

    def backward(ctx: Any, grad_out: Tensor | None, _g_scores: Tensor | None, _g_sums: Tensor | None):
        if grad_out is None:  # nothing flowed into out (grads are not materialized)
            return None, None, None, None
        q, k, v, exp_scores, exp_sums = ctx.saved_tensors
        dq, dk, dv = bwd_op(grad_out, q, k, v, exp_scores, exp_sums, ctx.scale)
        return dq, dk, dv, None

    torch.library.register_autograd(fwd, backward, setup_context=_p2c_saved_setup_context)

    _register_p2c_flops(_resolve(fwd), bwd_op)
