"""paca_kernels: fast, exact Patch-to-Cluster Attention (PaCa-ViT) for PyTorch.

Public API:
    paca_kernels.ops.cluster_pool / p2c_attention   functional ops with backend dispatch
    paca_kernels.reference                          the pure-PyTorch oracle
    PaCaAttention, PaCaLayer, PaCaBlock, PaCaViT    drop-in modules for the official code
    create_model, list_models                       the official PaCa-ViT variants
    load_pretrained                                 timm-like loading of a local checkpoint
    PaCaSegHead, PaCaSegmentor                      the official segmentation head, backbone + head
    paca_kernels.explain                            cluster maps, attention maps, importance masks, PNGs
    paca_kernels.deploy                             ONNX (ONNX Runtime) and AOTInductor exports

Importing never fails because the C++ extension is missing or stale: the ops then run on the
reference backend and ``paca_kernels.ops.backend_status()`` (or ``python -m paca_kernels``) says why.
"""

from __future__ import annotations

from . import _ext, deploy, explain, ops, reference
from .models import (
    PaCaSegmentor,
    PaCaTeacher_ConvMixer,
    PaCaViT,
    create_model,
    list_models,
    load_pretrained,
)
from .models._timm import install_timm_hook, register_timm_models
from .nn import PaCaAttention, PaCaBlock, PaCaLayer, PaCaSegHead, convert_paca_layers

__version__ = "0.1.0"

__all__ = [
    "PaCaAttention",
    "PaCaBlock",
    "PaCaLayer",
    "PaCaSegHead",
    "PaCaSegmentor",
    "PaCaTeacher_ConvMixer",
    "PaCaViT",
    "__version__",
    "convert_paca_layers",
    "create_model",
    "deploy",
    "explain",
    "list_models",
    "load_pretrained",
    "ops",
    "reference",
    "register_timm_models",
]

_ = _ext  # loaded by paca_kernels.ops; kept importable as paca_kernels._ext
install_timm_hook()
