"""Conditions shared by the fused inference-only CPU kernels (the conv clustering head and the MLP's
depthwise conv): they bypass their modules, so they may only replace them where nothing could tell."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

from ._backends import BackendError, select_backend

__all__ = ["backend_is_cpu", "fusable_in_inference", "has_hooks", "register_inference_only"]


def _hooked(m: nn.Module) -> bool:
    if m._forward_hooks or m._forward_pre_hooks:
        return True
    # No memo of visited modules (as named_modules keeps): a shared submodule is merely checked twice,
    # and a module nested in itself already breaks state_dict() and repr(). A plain loop, not any()
    # over a generator: this walk runs on every inference call of a layer (about 20 modules).
    for c in m._modules.values():
        if c is not None and _hooked(c):
            return True
    return False


def has_hooks(*modules: nn.Module) -> bool:
    """Whether any of ``modules`` or their submodules has forward (pre-)hooks, which a fused kernel
    would skip, or global forward (pre-)hooks are registered (``register_module_forward_hook``:
    they would fire for every submodule the kernel replaces)."""
    if _global_forward_hooks or _global_forward_pre_hooks:
        return True
    return any(_hooked(m) for m in modules)


def fusable_in_inference(x: Tensor, *modules: nn.Module) -> bool:
    """x on the CPU outside autocast, no gradient wanted through x or the modules' parameters, and
    no hooks on the modules: the common conditions of the fused inference kernels."""
    if x.device.type != "cpu" or torch.is_autocast_enabled("cpu"):
        return False
    if torch.is_grad_enabled() and (
        x.requires_grad or any(p.requires_grad for m in modules for p in m.parameters())
    ):
        return False
    return not has_hooks(*modules)


def backend_is_cpu(backend: str | None, x: Tensor) -> bool:
    """Whether a layer's ``backend`` setting resolves to the fused C++ backend for x (an explicit
    "cpu", or automatic selection on a CPU tensor); a setting that cannot serve x is reported by the
    layer's own op call, not here."""
    try:
        return select_backend("cluster_pool", (x, x), backend).name == "cpu"
    except (BackendError, ValueError):
        return False


def is_same_depthwise(conv: nn.Module) -> bool:
    """A depthwise Conv2d with an odd square kernel, stride 1, no dilation and zero "same" padding:
    what the fused kernels' depthwise stage computes."""
    if not isinstance(conv, nn.Conv2d):
        return False
    k = conv.kernel_size[0]
    return (
        conv.kernel_size == (k, k) and k % 2 == 1 and conv.padding == ((k - 1) // 2,) * 2
        and conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.groups == conv.in_channels
        and conv.in_channels == conv.out_channels and conv.padding_mode == "zeros"
    )


def register_inference_only(name: str, modules_note: str) -> None:
    """Register an autograd formula for the custom op ``paca_kernels::<name>`` that raises a clear
    error: the fused inference kernels have no backward, and their callers run the modules (as
    ``modules_note`` says) whenever gradients are wanted, so reaching it means a direct op call."""

    def _no_grad_only(ctx, *grads):
        raise RuntimeError(f"paca_kernels::{name} is inference-only (no backward); {modules_note}")

    torch.library.register_autograd(f"paca_kernels::{name}", _no_grad_only)
