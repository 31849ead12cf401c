"""Small building blocks of PaCa-ViT, written here so that timm, mmcv and einops are not needed.

Each matches the official release's module of the same role (same parameter names and numerics):
DropPath (stochastic depth), LayerNorm2d, the teacher's BlurConv2d, and the builders that turn the
official ``*_cfg`` dicts into modules. (The ``DownsampleV1`` stem/transition, which has a fused
path, is :mod:`paca_kernels.nn.downsample`.)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "BlurConv2d",
    "DWConv",
    "DropPath",
    "LayerNorm2d",
    "build_act",
    "build_norm",
    "to_2tuple",
]


def to_2tuple(v: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """``7 -> (7, 7)``; a pair passes through."""
    if isinstance(v, (tuple, list)):
        if len(v) != 2:
            raise ValueError(f"expected an int or a pair, got {v!r}")
        return int(v[0]), int(v[1])
    return int(v), int(v)


class DropPath(nn.Module):
    """Stochastic depth per sample: in training, zero a sample's residual branch with probability p
    and scale the kept ones by 1/(1-p); identity in eval mode."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x: Tensor) -> Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) map (timm's LayerNorm2d)."""

    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


_ACTS: dict[str, type[nn.Module]] = {
    "gelu": nn.GELU,
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "hardswish": nn.Hardswish,
    "mish": nn.Mish,
    "identity": nn.Identity,
}


def build_act(cfg: Mapping[str, Any] | str | type[nn.Module] | None) -> nn.Module:
    """An activation from an official ``act_cfg`` (``dict(type="GELU")``), a name or a class."""
    if cfg is None:
        return nn.Identity()
    if isinstance(cfg, type) and issubclass(cfg, nn.Module):
        return cfg()
    kwargs: dict[str, Any] = {}
    if isinstance(cfg, Mapping):
        kwargs = dict(cfg)
        name = str(kwargs.pop("type"))
    else:
        name = str(cfg)
    try:
        return _ACTS[name.lower()](**kwargs)
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; known: {', '.join(_ACTS)}") from None


def build_norm(cfg: Mapping[str, Any] | None, dim: int) -> nn.Module:
    """A norm layer from an official ``norm_cfg``: LN (LayerNorm), LayerNorm2d, BN (BatchNorm2d),
    SyncBN; ``None`` or an empty dict gives Identity. ``requires_grad`` is honoured."""
    if not cfg:
        return nn.Identity()
    kwargs = dict(cfg)
    kind = str(kwargs.pop("type"))
    requires_grad = kwargs.pop("requires_grad", True)
    if kind in ("LN", "LayerNorm"):
        layer: nn.Module = nn.LayerNorm(dim, **kwargs)
    elif kind == "LayerNorm2d":
        layer = LayerNorm2d(dim, **kwargs)
    elif kind in ("BN", "BN2d", "BatchNorm2d"):
        layer = nn.BatchNorm2d(dim, **kwargs)
    elif kind in ("SyncBN", "SyncBatchNorm"):
        layer = nn.SyncBatchNorm(dim, **kwargs)
    else:
        raise ValueError(f"unknown norm type {kind!r} (LN, LayerNorm2d, BN, SyncBN)")
    for p in layer.parameters():
        p.requires_grad = requires_grad
    return layer


class BlurConv2d(nn.Module):
    """Anti-aliased strided conv of the clustering teacher: a fixed depthwise [1,2,1]ᵀ[1,2,1]/16 blur
    (stride 1, padding 1; the persistent buffer ``blur_filter``), then the conv (``conv``)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 2,
        padding: int = 1,
    ) -> None:
        super().__init__()
        k = torch.tensor([1.0, 2.0, 1.0])
        blur = (k[:, None] * k[None, :]) / 16.0
        self.register_buffer("blur_filter", blur.expand(in_channels, 1, 3, 3).clone())
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding)

    def forward(self, x: Tensor) -> Tensor:
        x = F.conv2d(x, self.blur_filter, stride=1, padding=1, groups=x.shape[1])
        return self.conv(x)


def channels_last_conv_weights_(module: nn.Module) -> nn.Module:
    """Give the conv weights that see channels-last inputs the channels-last strides their gradients
    get, where that layout is the same memory as the contiguous one; returns ``module``.

    The PaCa convs (the clustering head's, the MLP's depthwise conv) run on (B, N, C) tokens viewed as
    (B, C, H, W), a channels-last tensor, so PyTorch's conv backward returns a channels-last weight
    gradient. For a depthwise weight (C, 1, k, k) or a 1×1 weight (O, I, 1, 1) that layout has the
    same bytes as the contiguous one and differs only in the strides of size-1 dimensions; autograd
    accepts that, but DistributedDataParallel compares strides literally and warns "Grad strides do
    not match bucket view strides" on every run. With the weight itself restrided (no copy of
    meaning: identical values, identical memory order) the gradient's strides equal the parameter's,
    whatever the input's layout. Other conv weights are left alone.
    """
    for conv in module.modules():
        if not isinstance(conv, nn.Conv2d) or conv.weight.dim() != 4:
            continue
        w = conv.weight
        depthwise = w.shape[1] == 1
        pointwise = w.shape[2] == w.shape[3] == 1
        if (depthwise or pointwise) and w.is_contiguous():
            with torch.no_grad():
                conv.weight = nn.Parameter(w.to(memory_format=torch.channels_last), w.requires_grad)
    return module


class DWConv(nn.Module):
    """Depthwise 3×3 conv over the token grid, optionally with a shortcut: (B, N, C) -> (B, N, C)."""

    def __init__(
        self, dim: int, kernel_size: int = 3, bias: bool = True, with_shortcut: bool = False
    ) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size, 1, (kernel_size - 1) // 2, bias=bias, groups=dim)
        channels_last_conv_weights_(self)  # its input is a channels-last view (DDP's stride check)
        self.with_shortcut = with_shortcut

    def forward(self, x: Tensor, H: int, W: int) -> Tensor:
        b, _, c = x.shape
        y = self.dwconv(x.transpose(1, 2).reshape(b, c, H, W)).flatten(2).transpose(1, 2)
        return y + x if self.with_shortcut else y
