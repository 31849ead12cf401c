"""The official PaCa-ViT stem / stage transition, ``DownsampleV1``: strided conv(s), then a norm over
the channels. In CPU inference on the cpu backend it runs as the fused op
:func:`paca_kernels.ops.fused.patch_embed.patch_embed` (one per conv, the norm fused into the last),
where :func:`paca_kernels.nn._fusion.plan_downsample` says so; else as its modules."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from ..ops.dispatch import check_backend_name
from ..ops.fused import patch_embed as _embed_op
from ._fusion import plan_downsample
from .layers import build_norm, to_2tuple

__all__ = ["DownsampleV1"]


class DownsampleV1(nn.Module):
    """The official stem / stage transition: strided conv(s) then a channel norm, on (B, C, H, W).

    patch_size 2: one ``kernel_size`` conv of stride 2. patch_size 4 with a smaller kernel: two stride-2
    convs (``proj.0``: in -> out/2, ``proj.1``: out/2 -> out), no activation between them.
    ``backend`` is the ops backend of the enclosing model: on "cpu" (or automatic, on the CPU) an
    inference call runs as ``patch_embed`` (:func:`paca_kernels.nn._fusion.plan_downsample`), whose
    output is the same (B, C_out, H', W') tensor with channels-last strides.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        patch_size: int,
        kernel_size: int,
        norm_cfg: Mapping[str, Any] | None = None,
        img_size: int | tuple[int, int] = 224,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        if patch_size not in (2, 4):
            raise ValueError(f"patch_size must be 2 or 4, got {patch_size}")
        if norm_cfg is None:
            norm_cfg = {"type": "LayerNorm2d", "eps": 1e-6}
        size = to_2tuple(img_size)
        self.patch_size = patch_size
        self.grid_size = (size[0] // patch_size, size[1] // patch_size)
        self.backend = check_backend_name(backend)
        pad = (kernel_size - 1) // 2
        if patch_size <= kernel_size:
            self.proj: nn.Module = nn.Conv2d(
                in_channels, out_channels, kernel_size, stride=patch_size, padding=pad
            )
        else:
            mid = out_channels // 2
            self.proj = nn.Sequential(
                nn.Conv2d(in_channels, mid, kernel_size, stride=2, padding=pad),
                nn.Conv2d(mid, out_channels, kernel_size, stride=patch_size // 2, padding=pad),
            )
        self.norm = build_norm(norm_cfg, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C_in, H, W) -> (B, C_out, H / patch, W / patch)."""
        plan = plan_downsample(self, x)
        if plan is None:
            return self.norm(self.proj(x))
        convs, norm = plan
        h = x.permute(0, 2, 3, 1)  # channels last (a view for a channels-last map)
        for i, conv in enumerate(convs):
            last = i == len(convs) - 1
            h = _embed_op.patch_embed(
                h, conv.weight, conv.bias, conv.stride[0], conv.padding[0], last and norm is not None,
                norm.weight if last and norm is not None else None,
                norm.bias if last and norm is not None else None,
                norm.eps if norm is not None else 1e-6,
            )
        return h.permute(0, 3, 1, 2)
