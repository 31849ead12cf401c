"""convert_paca_layers: swap the official PaCa layers of a model for paca_kernels modules, in place."""

from __future__ import annotations

from torch import nn

from ..ops.dispatch import check_backend_name
from .attention import PaCaAttention

__all__ = ["convert_paca_layers"]

_HEADS = {"P2CConv2d": "conv", "P2CMlp": "mlp", "P2CLinear": "linear"}


def _is_official_layer(module: nn.Module) -> bool:
    # Matched by name and shape, not by import: the official package (timm, mmcv, einops, ...) need
    # not be importable here for a model built by it to be converted.
    return (
        type(module).__name__ == "PaCaLayer"
        and not isinstance(module, PaCaAttention)
        and all(hasattr(module, a) for a in ("q", "k", "v", "proj", "num_heads", "num_clusters"))
    )


def _converted(layer: nn.Module, backend: str | None) -> PaCaAttention:
    """A PaCaAttention computing what the official ``layer`` computes, with its weights."""
    dim = layer.q.in_features
    m = int(layer.num_clusters)
    kwargs: dict = {}
    if m > 0:
        onsite = bool(getattr(layer, "onsite_clustering", False)) and hasattr(layer, "clustering")
        kwargs["onsite_clustering"] = onsite
        norm = layer.cluster_norm
        kwargs["cluster_norm"] = isinstance(norm, nn.LayerNorm)
        if isinstance(norm, nn.LayerNorm):
            kwargs["cluster_norm_eps"] = norm.eps
        elif not isinstance(norm, nn.Identity):
            raise ValueError(f"cannot convert a cluster norm of type {type(norm).__name__}")
        kwargs["cluster_pos_embed"] = bool(getattr(layer, "cluster_pos_embed", False))
        if onsite:
            head = layer.clustering
            kind = _HEADS.get(type(head).__name__)
            if kind is None:
                raise ValueError(f"cannot convert the clustering head {type(head).__name__}")
            seq = head.clustering
            kwargs["clustering"] = kind
            kwargs["act_cfg"] = type(seq[1]) if kind != "linear" else None
            if kind == "conv":
                kwargs["clustering_kernel_size"] = seq[0].kernel_size[0]
            if kind == "mlp":
                kwargs["mlp_ratio"] = seq[0].out_features / dim
    proj_drop = layer.proj_drop.p if isinstance(layer.proj_drop, nn.Dropout) else 0.0
    new = PaCaAttention(
        dim, int(layer.num_heads), m, attn_drop=float(getattr(layer, "attn_drop", 0.0)),
        proj_drop=proj_drop, backend=backend, **kwargs,
    )
    new.load_state_dict(layer.state_dict(), strict=True)
    new.to(device=layer.q.weight.device, dtype=layer.q.weight.dtype)
    new.train(layer.training)
    if hasattr(layer, "attn_viz"):
        new.attn_viz = layer.attn_viz  # keep the official visualisation hooks attached
    return new


def convert_paca_layers(model: nn.Module, *, backend: str | None = None) -> nn.Module:
    """Replace, in place, every official ``PaCaLayer`` inside ``model`` (an official PaCa-ViT, or any
    model holding such layers) by a :class:`PaCaAttention` with the same configuration and weights,
    whose forward ``(x, H, W, z) -> (out, z)`` is the official one. Returns ``model``.

    Args:
        model: the model (or a single official PaCaLayer, which is then returned converted).
        backend: ops backend of the new layers (None: ``PACA_KERNELS_BACKEND``, then automatic).
    """
    check_backend_name(backend)
    if _is_official_layer(model):
        return _converted(model, backend)
    targets = [(name, mod) for name, mod in model.named_modules() if _is_official_layer(mod)]
    for name, layer in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, _converted(layer, backend))
    return model
