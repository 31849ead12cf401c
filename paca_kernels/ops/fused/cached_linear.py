"""A linear layer whose output comes from the CPU output cache: ``torch.ops.paca_kernels.cached_linear``.

For the PaCa-ViT MLP in training on the cpu backend (:class:`~paca_kernels.nn.block.Mlp`, the "train"
path of :func:`paca_kernels.nn._fusion.plan_mlp`): its fc1 output and fc2's input gradient are the
largest tensors of a step (38.5 MB each at PaCa-ViT-Tiny's first stage, B = 8), and with glibc's
malloc each is freshly mapped memory on every call, a page fault per 4 KiB (about 1 µs each on a
virtual machine): fc1's product took 17-20 ms in a Tiny step against 5 ms into mapped memory. Here the
output is a block the previous step freed (csrc/cpu/output_pool.h). The products are ATen's: the
results are ``F.linear``'s (addmm with a bias, mm without).

Differentiable, in every floating dtype: x (..., K) -> out (..., O) = x Wᵀ + b, and

    grad_x = cached_linear(grad_out, Wᵀ) (= grad_out · W, into the cache too),
    grad_W = grad_outᵀ · x,   grad_b = Σ grad_out

over the rows of x. Fake kernel (``torch.compile``), a FLOP formula (as ``F.linear``'s), an ONNX
decomposition (``F.linear``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from ... import _ext
from ._common import linear_flops

__all__ = ["REGISTERED", "cached_linear"]

_LIB = "paca_kernels"


def _register() -> bool:
    if not _ext.load() or not hasattr(torch.ops.paca_kernels, "cached_linear"):
        return False
    op = torch.ops.paca_kernels.cached_linear

    @torch.library.register_fake(f"{_LIB}::cached_linear")
    def _fake(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    def _setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        x, weight, bias = inputs
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None

    def _backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        g2 = grad.reshape(-1, grad.shape[-1])
        gx = op(grad, weight.t(), None) if need[0] else None
        gw = g2.t().mm(x.reshape(-1, x.shape[-1])) if need[1] else None
        gb = g2.sum(0) if ctx.has_bias and need[2] else None
        return gx, gw, gb

    torch.library.register_autograd(f"{_LIB}::cached_linear", _backward, setup_context=_setup_context)

    register_flop_formula(op)(linear_flops)

    return True


REGISTERED = _register()


def cached_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear(x, weight, bias)`` (differentiable) with the output in the CPU output cache: x
    (..., K) on the CPU, weight (O, K), bias (O,) or None, all of x's dtype; returns (..., O)
    contiguous."""
    return torch.ops.paca_kernels.cached_linear(x, weight, bias)
