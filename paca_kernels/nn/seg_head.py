"""The PaCa semantic-segmentation head (the official ``PaCaSegHead``); the backbone + head segmentor
is :class:`paca_kernels.models.PaCaSegmentor`.

No mmseg/mmcv dependency. For multi-level features x_i (B, C_i, H_i, W_i), i = 0..L-1, with K classes
and D head channels (official: D = 256):

    f_i  = resize(ReLU(BN(Conv1×1(x_i))), (H_0, W_0))           (B, D, H_0, W_0)
    f    = concat_i f_i                                          (B, L·D, N), N = H_0·W_0
    q    = ReLU(BN(Conv1×1(f)))                                  (B, N, D)
    c    = Conv1×1(ReLU(BN(Conv1×1(f))))                         (B, K, N)   one cluster per class
    Z    = softmax(c over N) · fᵀ                                (B, K, L·D) no norm (official)
    k, v = ReLU(BN_over_clusters(Linear(Z)))                     (B, K, D)
    o    = softmax(q·kᵀ·scale over K) · v                        (B, N, D)   official: scale 1, 1 head
    out  = Conv1×1(Dropout2d(ReLU(BN(Conv1×1(o)))))              (B, K, H_0, W_0)

The cluster logits c are returned too: the official training adds a cross-entropy on them (weight 0.4),
so that cluster m becomes the region of class m. ``paca_kernels.ops.cluster_pool`` does the pooling
(the unnormalised pooling is recovered exactly from the op's LayerNorm, see :func:`pool_clusters`) and
``paca_kernels.ops.p2c_attention`` the attention. Module names follow the official head (``convs.i.conv``,
``convs.i.bn``, ``q.0``, ``clustering.0/1``, ``k.0/2``, ``v.0/2``, ``proj``, ``conv_seg``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops

__all__ = ["ConvBNAct", "PaCaSegHead", "pool_clusters"]

#: Channels per ``cluster_pool`` call in :func:`pool_clusters` (plus the two marker channels): the Triton
#: kernel holds a cluster's channels on chip, up to 1024.
_POOL_CHUNK = 1022


def pool_clusters(logits: Tensor, x: Tensor, *, backend: str | None = None) -> Tensor:
    """P = softmax(logits over N) · x, (B, M, C), without a LayerNorm, through the fused ``cluster_pool``.

    ``cluster_pool`` returns LN(P) = (P − μ)·r per cluster row (r = 1/√(var + eps)). Two marker channels
    of constant +1 and −1 appended to x pool to exactly +1 and −1 (each row of the softmax sums to 1), so
    the op returns a = (1 − μ)·r and b = (−1 − μ)·r for them; then r = (a − b)/2, μ = −(a + b)/(2r) and
    P = LN(P)/r + μ, exactly (eps included). Channels go in chunks of at most 1022 so that every call fits
    the Triton kernel's limit of 1024 channels; the FLOP cost grows by 2/C_chunk.

    Args:
        logits: (B, M, N) cluster logits.
        x: (B, N, C) tokens.
        backend: ops backend (None: automatic).

    Returns:
        (B, M, C) in x's dtype (the autocast dtype under autocast).
    """
    if not isinstance(x, Tensor) or x.dim() != 3:
        raise ValueError(f"x must be a (B, N, C) tensor, got {getattr(x, 'shape', type(x).__name__)}")
    b, n, c = x.shape
    markers = torch.tensor([1.0, -1.0], dtype=x.dtype, device=x.device).expand(b, n, 2)
    chunks = math.ceil(c / _POOL_CHUNK)
    size = math.ceil(c / chunks)
    out = []
    for part in torch.split(x, size, dim=2):
        z = ops.cluster_pool(logits, torch.cat([part, markers], dim=2), None, None, 1e-6, backend=backend)
        # Recover in fp32 at least: the marker arithmetic divides by r.
        z32 = z.float() if z.dtype in (torch.float16, torch.bfloat16) else z
        a, bm = z32[..., -2:-1], z32[..., -1:]
        r = (a - bm) * 0.5
        mu = -(a + bm) / (2.0 * r)
        out.append((z32[..., :-2] / r + mu).to(z.dtype))
    return out[0] if len(out) == 1 else torch.cat(out, dim=2)


class ConvBNAct(nn.Sequential):
    """Conv2d (no bias) + BatchNorm2d + ReLU, named ``conv``/``bn``/``activate`` (mmcv's ConvModule)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.activate = nn.ReLU(inplace=True)


class _Transpose12(nn.Module):
    """(B, M, C) <-> (B, C, M), so BatchNorm1d normalises each channel over the batch and clusters."""

    def forward(self, x: Tensor) -> Tensor:
        return x.transpose(1, 2)


def _cluster_proj(in_dim: int, dim: int) -> nn.Sequential:
    """Linear, then BN over (batch, clusters) per channel, then ReLU: keys ``.0`` and ``.2``."""
    return nn.Sequential(nn.Linear(in_dim, dim), _Transpose12(), nn.BatchNorm1d(dim), _Transpose12(),
                         nn.ReLU(inplace=True))


class PaCaSegHead(nn.Module):
    """The official PaCa segmentation head (see the module docstring for the math).

    Args:
        in_channels: channels C_i of each input level (official: the backbone's four stages).
        num_classes: K classes, also the number of clusters (150 for ADE20K).
        channels: D, the head width (official 256).
        dropout: Dropout2d before the classifier (official 0.1).
        num_heads: attention heads (official 1; the fused Triton attention needs D/h ≤ 128, so on CUDA a
            single 256-wide head runs on the reference backend).
        scale: attention score scale (official 1.0, no 1/√d).
        align_corners: of the bilinear resizes.
        backend: ops backend for the pooling and attention (None: automatic).

    Forward: a list of (B, C_i, H_i, W_i) maps -> (seg logits (B, K, H_0, W_0), cluster logits
    (B, K, H_0, W_0)).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        channels: int = 256,
        dropout: float = 0.1,
        num_heads: int = 1,
        scale: float = 1.0,
        align_corners: bool = False,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        if not in_channels or any(int(c) < 1 for c in in_channels):
            raise ValueError(f"in_channels must be a non-empty list of positive ints, got {in_channels}")
        if num_classes < 1 or channels < 1:
            raise ValueError(f"num_classes and channels must be >= 1, got {num_classes}, {channels}")
        if channels % num_heads:
            raise ValueError(f"channels {channels} is not divisible by num_heads {num_heads}")
        self.in_channels = [int(c) for c in in_channels]
        self.num_classes = num_classes
        self.channels = channels
        self.num_heads = num_heads
        self.scale = float(scale)
        self.align_corners = align_corners
        self.backend = ops.check_backend_name(backend)
        cat = channels * len(self.in_channels)
        self.convs = nn.ModuleList(ConvBNAct(c, channels) for c in self.in_channels)
        self.q = nn.Sequential(ConvBNAct(cat, channels))
        self.clustering = nn.Sequential(ConvBNAct(cat, channels), nn.Conv2d(channels, num_classes, 1))
        self.k = _cluster_proj(cat, channels)
        self.v = _cluster_proj(cat, channels)
        self.proj = ConvBNAct(channels, channels)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        self.init_weights()

    def init_weights(self) -> None:
        """mmseg's defaults: He-normal (fan_out) convs before ReLU, unit BN, classifier N(0, 0.01)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.conv_seg.weight, 0.0, 0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def _check(self, feats: object) -> list[Tensor]:
        if not isinstance(feats, (list, tuple)) or len(feats) != len(self.in_channels):
            raise ValueError(f"expected a list of {len(self.in_channels)} feature maps, got "
                             f"{type(feats).__name__} of {len(feats) if hasattr(feats, '__len__') else '?'}")
        for i, (f, c) in enumerate(zip(feats, self.in_channels, strict=True)):
            if not isinstance(f, Tensor) or not f.is_floating_point():
                raise TypeError(f"feature {i} must be a floating torch.Tensor, got "
                                f"{getattr(f, 'dtype', type(f).__name__)}")
            if f.dim() != 4 or f.shape[1] != c:
                raise ValueError(f"feature {i} must have shape (B, {c}, H, W), got {tuple(f.shape)}")
        return list(feats)

    def forward(self, feats: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """feats[i] (B, C_i, H_i, W_i) -> (seg logits (B, K, H_0, W_0), cluster logits (B, K, H_0, W_0))."""
        feats = self._check(feats)
        size = feats[0].shape[2:]
        x = torch.cat([
            F.interpolate(conv(f), size=size, mode="bilinear", align_corners=self.align_corners)
            if f.shape[2:] != size else conv(f)
            for conv, f in zip(self.convs, feats, strict=True)
        ], dim=1)  # (B, L·D, H, W)
        b, _, h, w = x.shape
        n, heads, d = h * w, self.num_heads, self.channels // self.num_heads
        q = self.q(x).flatten(2).transpose(1, 2)  # (B, N, D)
        c_raw = self.clustering(x)  # (B, K, H, W)
        tokens = x.flatten(2).transpose(1, 2)  # (B, N, L·D)
        z = pool_clusters(c_raw.flatten(2), tokens, backend=self.backend)  # (B, K, L·D)
        k, v = self.k(z), self.v(z)  # (B, K, D)
        m = k.shape[1]
        out = ops.p2c_attention(q.reshape(b, n, heads, d), k.reshape(b, m, heads, d),
                                v.reshape(b, m, heads, d), self.scale, backend=self.backend)
        out = out.reshape(b, h, w, self.channels).permute(0, 3, 1, 2)
        out = self.conv_seg(self.dropout(self.proj(out)))
        return out, c_raw
