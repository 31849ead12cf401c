"""The fused convolutional clustering head (inference): ``torch.ops.paca_kernels.conv_cluster_logits``.

The official P2CConv2d head is depthwise k×k conv, GELU, 1×1 conv, GELU, 1×1 conv to M channels. Run
as four PyTorch ops it writes and re-reads three (B, C, H, W) intermediates and transposes the tokens
to NCHW first; the C++ kernel (csrc/cpu/conv_clustering.cpp) reads x (B, N, C) as the NHWC image it
already is and computes each band of image rows end to end in cache:

    logits[b, m, n] = (GELU(GELU(dwconv(x) + dw_b) · W1ᵀ + b1) · W2ᵀ + b2)[b, n, m]      (B, M, N)

It has no backward: :class:`~paca_kernels.nn.PaCaAttention` uses it only when no gradient is needed
(see :func:`fused_head_applies`), and the module path otherwise. The fake kernel makes it traceable
by ``torch.compile``; the FLOP formula counts it like the three convolutions it replaces, so
``FlopCounterMode`` totals do not change.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import register_flop_formula

from .. import _ext
from ._inference import fusable_in_inference, is_same_depthwise, register_inference_only

__all__ = ["REGISTERED", "conv_cluster_logits", "fused_head_applies", "head_flops", "head_is_fusable"]

_LIB = "paca_kernels"


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


def head_flops(x_shape, dw_shape, w1_shape, w2_shape) -> int:
    """What FlopCounterMode counts for the head's three convolutions (biases are not counted)."""
    b, n, c = x_shape
    return 2 * b * n * c * (dw_shape[2] * dw_shape[3] + w1_shape[0] + w2_shape[0])


REGISTERED = _register()


def conv_cluster_logits(head: nn.Module, x: Tensor, H: int, W: int) -> Tensor:
    """Logits (B, M, N) of a fusable :class:`~paca_kernels.nn.clustering.P2CConv2d` ``head`` for
    tokens x (B, N, C) on an H×W grid, through the fused kernel (no autograd)."""
    # The Sequential's modules as a list: its __getitem__ costs about 1.4 us per index.
    dw, _, c1, _, c2 = list(head.clustering._modules.values())[:5]
    return torch.ops.paca_kernels.conv_cluster_logits(
        x, H, W, dw.weight, dw.bias, c1.weight, c1.bias, c2.weight, c2.bias
    )


def fused_head_applies(head: nn.Module, x: Tensor) -> bool:
    """Whether ``head`` (a clustering head) may run as the fused kernel on ``x``: a fusable head (see
    :func:`head_is_fusable`), CPU tensors outside autocast, no gradient wanted, and no forward hooks
    on the head's modules (which the fused kernel would bypass)."""
    return head_is_fusable(head) and fusable_in_inference(x, head)


def head_is_fusable(head: nn.Module) -> bool:
    """Whether ``head`` computes what the fused kernel does: a P2CConv2d with exact GELUs, a "same"
    depthwise conv and plain 1×1 convs, and the extension loaded (structure only, no input).

    It runs on every inference call, so it reads the module dicts directly: nn.Module.__getattr__
    and the Sequential's __getitem__ cost about a microsecond per access."""
    from ..nn.clustering import P2CConv2d  # here: paca_kernels.nn imports this module

    if not (REGISTERED and isinstance(head, P2CConv2d)):
        return False
    seq = list(head._modules["clustering"]._modules.values())
    if len(seq) < 5:
        return False
    a1, c1, a2, c2 = seq[1:5]
    return (
        type(a1) is nn.GELU and type(a2) is nn.GELU and a1.approximate == "none"
        and a2.approximate == "none" and is_same_depthwise(seq[0])
        and type(c1) is nn.Conv2d and type(c2) is nn.Conv2d
        and c1.kernel_size == (1, 1) and c2.kernel_size == (1, 1)
        and c1.stride == (1, 1) and c2.stride == (1, 1) and c1.groups == 1 and c2.groups == 1
    )

