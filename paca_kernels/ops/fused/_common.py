"""What the inference-only fused ops share: the autograd formula that refuses a backward, and their
inputs' dtype under autocast."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["autocast_input", "register_inference_only"]


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
        return x.to(torch.get_autocast_dtype(device_type))
    return x


def register_inference_only(name: str, modules_note: str) -> None:
    """Register an autograd formula for the custom op ``paca_kernels::<name>`` that raises a clear
    error: the fused inference kernels have no backward, and their callers run the modules (as
    ``modules_note`` says) whenever gradients are wanted, so reaching it means a direct op call."""

    def _no_grad_only(ctx, *grads):
        raise RuntimeError(f"paca_kernels::{name} is inference-only (no backward); {modules_note}")

    torch.library.register_autograd(f"paca_kernels::{name}", _no_grad_only)
