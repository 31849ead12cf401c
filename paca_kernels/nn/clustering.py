"""Clustering heads: patch tokens (B, N, C) -> cluster logits (B, M, N).

The softmax over N of these logits is the cluster assignment S (each cluster a distribution over the
patches). Parameter names follow the official release (an inner ``clustering`` Sequential), so the
official checkpoints load with ``strict=True``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from .clustering_variants import (
    DensityClustering,
    GMMClustering,
    HierarchicalClustering,
    SoftKMeansClustering,
)
from .layers import build_act, channels_last_conv_weights_

__all__ = ["CLUSTERING_HEADS", "P2CConv2d", "P2CLinear", "P2CMlp", "build_clustering"]


class _Transpose12(nn.Module):
    """(B, N, M) -> (B, M, N)."""

    def forward(self, x: Tensor) -> Tensor:
        return x.transpose(1, 2)


class _Flatten2(nn.Module):
    """(B, M, H, W) -> (B, M, H·W)."""

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(2)


class P2CLinear(nn.Module):
    """Linear clustering: logits = (x · W)ᵀ, no bias (``clustering.0``)."""

    def __init__(self, dim: int, num_clusters: int, **kwargs: Any) -> None:
        super().__init__()
        self.clustering = nn.Sequential(nn.Linear(dim, num_clusters, bias=False), _Transpose12())

    def forward(self, x: Tensor, H: int, W: int) -> Tensor:
        """x (B, N, C) -> logits (B, M, N)."""
        return self.clustering(x)


class P2CMlp(nn.Module):
    """MLP clustering: Linear(C, C·mlp_ratio), activation, Linear(·, M) (``clustering.0/2``)."""

    def __init__(
        self,
        dim: int,
        num_clusters: int,
        mlp_ratio: float = 4.0,
        act_cfg: Mapping[str, Any] | str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.clustering = nn.Sequential(
            nn.Linear(dim, hidden),
            build_act(act_cfg if act_cfg is not None else "gelu"),
            nn.Linear(hidden, num_clusters),
            _Transpose12(),
        )

    def forward(self, x: Tensor, H: int, W: int) -> Tensor:
        """x (B, N, C) -> logits (B, M, N)."""
        return self.clustering(x)


class P2CConv2d(nn.Module):
    """Convolutional clustering on the (H, W) grid: depthwise k×k conv, act, 1×1 conv, act,
    1×1 conv to M channels without bias (``clustering.0/2/4``)."""

    def __init__(
        self,
        dim: int,
        num_clusters: int,
        kernel_size: int = 7,
        act_cfg: Mapping[str, Any] | str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        act = act_cfg if act_cfg is not None else "gelu"
        self.clustering = nn.Sequential(
            nn.Conv2d(dim, dim, kernel_size, 1, (kernel_size - 1) // 2, groups=dim),
            build_act(act),
            nn.Conv2d(dim, dim, 1, 1, 0),
            build_act(act),
            nn.Conv2d(dim, num_clusters, 1, 1, 0, bias=False),
            _Flatten2(),
        )
        channels_last_conv_weights_(self)  # its input is a channels-last view (DDP's stride check)

    def forward(self, x: Tensor, H: int, W: int) -> Tensor:
        """x (B, N, C) with N = H·W -> logits (B, M, N)."""
        b, _, c = x.shape
        return self.clustering(x.transpose(1, 2).reshape(b, c, H, W))


#: Names accepted by ``clustering=``: the short ones and the official class names.
CLUSTERING_HEADS: dict[str, type[nn.Module]] = {
    "conv": P2CConv2d,
    "mlp": P2CMlp,
    "linear": P2CLinear,
    "P2CConv2d": P2CConv2d,
    "P2CMlp": P2CMlp,
    "P2CLinear": P2CLinear,
    # Distance-based variants (nn/clustering_variants.py).
    "kmeans": SoftKMeansClustering,
    "gmm": GMMClustering,
    "hierarchical": HierarchicalClustering,
    "density": DensityClustering,
    "SoftKMeansClustering": SoftKMeansClustering,
    "GMMClustering": GMMClustering,
    "HierarchicalClustering": HierarchicalClustering,
    "DensityClustering": DensityClustering,
}


def build_clustering(
    kind: str | type[nn.Module],
    dim: int,
    num_clusters: int,
    *,
    kernel_size: int = 7,
    mlp_ratio: float = 4.0,
    act_cfg: Mapping[str, Any] | str | None = None,
    **kwargs: Any,
) -> nn.Module:
    """A clustering head by name ("conv", "mlp", "linear", "kmeans", "gmm", "hierarchical",
    "density" or a class name in
    :data:`CLUSTERING_HEADS`) or class.

    A custom class must take ``(dim, num_clusters, **kwargs)`` and map (x (B, N, C), H, W) to
    logits (B, M, N). Extra ``kwargs`` (e.g. ``temperature`` of the k-means/GMM heads) go to the class.
    """
    if isinstance(kind, str):
        try:
            cls = CLUSTERING_HEADS[kind]
        except KeyError:
            raise ValueError(
                f"unknown clustering head {kind!r}; known: {', '.join(CLUSTERING_HEADS)}"
            ) from None
    else:
        cls = kind
    return cls(
        dim=dim, num_clusters=num_clusters, kernel_size=kernel_size, mlp_ratio=mlp_ratio,
        act_cfg=act_cfg, **kwargs,
    )
