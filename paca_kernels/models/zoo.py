"""Every official PaCa-ViT variant under its official name: ``create_model(name, **kwargs)``.

Names encode the clustering: ``pacavit_<size>_p2c<head>_<M1-3>_<M4>`` (onsite, stage-wise sharing),
``..._blockwise`` (every block clusters), ``pacavit_convmixer_<size>_100`` (external clustering teacher).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from .paca_vit import PaCaViT
from .pretrained import load_pretrained

__all__ = ["create_model", "list_models", "model_config"]

_ARCH: dict[str, dict[str, Any]] = {
    "tiny": {"embed_dims": [96, 192, 320, 384], "depths": [2, 2, 4, 2], "drop_path_rate": 0.1},
    "small": {"embed_dims": [96, 192, 320, 384], "depths": [3, 3, 10, 3], "drop_path_rate": 0.1},
    "base": {"embed_dims": [96, 192, 384, 512], "depths": [3, 3, 18, 3], "drop_path_rate": 0.5},
    "tiny_teacher": {"embed_dims": [96, 192, 320, 384], "depths": [2, 2, 2, 2],
                     "teacher_depths": [2, 2, 2, 2], "drop_path_rate": 0.1},
    "small_teacher": {"embed_dims": [96, 192, 320, 384], "depths": [3, 3, 7, 3],
                      "teacher_depths": [2, 2, 2, 2], "drop_path_rate": 0.1},
    "base_teacher": {"embed_dims": [96, 192, 384, 512], "depths": [3, 3, 16, 3],
                     "teacher_depths": [2, 2, 4, 2], "drop_path_rate": 0.1},
}

# name -> (arch, clustering head, per-stage clusters, onsite_clustering, teacher?)
_VARIANTS: dict[str, tuple[str, str, list[int], list[int], bool]] = {
    "pacavit_tiny_p2cconv_100_0": ("tiny", "P2CConv2d", [100, 100, 100, 0], [0, 0, 0, 0], False),
    "pacavit_small_p2cconv_100_0": ("small", "P2CConv2d", [100, 100, 100, 0], [0, 0, 0, 0], False),
    "pacavit_base_p2cconv_100_0": ("base", "P2CConv2d", [100, 100, 100, 0], [0, 0, 0, 0], False),
    "pacavit_small_p2cmlp_100_0": ("small", "P2CMlp", [100, 100, 100, 0], [0, 0, 0, 0], False),
    "pacavit_small_p2cconv_2_0": ("small", "P2CConv2d", [2, 2, 2, 0], [0, 0, 0, 0], False),
    "pacavit_small_p2cconv_49_0": ("small", "P2CConv2d", [49, 49, 49, 0], [0, 0, 0, 0], False),
    "pacavit_small_p2cconv_49_100": ("small", "P2CConv2d", [49, 64, 81, 100], [0, 0, 0, 0], False),
    "pacavit_small_p2cconv_100_49": ("small", "P2CConv2d", [100, 81, 64, 49], [0, 0, 0, 0], False),
    "pacavit_small_p2cconv_100": ("small", "P2CConv2d", [100, 100, 100, 100], [0, 0, 0, 0], False),
    "pacavit_small_p2cconv_100_blockwise": (
        "small", "P2CConv2d", [100, 100, 100, 100], [1, 1, 1, 1], False),
    "pacavit_convmixer_tiny_100": ("tiny_teacher", "P2CConv2d", [100] * 4, [0, 0, 0, 0], True),
    "pacavit_convmixer_small_100": ("small_teacher", "P2CConv2d", [100] * 4, [0, 0, 0, 0], True),
    "pacavit_convmixer_base_100": ("base_teacher", "P2CConv2d", [100] * 4, [0, 0, 0, 0], True),
}


def list_models(pattern: str | None = None) -> list[str]:
    """Names of the official variants (optionally those containing ``pattern``), sorted."""
    return sorted(n for n in _VARIANTS if pattern is None or pattern in n)


def model_config(name: str) -> dict[str, Any]:
    """The :class:`PaCaViT` keyword arguments of an official variant (a fresh copy)."""
    try:
        arch_name, head, clusters, onsite, teacher = _VARIANTS[name]
    except KeyError:
        raise ValueError(
            f"unknown PaCa-ViT variant {name!r}; available: {', '.join(list_models())}"
        ) from None
    arch = copy.deepcopy(_ARCH[arch_name])
    cfg: dict[str, Any] = {
        "arch_cfg": {
            "embed_dims": arch["embed_dims"], "num_heads": [2, 4, 8, 16],
            "mlp_ratios": [4, 4, 4, 4], "depths": arch["depths"],
        },
        "paca_cfg": {
            "type": head, "clusters": list(clusters), "onsite_clustering": list(onsite),
            "clustering_kernel_size": [7, 7, 7, 7],
            "cluster_norm_cfg": {"type": "LN", "eps": 1e-6}, "cluster_pos_embed": False,
            "norm_cfg1": {"type": "LN", "eps": 1e-6}, "norm_cfg2": {"type": "LN", "eps": 1e-6},
            "mlp_func": "Mlp", "with_dwconv_in_mlp": True, "with_shortcut_in_mlp": True,
        },
        "drop_path_rate": arch["drop_path_rate"],
        "layer_scale": None,
    }
    if teacher:
        cfg["paca_teacher_cfg"] = {
            "type": "PaCaTeacher_ConvMixer", "stem_cfg": None, "embed_dims": arch["embed_dims"],
            "depths": arch["teacher_depths"], "kernel_size": 7, "norm_cfg": {"type": "BN"},
            "act_cfg": {"type": "GELU"}, "drop_path_rate": 0.0, "return_outs": True,
        }
    return cfg


def create_model(
    name: str,
    *,
    pretrained: bool | str = False,
    num_classes: int = 1000,
    img_size: int | tuple[int, int] | None = None,
    features_only: bool = False,
    out_indices: tuple[int, ...] | list[int] | None = None,
    **kwargs: Any,
) -> PaCaViT:
    """Build an official PaCa-ViT variant.

    Args:
        name: one of :func:`list_models`.
        pretrained: False, or the path of a local checkpoint (an official state dict, or one under
            "state_dict"/"model"), loaded by :func:`~paca_kernels.models.pretrained.load_pretrained`:
            every tensor that fits is loaded, what cannot fit (the classifier for another
            ``num_classes``, clustering convs resized by ``downstream_cluster_num``) keeps its
            initialisation, and both are logged; a checkpoint of another architecture is a
            ValueError, a missing file FileNotFoundError. (The official release publishes no
            download URLs, so nothing is fetched.)
        num_classes: classifier outputs; 0 builds no head.
        img_size: input size (also accepted as the official ``image_size``); the models run at any
            size divisible by 32, this only matters for block position embeddings.
        features_only / out_indices: backbone mode for detection and segmentation: no head, and the
            forward returns the (B, C_i, H_i, W_i) maps of the stages in ``out_indices``
            (default all four).
        **kwargs: any other :class:`PaCaViT` argument (drop_path_rate, attn_drop, drop, backend,
            downstream_cluster_num, layer_scale, ...), overriding the variant's.
    """
    cfg = model_config(name)
    if "image_size" in kwargs:
        img_size = kwargs.pop("image_size")
    if features_only or out_indices is not None:
        num_classes = 0
        cfg["out_indices"] = list(out_indices) if out_indices is not None else [0, 1, 2, 3]
    cfg.update(kwargs)
    model = PaCaViT(num_classes=num_classes, img_size=img_size or 224, **cfg)
    model.default_cfg = model.pretrained_cfg = {
        "architecture": name, "num_classes": num_classes, "input_size": (3, 224, 224),
        "crop_pct": 0.9, "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225), "classifier": "head",
    }
    if pretrained is not False and pretrained is not None:
        load_pretrained(model, pretrained)  # type: ignore[arg-type]
    return model


def _variant_factory(name: str) -> Callable[..., PaCaViT]:
    def factory(pretrained: bool | str = False, **kwargs: Any) -> PaCaViT:
        return create_model(name, pretrained=pretrained, **kwargs)

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = f"Official PaCa-ViT variant {name} (see paca_kernels.create_model)."
    return factory


#: One factory function per variant, named like the official ones (timm registers these).
FACTORIES: dict[str, Callable[..., PaCaViT]] = {n: _variant_factory(n) for n in _VARIANTS}
