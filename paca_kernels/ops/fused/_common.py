"""What the inference-only fused ops share: the autograd formula that refuses a backward."""

from __future__ import annotations

import torch

__all__ = ["register_inference_only"]


def register_inference_only(name: str, modules_note: str) -> None:
    """Register an autograd formula for the custom op ``paca_kernels::<name>`` that raises a clear
    error: the fused inference kernels have no backward, and their callers run the modules (as
    ``modules_note`` says) whenever gradients are wanted, so reaching it means a direct op call."""

    def _no_grad_only(ctx, *grads):
        raise RuntimeError(f"paca_kernels::{name} is inference-only (no backward); {modules_note}")

    torch.library.register_autograd(f"paca_kernels::{name}", _no_grad_only)
