"""The official PaCa-ViT code (iVMCL/PaCaViT, ``models/paca_vit.py``) as a benchmark baseline.

The official models import timm, mmengine, mmcv and einops. timm does not import beside the torch this
project tests with, and mmcv/mmengine are heavy and not installed here, so :func:`load_official` puts
small stand-ins for the few names the official files use into ``sys.modules`` (only for the packages
that do not import), then imports the official ``models`` package from a checkout the caller names:
nothing of the official code is copied into this repository. einops must be installed
(``pip install --no-deps einops``; it has no dependencies).

The stand-ins (what the official files call, nothing more):

- ``timm``: ``DropPath``, ``to_2tuple``, ``trunc_normal_``, ``LayerNorm2d`` (LayerNorm over the channels
  of an NCHW tensor), ``_is_contiguous``, ``register_model`` (records the function), the ImageNet
  mean/std constants;
- ``mmengine``: a ``MODELS`` registry (``register_module`` as call or decorator, ``in``),
  ``constant_init``, ``kaiming_init``, ``load_checkpoint``;
- ``mmcv.cnn``: ``build_norm_layer`` ("LN", "BN"/"BN2d", "GN", "LayerNorm2d" and registered names;
  returns ``(name, layer)`` as mmcv does), ``build_activation_layer`` ("GELU", "ReLU", "SiLU", ...),
  ``ConvModule`` (conv → norm → activation, mmcv's parameter names ``conv``/``norm name``/``activate``).

The stand-ins change no computation of the official layers: parameters, buffers and forward are the
official code's; :func:`check_against` asserts that the official model built with them takes a
paca_kernels model's ``state_dict`` with ``strict=True`` and gives its logits.

    python benchmarks/official_code.py /path/to/PaCaViT [variant]   # builds it and checks it

Used by ``benchmarks/deploy_interleaved.py --official-src`` (ONNX Runtime on the official model) and the
training benchmark's ``official`` provider.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["check_against", "create_official", "load_official"]


# -- stand-ins ---------------------------------------------------------------------------------------


class _DropPath(nn.Module):
    """Stochastic depth per sample (what timm's DropPath computes)."""

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True) -> None:
        super().__init__()
        self.drop_prob, self.scale_by_keep = drop_prob, scale_by_keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * (mask / keep if self.scale_by_keep and keep > 0.0 else mask)


class _LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


def _to_2tuple(x: Any) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x, x)


def _is_contiguous(t: torch.Tensor) -> bool:
    if torch.jit.is_scripting():
        return t.is_contiguous()
    return t.is_contiguous(memory_format=torch.contiguous_format)


class _Registry:
    """mmengine's Registry, the part the official files use."""

    def __init__(self) -> None:
        self._modules: dict[str, Any] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._modules

    def get(self, name: str) -> Any:
        return self._modules.get(name)

    def register_module(self, name: str | None = None, module: Any = None, force: bool = False) -> Any:
        def add(obj: Any) -> Any:
            self._modules[name or obj.__name__] = obj
            return obj

        return add(module) if module is not None else add


_MODELS = _Registry()
_REGISTERED_MODELS: dict[str, Callable[..., nn.Module]] = {}

_NORMS: dict[str, tuple[str, Callable[..., nn.Module]]] = {
    "LN": ("ln", lambda c, **kw: nn.LayerNorm(c, **kw)),
    "BN": ("bn", lambda c, **kw: nn.BatchNorm2d(c, **kw)),
    "BN2d": ("bn", lambda c, **kw: nn.BatchNorm2d(c, **kw)),
    "BN1d": ("bn", lambda c, **kw: nn.BatchNorm1d(c, **kw)),
    "GN": ("gn", lambda c, num_groups=32, **kw: nn.GroupNorm(num_groups, c, **kw)),
    "LayerNorm2d": ("layernorm2d", lambda c, **kw: _LayerNorm2d(c, **kw)),
}


def _build_norm_layer(cfg: dict, num_features: int, postfix: int | str = "") -> tuple[str, nn.Module]:
    cfg = dict(cfg)
    kind = cfg.pop("type")
    requires_grad = cfg.pop("requires_grad", True)
    if kind in _NORMS:
        abbr, make = _NORMS[kind]
        layer = make(num_features, **cfg)
    elif kind in _MODELS:
        abbr, layer = kind.lower(), _MODELS.get(kind)(num_features, **cfg)
    else:
        raise KeyError(f"official_code: no stand-in for norm type {kind!r}")
    for p in layer.parameters():
        p.requires_grad = requires_grad
    return f"{abbr}{postfix}", layer


_ACTS: dict[str, Callable[..., nn.Module]] = {
    "GELU": nn.GELU, "ReLU": nn.ReLU, "SiLU": nn.SiLU, "Swish": nn.SiLU, "Sigmoid": nn.Sigmoid,
    "Tanh": nn.Tanh, "LeakyReLU": nn.LeakyReLU, "HSwish": nn.Hardswish, "HSigmoid": nn.Hardsigmoid,
}


def _build_activation_layer(cfg: dict) -> nn.Module:
    cfg = dict(cfg)
    kind = cfg.pop("type")
    cfg.pop("inplace", None)
    if kind not in _ACTS:
        raise KeyError(f"official_code: no stand-in for activation type {kind!r}")
    return _ACTS[kind](**cfg)


class _ConvModule(nn.Module):
    """mmcv's ConvModule for the official downsampling layers: conv → norm → activation (order as
    given), with mmcv's submodule names (``conv``, the norm's ``build_norm_layer`` name, ``activate``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple, stride: int = 1,
                 padding: int = 0, dilation: int = 1, groups: int = 1, bias: bool | str = "auto",
                 conv_cfg: dict | None = None, norm_cfg: dict | None = None, act_cfg: dict | None = None,
                 order: tuple[str, ...] = ("conv", "norm", "act"), **_: Any) -> None:
        super().__init__()
        if conv_cfg is not None and conv_cfg.get("type", "Conv2d") != "Conv2d":
            raise KeyError(f"official_code: no stand-in for conv type {conv_cfg['type']!r}")
        if bias == "auto":
            bias = norm_cfg is None
        self.order = tuple(order)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                              bias=bool(bias))
        self.norm_name = None
        if norm_cfg is not None:
            feats = out_channels if self.order.index("norm") > self.order.index("conv") else in_channels
            self.norm_name, norm = _build_norm_layer(norm_cfg, feats)
            self.add_module(self.norm_name, norm)
        self.activate = _build_activation_layer(act_cfg) if act_cfg is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for step in self.order:
            if step == "conv":
                x = self.conv(x)
            elif step == "norm" and self.norm_name is not None:
                x = getattr(self, self.norm_name)(x)
            elif step == "act" and self.activate is not None:
                x = self.activate(x)
        return x


def _constant_init(module: nn.Module, val: float, bias: float = 0.0) -> None:
    if getattr(module, "weight", None) is not None:
        nn.init.constant_(module.weight, val)
    if getattr(module, "bias", None) is not None:
        nn.init.constant_(module.bias, bias)


def _kaiming_init(module: nn.Module, a: float = 0.0, mode: str = "fan_out", nonlinearity: str = "relu",
                  bias: float = 0.0, distribution: str = "normal") -> None:
    init = nn.init.kaiming_uniform_ if distribution == "uniform" else nn.init.kaiming_normal_
    if getattr(module, "weight", None) is not None:
        init(module.weight, a=a, mode=mode, nonlinearity=nonlinearity)
    if getattr(module, "bias", None) is not None:
        nn.init.constant_(module.bias, bias)


def _load_checkpoint(model: nn.Module, filename: str, map_location: Any = None, strict: bool = False,
                     logger: Any = None, **_: Any) -> dict:
    ckpt = torch.load(filename, map_location=map_location, weights_only=True)
    state = ckpt.get("state_dict", ckpt.get("model", ckpt)) if isinstance(ckpt, dict) else ckpt
    model.load_state_dict(state, strict=strict)
    return ckpt


def _register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    _REGISTERED_MODELS[fn.__name__] = fn
    return fn


def _module(name: str, **attrs: Any) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    mod.__path__ = []  # a package, so that submodules resolve
    return mod


def _importable(name: str) -> bool:
    if name in sys.modules:
        return sys.modules[name] is not None
    try:
        importlib.import_module(name)
    except (ImportError, RuntimeError, AttributeError):  # timm beside a mismatched torchvision
        return False
    return True


def _install_standins() -> list[str]:
    """Put stand-ins into sys.modules for timm / mmengine / mmcv where they do not import; the names
    of the stand-ins installed."""
    installed = []
    if not _importable("timm"):
        layers = {"DropPath": _DropPath, "to_2tuple": _to_2tuple, "trunc_normal_": nn.init.trunc_normal_,
                  "LayerNorm2d": _LayerNorm2d}
        mods = {
            "timm": _module("timm"),
            "timm.data": _module("timm.data", IMAGENET_DEFAULT_MEAN=(0.485, 0.456, 0.406),
                                 IMAGENET_DEFAULT_STD=(0.229, 0.224, 0.225)),
            "timm.models": _module("timm.models"),
            "timm.models.layers": _module("timm.models.layers", **layers),
            "timm.models._registry": _module("timm.models._registry", register_model=_register_model),
            "timm.layers": _module("timm.layers", **layers),
            "timm.layers.norm": _module("timm.layers.norm", _is_contiguous=_is_contiguous,
                                        LayerNorm2d=_LayerNorm2d),
        }
        sys.modules.update(mods)
        installed.append("timm")
    if not _importable("mmengine"):
        sys.modules.update({
            "mmengine": _module("mmengine"),
            "mmengine.registry": _module("mmengine.registry", MODELS=_MODELS),
            "mmengine.model": _module("mmengine.model", constant_init=_constant_init, kaiming_init=_kaiming_init),
            "mmengine.runner": _module("mmengine.runner", load_checkpoint=_load_checkpoint),
        })
        installed.append("mmengine")
    if not _importable("mmcv"):
        sys.modules.update({
            "mmcv": _module("mmcv"),
            "mmcv.cnn": _module("mmcv.cnn", build_norm_layer=_build_norm_layer,
                                build_activation_layer=_build_activation_layer, ConvModule=_ConvModule),
        })
        installed.append("mmcv")
    return installed


# -- loading -----------------------------------------------------------------------------------------

_LOADED: dict[str, types.ModuleType] = {}


def load_official(src: str | Path) -> types.ModuleType:
    """The official ``models.paca_vit`` module from the checkout ``src`` of iVMCL/PaCaViT (stand-ins
    installed first for what does not import). Imported under the package name ``paca_official``."""
    root = Path(src).expanduser().resolve()
    pkg = root / "models"
    if not (pkg / "paca_vit.py").is_file():
        raise FileNotFoundError(f"{root} is not a checkout of iVMCL/PaCaViT: no models/paca_vit.py")
    key = str(root)
    if key in _LOADED:
        return _LOADED[key]
    if importlib.util.find_spec("einops") is None:
        raise ImportError("the official code needs einops: pip install --no-deps einops")
    _install_standins()
    name = "paca_official"
    spec = importlib.util.spec_from_file_location(name, pkg / "__init__.py", submodule_search_locations=[str(pkg)])
    package = importlib.util.module_from_spec(spec)
    sys.modules[name] = package
    spec.loader.exec_module(package)
    module = importlib.import_module(f"{name}.paca_vit")
    _LOADED[key] = module
    return module


def create_official(src: str | Path, variant: str, **kwargs: Any) -> nn.Module:
    """The official model ``variant`` (e.g. ``pacavit_tiny_p2cconv_100_0``), built by the official code.

    The official builders pop ``drop_path_rate`` from their module-level architecture dicts, so a
    second build of a variant would lose it; the dicts are copied back around each call."""
    module = load_official(src)
    builder = getattr(module, variant, None)
    if builder is None or not callable(builder):
        raise KeyError(f"the official code has no model {variant!r}")
    settings = getattr(module, "_arch_settings", None)
    saved = {k: dict(v) for k, v in settings.items()} if isinstance(settings, dict) else None
    try:
        return builder(**kwargs)
    finally:
        if saved is not None:
            settings.clear()
            settings.update(saved)


def check_against(official: nn.Module, model: nn.Module, img: torch.Tensor, rtol: float = 1e-4) -> float:
    """Load ``model``'s state_dict into ``official`` (strict) and compare their eval logits on ``img``;
    the relative error (max abs difference over max abs value). Raises AssertionError above ``rtol``."""
    official.load_state_dict(model.state_dict(), strict=True)
    official.eval()
    model.eval()
    with torch.no_grad():
        want, got = model(img), official(img)
    err = float((got - want).abs().max() / want.abs().max().clamp_min(math.ulp(1.0)))
    assert err <= rtol, f"official vs paca_kernels logits: relative error {err:.2e} > {rtol:.0e}"
    return err


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(__doc__)
        return 2
    variant = argv[1] if len(argv) > 1 else "pacavit_tiny_p2cconv_100_0"
    from paca_kernels import create_model

    torch.manual_seed(0)
    official = create_official(argv[0], variant)
    ours = create_model(variant, backend="reference")
    err = check_against(official, ours, torch.randn(2, 3, 224, 224))
    print(f"{variant}: official code loads paca_kernels' state_dict (strict); logits relative error {err:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
