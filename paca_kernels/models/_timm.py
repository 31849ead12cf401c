"""Optional timm integration: register the PaCa-ViT variants in timm's model registry.

``import paca_kernels`` never imports timm (it cannot be imported on CPU-only machines without
torchvision). Registration happens when timm is imported: at once if it already is, else through a
post-import hook on ``import timm`` (set ``PACA_KERNELS_NO_TIMM_HOOK=1`` to disable the hook), or
explicitly with :func:`register_timm_models`.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import os
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

from .zoo import FACTORIES

__all__: list[str] = ["install_timm_hook", "register_timm_models"]

_log = logging.getLogger("paca_kernels")
# timm.create_model passes these to every entry point; PaCa-ViT has no hosted weights, so only a
# local file named by them (timm's ``pretrained_cfg_overlay=dict(file=path)``) is used.
_TIMM_ONLY_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def _timm_entry(name: str) -> Callable[..., Any]:
    factory = FACTORIES[name]

    def entry(pretrained: bool | str = False, **kwargs: Any) -> Any:
        cfgs = [kwargs.pop(key, None) for key in _TIMM_ONLY_KWARGS][:2]
        if pretrained is True:
            # timm's idiom for local weights: pretrained=True, pretrained_cfg_overlay=dict(file=path)
            files = [_cfg_get(c, "file") for c in reversed(cfgs)]
            pretrained = next((f for f in files if f), True)
        return factory(pretrained=pretrained, **kwargs)

    entry.__name__ = entry.__qualname__ = name
    entry.__module__ = __name__
    entry.__doc__ = factory.__doc__
    return entry


def _cfg_get(cfg: Any, key: str) -> Any:
    """``cfg[key]`` for a dict, ``cfg.key`` for timm's PretrainedCfg dataclass, else None."""
    if cfg is None:
        return None
    return cfg.get(key) if isinstance(cfg, dict) else getattr(cfg, key, None)


def register_timm_models() -> list[str]:
    """Register every variant with timm (imports timm); returns the names newly registered."""
    from timm.models import is_model, register_model

    added = []
    for name in FACTORIES:
        if not is_model(name):
            register_model(_timm_entry(name))
            added.append(name)
    return added


class _TimmImportHook(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when ``timm`` is being imported, it wraps the real loader so that the
    variants are registered right after timm's own ``__init__`` has run."""

    def find_spec(self, fullname: str, path: Any, target: ModuleType | None = None) -> Any:
        if fullname != "timm":
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        real_exec = loader.exec_module

        def exec_module(module: ModuleType) -> None:
            real_exec(module)
            _remove_hook()
            try:
                register_timm_models()
            except Exception as exc:  # noqa: BLE001 (a broken timm must not break the import)
                _log.warning("paca_kernels: could not register models with timm: %s", exc)

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


_HOOK = _TimmImportHook()


def _remove_hook() -> None:
    if _HOOK in sys.meta_path:
        sys.meta_path.remove(_HOOK)


def install_timm_hook() -> None:
    """Register now if timm is imported, else on its import (no-op with PACA_KERNELS_NO_TIMM_HOOK=1)."""
    if "timm" in sys.modules and hasattr(sys.modules["timm"], "models"):
        try:
            register_timm_models()
        except Exception as exc:  # noqa: BLE001 (same)
            _log.warning("paca_kernels: could not register models with timm: %s", exc)
        return
    if os.environ.get("PACA_KERNELS_NO_TIMM_HOOK") == "1" or _HOOK in sys.meta_path:
        return
    sys.meta_path.insert(0, _HOOK)
