"""p2c_attention as a ``torch.library`` op: fake kernels, autograd, FLOP formulas, and the C++ backend.

The schemas live in ``csrc/registration.cpp`` (namespace ``paca_kernels``):

- ``p2c_attention_fwd(q, k, v, scale) -> (out, lse)``: q (B, N, h, d), k and v (B, M, h, d); out
  (B, N, h, d) in q's dtype, lse (B, h, N) = logsumexp over M of the scaled scores, in the accumulation
  dtype (float64 for float64 inputs, float32 otherwise), kept for the backward.
- ``p2c_attention_bwd(grad_out, q, k, v, out, lse, scale, deterministic) -> (dq, dk, dv)``.

Backward math (P = softmax(q·kᵀ·scale over M) recomputed from q, k and lse):

    D = rowsum(dO ∘ O),   dS = P ∘ (dO·vᵀ − D)
    dq = dS·k·scale,   dk = dSᵀ·q·scale,   dv = Pᵀ·dO   (the last two summed over N)
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from .. import _ext
from .cluster_pool import acc_dtype

_LIB = "paca_kernels"


def _fake_fwd(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    b, n, h, _ = q.shape
    out = q.new_empty(q.shape)
    return out, q.new_empty((b, h, n), dtype=acc_dtype(q.dtype))


def _fake_bwd(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    scale: float,
    deterministic: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out: Tensor, _grad_lse: Tensor | None):
    q, k, v, out, lse = ctx.saved_tensors
    # The CPU kernel's reduction over N is always in a fixed order; ask for determinism everywhere
    # on CPU so that the flag means the same thing to every kernel.
    deterministic = q.device.type == "cpu" or torch.are_deterministic_algorithms_enabled()
    dq, dk, dv = torch.ops.paca_kernels.p2c_attention_bwd(
        grad_out, q, k, v, out, lse, ctx.scale, deterministic
    )
    return dq, dk, dv, None


def _register() -> bool:
    """Attach the Python pieces to the C++ schemas; False when the extension is unavailable."""
    if not _ext.load():
        return False
    ns = torch.ops.paca_kernels
    torch.library.register_fake(f"{_LIB}::p2c_attention_fwd")(_fake_fwd)
    torch.library.register_fake(f"{_LIB}::p2c_attention_bwd")(_fake_bwd)
    torch.library.register_autograd(
        f"{_LIB}::p2c_attention_fwd", _backward, setup_context=_setup_context
    )

    # Counted like the unfused reference: two bmms forward (scores and attn·v, 2·B·h·N·M·d each),
    # and autograd of those two bmms backward (two bmms each).
    @register_flop_formula(ns.p2c_attention_fwd)
    def _fwd_flops(q_shape, k_shape, *args, **kwargs) -> int:
        b, n, h, d = q_shape
        return 4 * b * h * n * k_shape[1] * d

    @register_flop_formula(ns.p2c_attention_bwd)
    def _bwd_flops(grad_shape, q_shape, k_shape, *args, **kwargs) -> int:
        b, n, h, d = q_shape
        return 8 * b * h * n * k_shape[1] * d

    return True


REGISTERED = _register()


def p2c_attention_cpp(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """The C++ backend: ``torch.ops.paca_kernels.p2c_attention_fwd`` (differentiable); returns out."""
    return torch.ops.paca_kernels.p2c_attention_fwd(q, k, v, scale)[0]
