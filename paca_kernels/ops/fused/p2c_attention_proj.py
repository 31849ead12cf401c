"""The fused attention of a PaCa layer (inference): ``torch.ops.paca_kernels.p2c_attention_proj``.

After the pooling, a PaCa layer is five ops through PyTorch, the patch-sized ones writing a (B, N, C)
tensor to memory that the next one reads back:

    q = x · Wqᵀ + bq,  k = c · Wkᵀ + bk,  v = c · Wvᵀ + bv,
    o = softmax(q · kᵀ · scale over M) · v  (per head),  out = o · Wpᵀ + bp

and each linear with a bias first broadcasts its bias into a freshly allocated output. The C++ kernel
(csrc/cpu/fused/p2c_attention_proj.cpp) computes k and v of the M cluster tokens straight into the
per-head layout the attention reads, then takes each block of query rows through the whole chain, all
heads, in cache: the only tensor it writes is ``out`` (B, N, Co).

It has no backward: :class:`~paca_kernels.nn.PaCaAttention` uses it only when no gradient is needed,
and its modules otherwise. The fake kernel makes it traceable by ``torch.compile``; the FLOP formula
counts it like the four linears and the attention it replaces, so ``FlopCounterMode`` totals do not
change.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from ... import _ext
from ._common import autocast_input

__all__ = ["REGISTERED", "attention_proj_flops", "p2c_attention_proj"]

_LIB = "paca_kernels"


def attention_proj_flops(x_shape, m: int, wq_shape, wp_shape) -> int:
    """What FlopCounterMode counts for the q, k, v linears (k and v over m cluster tokens), the
    attention's two matmuls and the output projection."""
    b, n, c = x_shape
    hd = wq_shape[0]
    return 2 * b * (n + 2 * m) * c * hd + 4 * b * n * m * hd + 2 * b * n * hd * wp_shape[0]


def _register() -> bool:
    if not _ext.load() or not hasattr(torch.ops.paca_kernels, "p2c_attention_proj"):
        return False
    op = torch.ops.paca_kernels.p2c_attention_proj

    @torch.library.register_fake(f"{_LIB}::p2c_attention_proj")
    def _fake(x, c, q_weight, q_bias, k_weight, k_bias, v_weight, v_bias, proj_weight, proj_bias,
              num_heads, scale, residual=None):
        dtype = residual.dtype if residual is not None else x.dtype
        return x.new_empty((*x.shape[:2], proj_weight.shape[0]), dtype=dtype)

    @register_flop_formula(op)
    def _flops(x_shape, c_shape, wq_shape, bq_shape, wk_shape, bk_shape, wv_shape, bv_shape, wp_shape,
               *args, **kwargs) -> int:
        return attention_proj_flops(x_shape, c_shape[1], wq_shape, wp_shape)

    return True


REGISTERED = _register()


def p2c_attention_proj(
    x: Tensor, c: Tensor, q_weight: Tensor, q_bias: Tensor | None, k_weight: Tensor, k_bias: Tensor | None,
    v_weight: Tensor, v_bias: Tensor | None, proj_weight: Tensor, proj_bias: Tensor | None,
    num_heads: int, scale: float, residual: Tensor | None = None,
) -> Tensor:
    """``proj(p2c_attention(q(x), k(c), v(c)))`` through the fused kernel (no autograd, no dropout),
    plus ``residual`` when given.

    Args:
        x: (B, N, C) patch tokens; c: (B, M, C) cluster tokens.
        q_weight, k_weight, v_weight: (h·d, C) with biases (h·d,) or None.
        proj_weight, proj_bias: (Co, h·d) and (Co,) or None.
        num_heads: h; scale: the score scale (d^-1/2 in PaCa).
        residual: (B, N, Co) or None: a pre-norm block's residual stream, added to the result
            rounded to x's dtype (as the proj module gives it), in the residual's dtype (x's, or
            float32: autocast's stream).

    Returns:
        (B, N, Co), in the residual's dtype when given.
    """
    return torch.ops.paca_kernels.p2c_attention_proj(
        autocast_input(x), autocast_input(c), q_weight, q_bias, k_weight, k_bias, v_weight, v_bias, proj_weight,
        proj_bias, num_heads, scale, residual,
    )
