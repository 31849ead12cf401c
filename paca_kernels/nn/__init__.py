"""torch.nn modules of paca_kernels: PaCaAttention, PaCaBlock, clustering heads, layers and the
segmentation head. Each layer decides in one place (its ``_plan``) which path serves a call: fused
inference ops (:mod:`paca_kernels.ops.fused`) or its modules and the differentiable ops. Built on
:mod:`paca_kernels.ops`; the models that assemble these layers are :mod:`paca_kernels.models`."""

from .attention import PaCaAttention, PaCaLayer, check_tokens, paca_layer_kwargs
from .block import DEFAULT_PACA_CFG, DWConv, Mlp, PaCaBlock
from .clustering import CLUSTERING_HEADS, P2CConv2d, P2CLinear, P2CMlp, build_clustering
from .clustering_variants import (
    DensityClustering,
    GMMClustering,
    HierarchicalClustering,
    SoftKMeansClustering,
    rebuild_trees,
    ward_tree,
)
from .convert import convert_paca_layers
from .downsample import DownsampleV1
from .layers import BlurConv2d, DropPath, LayerNorm2d, build_act, build_norm
from .seg_head import PaCaSegHead

__all__ = [
    "CLUSTERING_HEADS",
    "DEFAULT_PACA_CFG",
    "BlurConv2d",
    "DWConv",
    "DensityClustering",
    "DownsampleV1",
    "DropPath",
    "GMMClustering",
    "HierarchicalClustering",
    "LayerNorm2d",
    "Mlp",
    "P2CConv2d",
    "P2CLinear",
    "P2CMlp",
    "PaCaAttention",
    "PaCaBlock",
    "PaCaLayer",
    "PaCaSegHead",
    "SoftKMeansClustering",
    "build_act",
    "build_clustering",
    "build_norm",
    "check_tokens",
    "convert_paca_layers",
    "paca_layer_kwargs",
    "rebuild_trees",
    "ward_tree",
]
