"""The fused MLP kernels (inference): ``torch.ops.paca_kernels.mlp_dwconv`` and ``mlp_fused``.

The PaCa-ViT MLP is fc1, depthwise 3×3 conv with a shortcut (``DWConv``), GELU, fc2. Through PyTorch
the middle part transposes the 4×-wide hidden tokens to NCHW, runs a depthwise convolution (on the
CPU one of oneDNN's slowest cases: about a quarter of PaCa-ViT-Tiny's inference time for about 1 %
of its FLOPs), transposes back, adds the shortcut and applies GELU, each a pass over memory. The C++
kernel (csrc/cpu/conv_clustering.cpp) reads the tokens (B, N, C) as the NHWC image they are and
does it in one pass per band of image rows:

    u = x + b1,   y[b, n, c] = GELU(depthwise_conv(u)[b, n, c] + bias[c] + u[b, n, c])     (B, N, C)

with b1 the bias of fc1, which :class:`~paca_kernels.nn.Mlp` leaves to this kernel (fc1 then runs as
a plain matrix product, without the extra pass that broadcasts its bias into the output).

``mlp_fused`` is the whole MLP, fc2(act(DWConv(fc1(x)))), in one pass over the tokens: each task
walks down its image rows and keeps the 4×-wide hidden rows in cache (fc1 for the rows entering the
conv window, the conv + GELU, fc2 straight into the output), so none of the three hidden tensors is
written to memory. It pays where those tensors are large and the weights small (the first stages);
:class:`~paca_kernels.nn.Mlp` uses it when fc1's weight has at most :data:`FUSED_MLP_MAX_WEIGHT`
entries (L2-resident), and ``mlp_dwconv`` otherwise.

Neither has a backward: :class:`~paca_kernels.nn.Mlp` uses them only when no gradient is needed (see
:func:`fused_dwconv_applies`) and its modules otherwise. The fake kernel makes it traceable by
``torch.compile``; the FLOP formula counts it like the convolution it replaces, so
``FlopCounterMode`` totals do not change.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import register_flop_formula

from .. import _ext
from ._inference import fusable_in_inference, is_same_depthwise, register_inference_only

__all__ = ["FUSED_MLP_MAX_WEIGHT", "REGISTERED", "fused_dwconv_applies", "mlp_dwconv", "mlp_fused"]

#: Largest fc1 weight (hidden × C entries) for which Mlp runs the whole-MLP kernel: about 640 KB
#: of float32, so fc1's and fc2's weights stay in a 1-2 MB L2 while every task multiplies by them.
#: Measured on the 2-core development machine (fp32, B = 1-8): the whole-MLP kernel is 2-4× the
#: modules at C = 96 (hidden 384), 1.0-1.4× at C = 192, and slower than mlp_dwconv at C = 320.
FUSED_MLP_MAX_WEIGHT = 160_000

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

    if not hasattr(torch.ops.paca_kernels, "mlp_fused"):
        return False
    fused = torch.ops.paca_kernels.mlp_fused

    @torch.library.register_fake(f"{_LIB}::mlp_fused")
    def _fake_fused(x, H, W, fc1_weight, fc1_bias, dw_weight, dw_bias, shortcut, gelu, fc2_weight,
                    fc2_bias):
        return x.new_empty((*x.shape[:2], fc2_weight.shape[0]))

    register_inference_only("mlp_fused", "Mlp runs its modules when gradients are needed")

    @register_flop_formula(fused)
    def _flops_fused(x_shape, H, W, w1_shape, b1_shape, dw_shape, db_shape, shortcut, gelu,
                     w2_shape, *args, **kwargs) -> int:
        b, n, c = x_shape
        hidden, out = w1_shape[0], w2_shape[0]
        # What FlopCounterMode counts for fc1, the depthwise convolution and fc2.
        return 2 * b * n * hidden * (c + dw_shape[2] * dw_shape[3] + out)

    return True


REGISTERED = _register()


def mlp_dwconv(
    dwconv: nn.Module, x: Tensor, H: int, W: int, gelu: bool, in_bias: Tensor | None = None
) -> Tensor:
    """``act(dwconv(u, H, W))`` with u = x + in_bias for a :class:`~paca_kernels.nn.DWConv`
    ``dwconv`` on tokens x (B, N, C) of an H×W grid, act = exact GELU if ``gelu`` else identity,
    through the fused kernel (no autograd). ``in_bias`` (C,) is the bias of the linear layer that
    produced x, if it was left out there."""
    conv = dwconv.dwconv
    return torch.ops.paca_kernels.mlp_dwconv(
        x, H, W, conv.weight, conv.bias, in_bias, bool(dwconv.with_shortcut), gelu
    )


def fused_dwconv_applies(dwconv: nn.Module | None, act: nn.Module, x: Tensor, *more: nn.Module) -> bool:
    """Whether an Mlp's ``dwconv`` (a DWConv) followed by ``act`` may run as the fused kernel on x:
    a "same"-padded odd square depthwise conv, an exact GELU (or identity) activation, the extension
    loaded, CPU tensors outside autocast, no gradient wanted, and no forward hooks on these modules or
    on ``more`` (modules whose work the kernel also takes over, e.g. fc1's bias)."""
    from ..nn.block import DWConv

    if not (REGISTERED and isinstance(dwconv, DWConv) and is_same_depthwise(dwconv.dwconv)):
        return False
    if not (isinstance(act, nn.Identity) or (isinstance(act, nn.GELU) and act.approximate == "none")):
        return False
    return fusable_in_inference(x, dwconv, act, *more)


def mlp_fused(mlp: nn.Module, x: Tensor, H: int, W: int) -> Tensor:
    """The whole :class:`~paca_kernels.nn.Mlp` ``mlp`` (fc1, DWConv, GELU or identity, fc2) on tokens
    x (B, N, C) of an H×W grid through the fused kernel (no autograd, dropout not applied)."""
    conv = mlp.dwconv.dwconv
    return torch.ops.paca_kernels.mlp_fused(
        x, H, W, mlp.fc1.weight, mlp.fc1.bias, conv.weight, conv.bias,
        bool(mlp.dwconv.with_shortcut), isinstance(mlp.act, nn.GELU), mlp.fc2.weight, mlp.fc2.bias,
    )
