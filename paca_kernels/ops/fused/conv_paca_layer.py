"""A whole PaCa layer in inference as one op: ``torch.ops.paca_kernels.conv_paca_layer``.

With the conv clustering head, a LayerNorm on the cluster tokens and plain projections, a PaCa layer
in inference on the cpu backend is three fused kernels in sequence::

    logits = conv_cluster_logits(x)                            (B, M, N)   fused.conv_cluster_logits
    c      = cluster_pool(logits, x) (LayerNorm epilogue)      (B, M, C)   ops.cluster_pool
    out    = p2c_attention_proj(x, c) (q/k/v, attention, proj) (B, N, C)   fused.p2c_attention_proj

plus z = softmax(logits over N), which the official layer returns. The C++ op
(csrc/cpu/fused/conv_paca_layer.cpp) calls the three kernels directly and computes z in one parallel
pass over the logits, as torch.softmax does (exp(l − max), times 1 / sum). The Python between the
kernels (module walks, backend selection, three dispatches and a torch.softmax) ran on the calling
thread while the other threads waited, 2-3.5 % of the layer's time at PaCa-ViT-Tiny's stages 2-3.

It has no backward: :class:`~paca_kernels.nn.PaCaAttention` uses it only when no gradient is needed,
and its modules and autograd ops otherwise. The fake kernel makes it traceable by ``torch.compile``;
the FLOP formula counts it like the ops it replaces, so ``FlopCounterMode`` totals do not change.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from ... import _ext
from ._common import autocast_input
from .conv_cluster_logits import head_flops
from .p2c_attention_proj import attention_proj_flops

__all__ = ["REGISTERED", "conv_paca_layer"]

_LIB = "paca_kernels"


def _register() -> bool:
    if not _ext.load() or not hasattr(torch.ops.paca_kernels, "conv_paca_layer"):
        return False
    op = torch.ops.paca_kernels.conv_paca_layer

    @torch.library.register_fake(f"{_LIB}::conv_paca_layer")
    def _fake(x, H, W, dw_weight, dw_bias, w1, b1, w2, b2, norm_weight, norm_bias, eps, q_weight,
              q_bias, k_weight, k_bias, v_weight, v_bias, proj_weight, proj_bias, num_heads, scale,
              probs, residual=None):
        b, n = x.shape[:2]
        dtype = residual.dtype if residual is not None else x.dtype
        return x.new_empty((b, n, proj_weight.shape[0]), dtype=dtype), x.new_empty((b, w2.shape[0], n))

    @register_flop_formula(op)
    def _flops(x_shape, H, W, dw_shape, dwb_shape, w1_shape, b1_shape, w2_shape, b2_shape,
               nw_shape, nb_shape, eps, wq_shape, bq_shape, wk_shape, bk_shape, wv_shape, bv_shape,
               wp_shape, *args, **kwargs) -> int:
        # What FlopCounterMode counts for the ops it replaces: the head's convolutions, the
        # pooling's bmm (2·B·M·N·C, as cluster_pool's formula), and the attention with projections.
        b, n, c = x_shape
        m = w2_shape[0]
        return (head_flops(x_shape, dw_shape, w1_shape, w2_shape) + 2 * b * m * n * c
                + attention_proj_flops(x_shape, m, wq_shape, wp_shape))

    return True


REGISTERED = _register()


def conv_paca_layer(
    x: Tensor, H: int, W: int,
    head: tuple[Tensor, Tensor | None, Tensor, Tensor | None, Tensor, Tensor | None],
    norm: tuple[Tensor | None, Tensor | None, float],
    attention: tuple[Tensor, Tensor | None, Tensor, Tensor | None, Tensor, Tensor | None, Tensor, Tensor | None],
    num_heads: int, scale: float, probs: bool, residual: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The inference forward of a PaCa layer as one op (no autograd, no dropout).

    Args:
        x: (B, N, C) patch tokens of an H×W grid.
        head: the conv head's (dw_weight, dw_bias, w1, b1, w2, b2), as :func:`.conv_cluster_logits`.
        norm: the cluster tokens' LayerNorm (weight (C,) or None, bias (C,) or None, eps).
        attention: (q_weight, q_bias, k_weight, k_bias, v_weight, v_bias, proj_weight, proj_bias), as
            :func:`.p2c_attention_proj`.
        num_heads, scale: the attention's heads and score scale.
        probs: return z = softmax(logits over N) (True) or the logits.
        residual: (B, N, Co) or None: added to out as by :func:`.p2c_attention_proj`.

    Returns:
        (out (B, N, Co), in the residual's dtype when given, z or logits (B, M, N)).
    """
    return torch.ops.paca_kernels.conv_paca_layer(
        autocast_input(x), H, W, *head, *norm, *attention, num_heads, scale, probs, residual
    )
