"""The fused convolutional clustering head (inference): ``torch.ops.paca_kernels.conv_cluster_logits``.

The official P2CConv2d head is depthwise k×k conv, GELU, 1×1 conv, GELU, 1×1 conv to M channels. Run
as four PyTorch ops it writes and re-reads three (B, C, H, W) intermediates and transposes the tokens
to NCHW first; the C++ kernel (csrc/cpu/fused/conv_cluster_logits.cpp) reads x (B, N, C) as the NHWC
image it already is and computes each band of image rows end to end in cache:

    logits[b, m, n] = (GELU(GELU(dwconv(x) + dw_b) · W1ᵀ + b1) · W2ᵀ + b2)[b, n, m]      (B, M, N)

The one-pass kernel has no backward. Where a gradient is wanted, :func:`conv_cluster_logits` runs
the head as a differentiable composition instead, in token layout (no transposes to NCHW):

    t0 = mlp_dwconv(x, dw_weight, dw_bias, gelu=True)      the depthwise conv + GELU, fused, with its
                                                           backward (ops/fused/mlp_dwconv.py)
    t1 = GELU(t0 · W1ᵀ + b1)                               the first 1×1 conv as a matrix product
    logits = W2 · t1ᵀ (+ b2)                               the second, straight into (B, M, N)

which is what :class:`~paca_kernels.nn.PaCaAttention` trains through on the cpu backend
(:func:`paca_kernels.nn._fusion.plan_attention`). The fake kernel makes the op traceable by
``torch.compile``; the FLOP formula counts it like the three convolutions it replaces, so
``FlopCounterMode`` totals do not change.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from ... import _ext
from . import mlp_dwconv as _dwconv
from ._common import autocast_input

__all__ = ["DIFFERENTIABLE", "REGISTERED", "conv_cluster_logits", "conv_cluster_logits_train", "head_flops"]

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

    @register_flop_formula(op)
    def _flops(x_shape, H, W, dw_shape, dwb_shape, w1_shape, b1_shape, w2_shape, *args, **kwargs) -> int:
        return head_flops(x_shape, dw_shape, w1_shape, w2_shape)

    return True


REGISTERED = _register()
#: Whether :func:`conv_cluster_logits` can run with gradients (through ``mlp_dwconv``'s backward).
DIFFERENTIABLE = _dwconv.DIFFERENTIABLE


class _GradWithStrides(torch.autograd.Function):
    """Identity whose backward gives the gradient its input's strides (the 1×1 conv weights' grads
    arrive through a reshape, contiguous: see :func:`.mlp_dwconv.with_strides_of`)."""

    @staticmethod
    def forward(ctx, t: Tensor) -> Tensor:  # type: ignore[override]
        ctx.shape, ctx.strides = t.shape, t.stride()
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        if grad.stride() == ctx.strides:
            return grad
        return grad.new_empty_strided(ctx.shape, ctx.strides).copy_(grad)


def conv_cluster_logits_train(
    x: Tensor, H: int, W: int, dw_weight: Tensor, dw_bias: Tensor | None, w1: Tensor, b1: Tensor | None,
    w2: Tensor, b2: Tensor | None,
) -> Tensor:
    """The head as a differentiable composition in token layout (module docstring): the depthwise
    conv + GELU as ``mlp_dwconv`` (float32/float64 backward kernel), the 1×1 convs as matrix
    products. Arguments and result as :func:`conv_cluster_logits`, but the (B, M, N) logits are a
    view of a contiguous (B, N, M): patch-major, strides (N·M, 1, M), as a channels-last 1×1
    convolution gives them."""
    c, m = x.shape[2], w2.shape[0]
    t0 = _dwconv.mlp_dwconv(x, H, W, dw_weight, dw_bias, None, False, True)
    if w1.requires_grad:
        w1 = _GradWithStrides.apply(w1)
    if w2.requires_grad:
        w2 = _GradWithStrides.apply(w2)
    t1 = F.gelu(F.linear(t0, w1.reshape(c, c), b1))
    # Patch-major: cluster_pool reads that layout and returns its gradient in it, so neither pass
    # copies the logits. torch.matmul((M, C), (B, C, N)) had run the same (B·N, C)·(C, M) product,
    # then copied its transpose into a contiguous (B, M, N), and its backward copied the gradient
    # back (10 MB each way per head at PaCa-ViT-Tiny's first stage, B = 8).
    logits = F.linear(t1, w2.reshape(m, c)).transpose(1, 2)
    return logits if b2 is None else logits + b2[:, None]


def conv_cluster_logits(
    x: Tensor, H: int, W: int, dw_weight: Tensor, dw_bias: Tensor | None, w1: Tensor, b1: Tensor | None,
    w2: Tensor, b2: Tensor | None,
) -> Tensor:
    """Logits (B, M, N) of the conv clustering head for tokens x (B, N, C) on an H×W grid: through
    the fused kernel, or, where a gradient is wanted through x or a parameter, through
    :func:`conv_cluster_logits_train` (float32/float64).

    Args:
        x: (B, N, C) tokens, N = H·W.
        dw_weight, dw_bias: (C, 1, k, k) and (C,) of the depthwise conv ("same" zero padding, k odd).
        w1, b1: (C1, C, 1, 1) and (C1,) of the first 1×1 conv.
        w2, b2: (M, C1, 1, 1) and (M,) of the second 1×1 conv.
    """
    if torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, dw_weight, dw_bias, w1, b1, w2, b2)
    ):
        return conv_cluster_logits_train(x, H, W, dw_weight, dw_bias, w1, b1, w2, b2)
    return torch.ops.paca_kernels.conv_cluster_logits(autocast_input(x), H, W, dw_weight, dw_bias, w1, b1, w2, b2)
