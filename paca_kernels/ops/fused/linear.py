"""A linear layer in inference: ``torch.ops.paca_kernels.linear``.

For the layers left outside the fused blocks: :class:`~paca_kernels.models.PaCaViT`'s classifier
head (:func:`paca_kernels.nn._fusion.plan_linear`). At B = 1 the head is a product whose cost is
reading its weight; here the weight is packed once while it is unchanged (bf16 pair panels for
bf16 products, float32 panels otherwise), where torch's bf16 linear repacks it on every call and
autocast also casts it. No backward: the head runs as its module when gradients are wanted.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from ... import _ext
from ._common import autocast_input, linear_flops

__all__ = ["REGISTERED", "linear"]

_LIB = "paca_kernels"


def _register() -> bool:
    if not _ext.load() or not hasattr(torch.ops.paca_kernels, "linear"):
        return False
    op = torch.ops.paca_kernels.linear

    @torch.library.register_fake(f"{_LIB}::linear")
    def _fake(x, weight, bias):
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    register_flop_formula(op)(linear_flops)

    return True


REGISTERED = _register()


def linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear(x, weight, bias)`` through the C++ kernel (no autograd): x (..., K), weight (O, K),
    bias (O,) or None; returns (..., O) contiguous in x's dtype (the autocast dtype under CPU
    autocast, as autocast's linear). bf16 x: bf16 products with float32 sums; fp16 x: float32
    products of the float32 weight."""
    return torch.ops.paca_kernels.linear(autocast_input(x), weight, bias)
