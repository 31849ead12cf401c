"""A PaCa-ViT stem or stage transition in one pass (inference): ``torch.ops.paca_kernels.patch_embed``.

``DownsampleV1`` (the stem and the stage transitions) is a strided k×k convolution followed by a
LayerNorm over the output channels, on pixels that are channels-last in memory (the tokens of the
previous stage viewed as an image). Through PyTorch that is a oneDNN convolution, which reorders its
weight to a blocked layout on every call, two permutes and a LayerNorm over a strided view. The C++
kernel (csrc/cpu/fused/patch_embed.cpp) gathers each block of output pixels' input patches tap by tap
(contiguous runs of channels), multiplies them by the weight packed once in the same tap-major order
(kept across calls while the parameter is unchanged), adds the bias and normalises the rows while
they are in cache. Channels last in, channels last (contiguous) out.

Measured (2 threads, Xeon, interleaved rounds, in the whole model: DownsampleV1 fused vs its
modules): PaCa-ViT-Tiny 1.03× (fp32) / 1.07× (bf16) at B = 1, 1.04× / 1.06× at B = 8; Small
1.00× / 1.04× at B = 1. By layer, against conv2d + LayerNorm in isolation: 1.4-2.8× at B = 1 and
0.86-1.18× at B = 8 for channels-last input; the stem's first conv, which reads the user's NCHW
image, 3-4× at every batch size (oneDNN's convolution of an NCHW image with 3 channels is slow).
:func:`paca_kernels.nn._fusion.plan_downsample` takes it at every size.

No backward: the module runs its convolution and norm whenever gradients are needed. The FLOP formula
counts it as the convolution (FlopCounterMode counts no LayerNorm), so totals do not change.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from ... import _ext
from ._common import autocast_input

__all__ = ["REGISTERED", "patch_embed"]

_LIB = "paca_kernels"


def _out_shape(x_shape, w_shape, stride: int, padding: int) -> tuple[int, int, int, int]:
    b, h, w, _ = x_shape
    k = w_shape[2]
    return b, (h + 2 * padding - k) // stride + 1, (w + 2 * padding - k) // stride + 1, w_shape[0]


def _register() -> bool:
    if not _ext.load() or not hasattr(torch.ops.paca_kernels, "patch_embed"):
        return False
    op = torch.ops.paca_kernels.patch_embed

    @torch.library.register_fake(f"{_LIB}::patch_embed")
    def _fake(x, weight, bias, stride, padding, norm, norm_weight, norm_bias, eps):
        torch._check(x.dim() == 4 and weight.dim() == 4, lambda: "patch_embed: x and weight must be 4-D")
        return x.new_empty(_out_shape(x.shape, weight.shape, stride, padding))

    @register_flop_formula(op)
    def _flops(x_shape, w_shape, bias_shape, stride, padding, *args, **kwargs) -> int:
        b, ho, wo, co = _out_shape(x_shape, w_shape, stride, padding)
        # What FlopCounterMode counts for the convolution.
        return 2 * b * ho * wo * co * w_shape[1] * w_shape[2] * w_shape[3]

    return True


REGISTERED = _register()


def patch_embed(
    x: Tensor, weight: Tensor, bias: Tensor | None, stride: int, padding: int, norm: bool,
    norm_weight: Tensor | None = None, norm_bias: Tensor | None = None, eps: float = 1e-6,
) -> Tensor:
    """conv2d then (if ``norm``) LayerNorm over the output channels, channels last in and out: x
    (B, H, W, C) (any strides, e.g. ``image.permute(0, 2, 3, 1)``), weight (Co, C, k, k), bias
    (Co,), zero ``padding`` on every side; returns (B, Ho, Wo, Co) contiguous, Ho = (H + 2·padding −
    k) // stride + 1. Under CPU autocast it runs in the autocast dtype, as the convolution and the
    LayerNorm do there (the norm's statistics in float32)."""
    return torch.ops.paca_kernels.patch_embed(autocast_input(x), weight, bias, stride, padding, norm,
                                              norm_weight, norm_bias, eps)
