"""The fused convolutional clustering head (inference): ``torch.ops.paca_kernels.conv_cluster_logits``.

The official P2CConv2d head is depthwise k×k conv, GELU, 1×1 conv, GELU, 1×1 conv to M channels. Run
as four PyTorch ops it writes and re-reads three (B, C, H, W) intermediates and transposes the tokens
to NCHW first; the C++ kernel (csrc/cpu/fused/conv_cluster_logits.cpp) reads x (B, N, C) as the NHWC
image it already is and computes each band of image rows end to end in cache:

    logits[b, m, n] = (GELU(GELU(dwconv(x) + dw_b) · W1ᵀ + b1) · W2ᵀ + b2)[b, n, m]      (B, M, N)

It has no backward: :class:`~paca_kernels.nn.PaCaAttention` uses it only when no gradient is needed,
and its modules otherwise. The fake kernel makes it traceable by ``torch.compile``; the FLOP formula
counts it like the three convolutions it replaces, so ``FlopCounterMode`` totals do not change.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from ... import _ext
from ._common import autocast_input, register_inference_only

__all__ = ["REGISTERED", "conv_cluster_logits", "head_flops"]

_LIB = "paca_kernels"


def head_flops(x_shape, dw_shape, w1_shape, w2_shape) -> int:
    """What FlopCounterMode counts for the head's three convolutions (biases are not counted)."""
    b, n, c = x_shape
    return 2 * b * n * c * (dw_shape[2] * dw_shape[3] + w1_shape[0] + w2_shape[0])


def _register() -> bool:
    if not _ext.load():
        return False
    op = torch.ops.paca_kernels.conv_cluster_logits

    @torch.library.register_fake(f"{_LIB}::conv_cluster_logits")
    def _fake(x, H, W, dw_weight, dw_bias, w1, b1, w2, b2):
        return x.new_empty(x.shape[0], w2.shape[0], x.shape[1])

    register_inference_only(
        "conv_cluster_logits", "PaCaAttention runs the clustering head's modules when gradients are needed"
    )

    @register_flop_formula(op)
    def _flops(x_shape, H, W, dw_shape, dwb_shape, w1_shape, b1_shape, w2_shape, *args, **kwargs) -> int:
        return head_flops(x_shape, dw_shape, w1_shape, w2_shape)

    return True


REGISTERED = _register()


def conv_cluster_logits(
    x: Tensor, H: int, W: int, dw_weight: Tensor, dw_bias: Tensor | None, w1: Tensor, b1: Tensor | None,
    w2: Tensor, b2: Tensor | None,
) -> Tensor:
    """Logits (B, M, N) of the conv clustering head for tokens x (B, N, C) on an H×W grid, through
    the fused kernel (no autograd).

    Args:
        x: (B, N, C) tokens, N = H·W.
        dw_weight, dw_bias: (C, 1, k, k) and (C,) of the depthwise conv ("same" zero padding, k odd).
        w1, b1: (C1, C, 1, 1) and (C1,) of the first 1×1 conv.
        w2, b2: (M, C1, 1, 1) and (M,) of the second 1×1 conv.
    """
    return torch.ops.paca_kernels.conv_cluster_logits(autocast_input(x), H, W, dw_weight, dw_bias, w1, b1, w2, b2)
