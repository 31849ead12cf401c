"""What the fused ops share: their inputs' dtype under autocast, the linears' FLOP formula.

(Their autograd kernel, which refuses an input that requires grad and otherwise calls the kernels
below autograd, is in C++: csrc/registration.cpp, ``inference_only_autograd``.)"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["autocast_input", "linear_flops"]


def linear_flops(x_shape, w_shape, *args, **kwargs) -> int:
    """A linear layer's FLOPs as FlopCounterMode counts ``F.linear``: 2 · rows · K · O for x (..., K)
    and weight (O, K) (the bias add is not counted)."""
    rows = 1
    for s in x_shape[:-1]:
        rows *= s
    return 2 * rows * w_shape[1] * w_shape[0]


def autocast_input(x: Tensor) -> Tensor:
    """x as a fused inference op takes it: under ``torch.autocast`` for x's device, in the autocast
    dtype (float32, bfloat16 and float16 tensors; float64 is left alone, as autocast leaves it),
    else x itself.

    The fused ops replace linears, 1×1 convs and matmuls, which autocast runs in its lower precision:
    inputs and weights rounded to bf16 (fp16), float32 sums, outputs in bf16. Given bf16 x the ops do
    the same: the C++ kernels round float32 weights to bf16 as they pack them (float32 parameters
    are accepted with bf16 x), multiply by bf16 products, and return bf16. What autocast keeps in
    float32 the kernels keep in float32 (softmax, the LayerNorm's statistics), and so are the values
    between two products inside one op (the MLP's hidden rows, the attention's scores), which the
    modules would round to bf16: each op's error is at most the modules' under autocast. (fp16 x:
    float32 products of the float32 weights, fp16 in and out.)"""
    device_type = x.device.type
    if (
        device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type) and x.is_floating_point()
        and x.dtype != torch.float64
    ):
        dtype = torch.get_autocast_dtype(device_type)
        # Most calls under autocast get x already in the autocast dtype (the ops before returned
        # it): no Tensor.to call (argument parsing and a dispatch) for nothing.
        return x if x.dtype == dtype else x.to(dtype)
    return x
