"""The whole PaCa-ViT MLP in one pass (inference): ``torch.ops.paca_kernels.mlp_fused``.

fc2(act(DWConv(fc1(x)))) with DWConv a depthwise conv plus shortcut: each task of the C++ kernel
(csrc/cpu/fused/mlp_fused.cpp) walks down its image rows and keeps the 4×-wide hidden rows in cache
(fc1 for the rows entering the conv window, the conv + GELU, fc2 straight into the output), so none
of the three hidden tensors is written to memory. It pays where those tensors are large and the
weights small (the first stages); :class:`~paca_kernels.nn.Mlp` uses it when fc1's weight has at most
:func:`max_fused_weight` entries (every PaCa-ViT stage on an AVX-512 build), and :mod:`.mlp_dwconv`
otherwise.

With ``norm`` and ``residual`` it is also the pre-norm block's second half, x + mlp(LayerNorm(x))
(:meth:`~paca_kernels.nn.block.Mlp.forward_residual`, chosen by
:func:`~paca_kernels.nn._fusion.plan_mlp_residual`): the LayerNorm as its prologue and the residual
add as its epilogue, so that no LayerNorm or add runs through PyTorch between two fused calls.

It has no backward: :class:`~paca_kernels.nn.Mlp` uses it only when no gradient is needed, and its
modules otherwise. The FLOP formula counts it like fc1, the depthwise convolution and fc2, so
``FlopCounterMode`` totals do not change.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from ... import _ext
from ._common import autocast_input

__all__ = ["FUSED_MLP_MAX_WEIGHT", "FUSED_MLP_MAX_WEIGHT_AVX512", "FUSED_MLP_MAX_WEIGHT_BF16_AMX", "REGISTERED",
           "max_fused_weight", "mlp_fused"]

#: Largest fc1 weight (hidden × C entries) for which Mlp runs the whole-MLP kernel: about 640 KB
#: of float32, so fc1's and fc2's weights stay in a 1-2 MB L2 while every task multiplies by them.
#: Measured on the 2-core development machine (fp32, B = 1-8): the whole-MLP kernel is 2-4× the
#: modules at C = 96 (hidden 384), 1.0-1.4× at C = 192, and slower than mlp_dwconv at C = 320.
FUSED_MLP_MAX_WEIGHT = 160_000

#: The float32 bound where the products run on AVX-512 (``_ext.cpu_isa()`` ``"avx512"``,
#: ``"avx512bf16"`` or ``"amx"``: 8 × 32 register tiles over two packed panels) with the depthwise
#: conv and GELU on 16 lanes and the packed weights cached across calls. Measured (Xeon, fp32, 2
#: threads, quiet, median of 30 interleaved calls; whole-MLP kernel over fc1 + mlp_dwconv + fc2,
#: B = 1 / 8): C = 192 at 28 × 28 1.22 / 2.30; C = 256 at 28 × 28 1.07 / 1.56; C = 320 at 14 × 14
#: 1.00 / 1.34; C = 384 at 14 × 14 0.98 / 1.47, at 7 × 7 1.10 / 1.00; C = 512 at 14 × 14 0.93 /
#: 1.30, at 7 × 7 1.29 / 0.97. (Before the B = 1 split of the kernel's rows went below 8-row
#: chunks, a 14 × 14 image at B = 1 ran as one task: 0.70.)
FUSED_MLP_MAX_WEIGHT_AVX512 = 1_048_576

#: The same bound where the MLP runs in bfloat16 (a bf16 x, or CPU autocast to bf16) and the
#: kernels multiply bf16 on AMX tiles (``_ext.cpu_isa()`` ``"amx"``): there fc1 and fc2 are AMX
#: products on bf16 panels (half the bytes, packed once: csrc/cpu/math/pack_cache.h), and the
#: modules' bf16 linears pay for their hidden tensors (and, under autocast, a cast of each weight
#: per call). Measured (Xeon with AMX, one thread, CPU time, B = 1 / 8): the whole-MLP kernel
#: 1.4× / 1.8× the modules at C = 320 (hidden 1280, 14 × 14), 1.7× / 1.15× at C = 384 (hidden 1536,
#: 7 × 7), 1.3-1.9× / 1.3-1.5× at C = 512 (hidden 2048, 14 × 14 and 7 × 7; 0.92× for a bf16 model
#: at 7 × 7, B = 8); under autocast 1.4-3.2×.
FUSED_MLP_MAX_WEIGHT_BF16_AMX = 1_048_576


#: The builds whose float32 products are the AVX-512 tiles.
_AVX512_ISAS = ("avx512", "avx512bf16", "amx")
_ISA: list[str] = []  # the extension's build, once known (chosen once per process)


def _autocast_bf16(x: Tensor) -> bool:
    """Whether CPU autocast to bfloat16 applies to x."""
    return (x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16)


def max_fused_weight(x: Tensor) -> int:
    """The largest fc1 weight (hidden × C entries) for which :class:`~paca_kernels.nn.Mlp` runs the
    whole-MLP kernel on x: :data:`FUSED_MLP_MAX_WEIGHT_BF16_AMX` when the call runs in bfloat16
    (x bf16, or CPU autocast to bf16) on the AMX build, :data:`FUSED_MLP_MAX_WEIGHT_AVX512` in
    float32 on an AVX-512 build, else :data:`FUSED_MLP_MAX_WEIGHT`."""
    bf16 = x.dtype == torch.bfloat16 or (x.dtype == torch.float32 and _autocast_bf16(x))
    if not _ISA:
        isa = _ext.cpu_isa() if _ext.load() else None
        _ISA.append(isa[0] if isa else "")
    if not bf16:
        return FUSED_MLP_MAX_WEIGHT_AVX512 if _ISA[0] in _AVX512_ISAS else FUSED_MLP_MAX_WEIGHT
    return FUSED_MLP_MAX_WEIGHT_BF16_AMX if _ISA[0] == "amx" else FUSED_MLP_MAX_WEIGHT

_LIB = "paca_kernels"


def _register() -> bool:
    if not _ext.load() or not hasattr(torch.ops.paca_kernels, "mlp_fused"):
        return False
    op = torch.ops.paca_kernels.mlp_fused

    @torch.library.register_fake(f"{_LIB}::mlp_fused")
    def _fake(x, H, W, fc1_weight, fc1_bias, dw_weight, dw_bias, shortcut, gelu, fc2_weight, fc2_bias,
              norm=False, norm_weight=None, norm_bias=None, eps=1e-5, residual=False, bf16_products=False):
        return x.new_empty((*x.shape[:2], fc2_weight.shape[0]))

    @register_flop_formula(op)
    def _flops(x_shape, H, W, w1_shape, b1_shape, dw_shape, db_shape, shortcut, gelu,
               w2_shape, *args, **kwargs) -> int:
        b, n, c = x_shape
        hidden, out = w1_shape[0], w2_shape[0]
        # What FlopCounterMode counts for fc1, the depthwise convolution and fc2.
        return 2 * b * n * hidden * (c + dw_shape[2] * dw_shape[3] + out)

    return True


REGISTERED = _register()


def mlp_fused(
    x: Tensor, H: int, W: int, fc1_weight: Tensor, fc1_bias: Tensor | None, dw_weight: Tensor,
    dw_bias: Tensor | None, shortcut: bool, gelu: bool, fc2_weight: Tensor, fc2_bias: Tensor | None,
    norm: tuple[Tensor | None, Tensor | None, float] | None = None, residual: bool = False,
) -> Tensor:
    """The whole MLP on tokens x (B, N, C) of an H×W grid through the fused kernel (no autograd):
    fc1 (hidden, C), depthwise conv (hidden, 1, k, k) with optional shortcut, exact GELU if ``gelu``
    else identity, fc2 (Co, hidden). Returns (B, N, Co).

    With ``norm`` = (weight, bias, eps) the LayerNorm over C in front of fc1, with ``residual`` x
    added to the result (Co == C): x + mlp(LayerNorm(x)), a pre-norm block's second half. Under CPU
    autocast to bf16 with those ends and float32 x, the kernel keeps x (the residual stream) and the
    LayerNorm in float32 and rounds to bf16 where autocast's modules would (fc1's input, the MLP's
    output), with bf16 products; otherwise x is passed in the autocast dtype, as the modules
    would take it (:func:`._common.autocast_input`)."""
    ends = norm is not None or residual
    bf16_products = ends and x.dtype == torch.float32 and _autocast_bf16(x)
    if not bf16_products:
        cast = autocast_input(x)
        if ends and cast.dtype != x.dtype:
            raise ValueError(
                f"mlp_fused with norm/residual under CPU autocast to {cast.dtype} on {x.dtype} x: the "
                "kernel keeps the residual stream in x's dtype only for bfloat16 autocast of float32 x"
            )
        x = cast
    nw, nb, eps = norm if norm is not None else (None, None, 1e-5)
    return torch.ops.paca_kernels.mlp_fused(
        x, H, W, fc1_weight, fc1_bias, dw_weight, dw_bias, shortcut, gelu, fc2_weight, fc2_bias,
        norm is not None, nw, nb, eps, residual, bf16_products,
    )
