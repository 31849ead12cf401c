"""What the layers' decision points ask of their modules before replacing them with a fused
inference op (:mod:`paca_kernels.ops.fused`): the fused kernels bypass the modules, so they may only
replace them where nothing could tell.

Everything here reads module structure and tensor metadata only. It runs on every inference call of
a layer, so it reads the module dicts directly (``nn.Module.__getattr__`` and a Sequential's
``__getitem__`` cost about a microsecond per access) and walks them with plain loops.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

from ..ops import preferred_backend

__all__ = [
    "conv_head_tensors",
    "cpu_inference",
    "exact_gelu",
    "global_hooks",
    "has_hooks",
    "linear_tensors",
    "same_depthwise",
]


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


def global_hooks() -> bool:
    """Whether global forward (pre-)hooks are registered (``register_module_forward_hook``; also
    FlopCounterMode's module tracker): they would fire for every submodule a kernel replaces."""
    return bool(_global_forward_hooks or _global_forward_pre_hooks)


def has_hooks(*modules: nn.Module | None) -> bool:
    """Whether any of ``modules`` or their submodules has forward (pre-)hooks (which a fused kernel
    would skip). Global hooks are :func:`global_hooks`' concern."""
    for m in modules:
        if m is not None and _hooked(m):
            return True
    return False


def cpu_inference(backend: str | None, x: Tensor, module: nn.Module, *extra: Tensor | None) -> bool:
    """The conditions every fused inference op shares, for ``module`` run on x: x on the CPU outside
    autocast, the ``backend`` setting resolving to "cpu", no global hooks, and no gradient wanted
    through x, the ``extra`` tensors or any parameter of ``module``."""
    if x.device.type != "cpu" or torch.is_autocast_enabled("cpu") or global_hooks():
        return False
    if torch.is_grad_enabled():
        if x.requires_grad:
            return False
        for t in extra:
            if t is not None and t.requires_grad:
                return False
        for p in module.parameters():
            if p.requires_grad:
                return False
    return preferred_backend(backend, "cpu") == "cpu"


def exact_gelu(m: nn.Module) -> bool:
    """An ``nn.GELU`` (not a subclass) with the erf form, which the kernels compute."""
    return type(m) is nn.GELU and m.approximate == "none"


def same_depthwise(conv: nn.Module) -> bool:
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


def _pointwise(conv: nn.Module) -> bool:
    return (type(conv) is nn.Conv2d and conv.kernel_size == (1, 1) and conv.stride == (1, 1)
            and conv.groups == 1)


def conv_head_tensors(
    seq: nn.Module,
) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None, Tensor, Tensor | None] | None:
    """For the ``clustering`` Sequential of a P2CConv2d head, the tensors of
    :func:`paca_kernels.ops.fused.conv_cluster_logits.conv_cluster_logits` (dw_weight, dw_bias, w1,
    b1, w2, b2) when the kernel computes what it does (a "same" depthwise conv, exact GELUs, plain 1×1
    convs), else None. Structure only: the caller checks the head's class and hooks."""
    mods = list(seq._modules.values())
    if len(mods) < 5:
        return None
    dw, a1, c1, a2, c2 = mods[:5]
    if not (same_depthwise(dw) and exact_gelu(a1) and exact_gelu(a2) and _pointwise(c1)
            and _pointwise(c2)):
        return None
    dwp, p1, p2 = dw._parameters, c1._parameters, c2._parameters  # not __getattr__: hot path
    return dwp["weight"], dwp["bias"], p1["weight"], p1["bias"], p2["weight"], p2["bias"]


def linear_tensors(*linears: nn.Module) -> tuple[Tensor | None, ...] | None:
    """(weight, bias, weight, bias, ...) of plain ``nn.Linear`` modules (a subclass could compute
    something else), else None."""
    out: list[Tensor | None] = []
    for m in linears:
        if type(m) is not nn.Linear:
            return None
        params = m._parameters  # not __getattr__: hot path
        out.append(params["weight"])
        out.append(params["bias"])
    return tuple(out)
