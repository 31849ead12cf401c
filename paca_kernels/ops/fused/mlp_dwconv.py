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

It has no backward: :class:`~paca_kernels.nn.Mlp` uses it only when no gradient is needed, and its
modules otherwise. The fake kernel makes it traceable by ``torch.compile``; the FLOP formula counts it
like the convolution it replaces, so ``FlopCounterMode`` totals do not change.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from ... import _ext
from ._common import autocast_input, register_inference_only

__all__ = ["REGISTERED", "mlp_dwconv"]

_LIB = "paca_kernels"


def _register() -> bool:
    if not _ext.load() or not hasattr(torch.ops.paca_kernels, "mlp_dwconv"):
        return False
    op = torch.ops.paca_kernels.mlp_dwconv

    @torch.library.register_fake(f"{_LIB}::mlp_dwconv")
    def _fake(x, H, W, weight, bias, in_bias, shortcut, gelu):
        return x.new_empty(x.shape)

    register_inference_only(
        "mlp_dwconv", "Mlp runs its DWConv and activation modules when gradients are needed"
    )

    @register_flop_formula(op)
    def _flops(x_shape, H, W, w_shape, *args, **kwargs) -> int:
        b, n, c = x_shape
        # What FlopCounterMode counts for the depthwise convolution (bias, shortcut and GELU are
        # not counted).
        return 2 * b * n * c * w_shape[2] * w_shape[3]

    return True


REGISTERED = _register()


def mlp_dwconv(
    x: Tensor, H: int, W: int, weight: Tensor, bias: Tensor | None, in_bias: Tensor | None,
    shortcut: bool, gelu: bool,
) -> Tensor:
    """``act(dwconv(u) + shortcut · u)`` with u = x + in_bias, on tokens x (B, N, C) of an H×W grid,
    through the fused kernel (no autograd); act = exact GELU if ``gelu`` else identity.

    Args:
        weight, bias: (C, 1, k, k) and (C,) or None of the depthwise conv ("same" zero padding, k odd).
        in_bias: (C,) bias of the linear layer that produced x, if it was left out there, or None.

    Returns:
        (B, N, C).
    """
    return torch.ops.paca_kernels.mlp_dwconv(autocast_input(x), H, W, weight, bias, in_bias, shortcut, gelu)
