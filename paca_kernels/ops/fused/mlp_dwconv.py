"""The MLP's depthwise stage fused (inference): ``torch.ops.paca_kernels.mlp_dwconv``.

The PaCa-ViT MLP is fc1, depthwise 3×3 conv with a shortcut (``DWConv``), GELU, fc2. Through PyTorch
the middle part transposes the 4×-wide hidden tokens to NCHW, runs a depthwise convolution (on the
CPU one of oneDNN's slowest cases: about a quarter of PaCa-ViT-Tiny's inference time for about 1 %
of its FLOPs), transposes back, adds the shortcut and applies GELU, each a pass over memory. The C++
kernel (csrc/cpu/fused/mlp_dwconv.cpp) reads the tokens (B, N, C) as the NHWC image they are and
does it in one pass per band of image rows:

    u = x + in_bias,   y[b, n, c] = act(depthwise_conv(u)[b, n, c] + bias[c] + shortcut · u[b, n, c])

with ``in_bias`` the bias of fc1, which :class:`~paca_kernels.nn.Mlp` leaves to this kernel (fc1 then
runs as a plain matrix product, without the extra pass that broadcasts its bias into the output).

Unlike the other fused ops it is differentiable (float32 and float64): its backward is
``torch.ops.paca_kernels.mlp_dwconv_bwd`` (csrc/cpu/mlp_dwconv_bwd.cpp), which saves nothing but x
(held anyway as the output of fc1's matrix product) and recomputes z = dwconv(u) + bias + shortcut·u
band by band from it. With g = grad_y · act'(z):

    grad_x = dwconv_flipped(g) + shortcut · g,   grad_weight[c, i, j] = Σ g[., c] · u shifted by (i, j),
    grad_bias = Σ g,   grad_in_bias = Σ grad_x

(weight gradients as per-task partials reduced in a fixed order: deterministic, whatever the thread
count). So :class:`~paca_kernels.nn.Mlp` also trains through it on the cpu backend
(:func:`paca_kernels.nn._fusion.plan_mlp`); bfloat16/float16 have no backward kernel (a backward
through them raises), and the layers run their modules where those would be needed. The fake
kernels make it traceable by ``torch.compile``; the FLOP formulas count it like the convolution it
replaces (and its backward like the convolution's), so ``FlopCounterMode`` totals do not change.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from ... import _ext
from ._common import autocast_input

__all__ = ["DIFFERENTIABLE", "REGISTERED", "mlp_dwconv", "with_strides_of"]

_LIB = "paca_kernels"


def with_strides_of(grad: Tensor, param: Tensor) -> Tensor:
    """grad with param's strides (a copy where they differ). The PaCa conv weights carry the
    channels-last strides their module gradients get (``nn.layers.channels_last_conv_weights_``:
    DDP compares a gradient's strides with its parameter's literally, size-1 dimensions included);
    autograd keeps a gradient's own strides where they differ only in size-1 dimensions, so a
    gradient computed here contiguous is given the parameter's (a (C, k·k)-sized copy at most)."""
    if grad.stride() == param.stride():
        return grad
    return grad.new_empty_strided(param.shape, param.stride()).copy_(grad)


def _register() -> bool:
    if not _ext.load() or not hasattr(torch.ops.paca_kernels, "mlp_dwconv"):
        return False
    op = torch.ops.paca_kernels.mlp_dwconv

    @torch.library.register_fake(f"{_LIB}::mlp_dwconv")
    def _fake(x, H, W, weight, bias, in_bias, shortcut, gelu):
        return x.new_empty(x.shape)

    @register_flop_formula(op)
    def _flops(x_shape, H, W, w_shape, *args, **kwargs) -> int:
        b, n, c = x_shape
        # What FlopCounterMode counts for the depthwise convolution (bias, shortcut and GELU are
        # not counted).
        return 2 * b * n * c * w_shape[2] * w_shape[3]

    if not hasattr(torch.ops.paca_kernels, "mlp_dwconv_bwd"):  # an extension built before the backward
        return True  # DIFFERENTIABLE is False: the layers never call it with gradients wanted
    bwd = torch.ops.paca_kernels.mlp_dwconv_bwd

    @torch.library.register_fake(f"{_LIB}::mlp_dwconv_bwd")
    def _fake_bwd(grad_y, x, H, W, weight, bias, in_bias, shortcut, gelu):
        c = x.shape[2]
        return (
            x.new_empty(x.shape), weight.new_empty(weight.shape),
            weight.new_empty(c, dtype=bias.dtype if bias is not None else weight.dtype),
            weight.new_empty(c, dtype=in_bias.dtype if in_bias is not None else weight.dtype),
        )

    def _setup_context(ctx, inputs, output) -> None:
        x, H, W, weight, bias, in_bias, shortcut, gelu = inputs
        ctx.save_for_backward(x, weight, bias, in_bias)
        ctx.args = (H, W, shortcut, gelu)

    def _backward(ctx, grad_y):
        x, weight, bias, in_bias = ctx.saved_tensors
        H, W, shortcut, gelu = ctx.args
        if x.dtype not in (torch.float32, torch.float64):
            raise RuntimeError(
                f"paca_kernels::mlp_dwconv has a backward for float32 and float64 only, got {x.dtype} "
                "(Mlp runs its modules when gradients are needed in other dtypes)"
            )
        gx, gw, gb, gib = bwd(grad_y, x, H, W, weight, bias, in_bias, shortcut, gelu)
        need = ctx.needs_input_grad
        if need[3]:
            gw = with_strides_of(gw, weight)
        return (
            gx if need[0] else None, None, None, gw if need[3] else None,
            gb if bias is not None and need[4] else None,
            gib if in_bias is not None and need[5] else None, None, None,
        )

    torch.library.register_autograd(f"{_LIB}::mlp_dwconv", _backward, setup_context=_setup_context)

    @register_flop_formula(bwd)
    def _flops_bwd(gy_shape, x_shape, H, W, w_shape, *args, **kwargs) -> int:
        b, n, c = x_shape
        # As FlopCounterMode counts convolution_backward: the input's and the weight's gradients,
        # each a convolution's worth.
        return 4 * b * n * c * w_shape[2] * w_shape[3]

    return True


REGISTERED = _register()
#: Whether the op has its backward (an extension built with csrc/cpu/mlp_dwconv_bwd.cpp).
DIFFERENTIABLE = REGISTERED and hasattr(torch.ops.paca_kernels, "mlp_dwconv_bwd")


def mlp_dwconv(
    x: Tensor, H: int, W: int, weight: Tensor, bias: Tensor | None, in_bias: Tensor | None,
    shortcut: bool, gelu: bool,
) -> Tensor:
    """``act(dwconv(u) + shortcut · u)`` with u = x + in_bias, on tokens x (B, N, C) of an H×W grid,
    through the fused kernel (differentiable in float32 and float64: the module docstring); act =
    exact GELU if ``gelu`` else identity.

    Args:
        weight, bias: (C, 1, k, k) and (C,) or None of the depthwise conv ("same" zero padding, k odd).
        in_bias: (C,) bias of the linear layer that produced x, if it was left out there, or None.

    Returns:
        (B, N, C).
    """
    return torch.ops.paca_kernels.mlp_dwconv(autocast_input(x), H, W, weight, bias, in_bias, shortcut, gelu)
