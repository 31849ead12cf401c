"""LayerNorm over the last dimension in inference: ``torch.ops.paca_kernels.layer_norm``.

The first LayerNorm of a pre-norm :class:`~paca_kernels.nn.block.PaCaBlock` (``norm1``) in CPU
inference, whose output the fused attention ops read: the rows go through the dispatched 8-lane
kernel (csrc/cpu/math/dispatch.h) into an output from the kernels' pool, and under CPU autocast the
float32 residual stream is normalised straight into bf16 (``dtype``), which fuses the cast the
attention op would make. The block's second LayerNorm runs inside ``mlp_fused``
(:mod:`.mlp_fused`). No backward: the block runs its modules when gradients are wanted.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ... import _ext

__all__ = ["REGISTERED", "layer_norm"]

_LIB = "paca_kernels"


def _register() -> bool:
    if not _ext.load() or not hasattr(torch.ops.paca_kernels, "layer_norm"):
        return False

    @torch.library.register_fake(f"{_LIB}::layer_norm")
    def _fake(x, weight, bias, eps, dtype=None):
        return x.new_empty(x.shape, dtype=dtype if dtype is not None else x.dtype)

    return True


REGISTERED = _register()


def layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
               dtype: torch.dtype | None = None) -> Tensor:
    """LayerNorm of x (..., C) over C (biased variance), times ``weight`` plus ``bias`` (each (C,) or
    None), contiguous, in ``dtype`` (x's by default; bf16 / fp16 for float32 x: the float32 result
    rounded, as a float32 LayerNorm then autocast's cast)."""
    return torch.ops.paca_kernels.layer_norm(x, weight, bias, eps, dtype)
