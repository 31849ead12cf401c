"""Explainability for PaCa models: cluster assignments, attention maps, importance masks, overlays.

Everything is read through forward hooks that a context manager registers and removes, so a model's
modules are never edited, its outputs do not change, and nothing is computed when no one asks:

- each clustering head (the ``clustering`` module of a :class:`~paca_kernels.PaCaAttention` that clusters
  on site, a :class:`~paca_kernels.models.PaCaTeacher_ConvMixer`'s ``to_clusters{i}`` conv, a
  :class:`~paca_kernels.nn.PaCaSegHead`'s ``clustering``) gives the cluster logits (B, M, N) on its
  H×W grid; the assignment is S = softmax(logits over N), shown as maps (B, M, H, W);
- each PaCa layer's ``attn_viz`` hook point gives the per-head attention A = softmax(q·kᵀ/√d over M),
  (B, h, N, M). A hook there makes the layer compute A explicitly (the unfused path, slower and with
  B·h·N·M memory), which is why attention is recorded only with ``attention=True``.

Importance (this module's definition; the official release publishes no visualisation code): for a
stage with M clusters, importance[n] = (N/M)·Σ_m S[m, n], the cluster mass a patch receives relative to
a uniform assignment (mean 1 over the patches). The importance mask keeps the patches whose importance
is in the top ``keep_ratio`` of the image, upsampled (nearest) to the image and multiplied into it.

Example::

    with torch.no_grad():
        ex = paca_kernels.explain.explain(model.eval(), images, attention=True)
    ex.clusters["stage1.0.attn"]          # (B, M, H1, W1) soft assignment maps
    ex.attention_maps("stage1.0.attn")    # (B, h, M, H1, W1)
    ex.masked_images(images, "stage1.0.attn", keep_ratio=0.5)
    paca_kernels.explain.save_overlays(ex, images, "out/")   # PNGs, needs matplotlib
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .models.paca_vit import PaCaTeacher_ConvMixer
from .nn.attention import PaCaAttention
from .nn.seg_head import PaCaSegHead

__all__ = ["Explanation", "PaCaRecorder", "explain", "save_overlays"]


def _infer_grid(n: int, image_hw: tuple[int, int] | None) -> tuple[int, int]:
    """The H×W grid of n patches with the image's aspect ratio (PaCa grids are image / 2^k)."""
    if image_hw is not None:
        ih, iw = image_hw
        h = max(1, round(math.sqrt(n * ih / iw)))
        if n % h == 0:
            return h, n // h
    h = math.isqrt(n)
    if h * h == n:
        return h, h
    raise ValueError(f"cannot infer the patch grid of N = {n} patches (image size {image_hw})")


@dataclass
class Explanation:
    """What one forward recorded. Names are module names in ``model.named_modules()``.

    Attributes:
        output: the model's output (unchanged).
        image_size: (H, W) of the input images.
        cluster_logits: name -> (B, M, N) cluster logits, in the order the layers ran.
        attention: name -> (B, h, N, M) attention maps (only with ``attention=True``).
        grids: name -> (H, W), the patch grid of that layer.
    """

    output: Any
    image_size: tuple[int, int] | None
    cluster_logits: dict[str, Tensor] = field(default_factory=dict)
    attention: dict[str, Tensor] = field(default_factory=dict)
    grids: dict[str, tuple[int, int]] = field(default_factory=dict)

    def _name(self, name: str | None) -> str:
        if name is None:
            if not self.cluster_logits:
                raise ValueError("no cluster assignment was recorded (the model has no clustering heads?)")
            return next(iter(self.cluster_logits))
        if name not in self.cluster_logits:
            raise KeyError(f"no cluster assignment recorded for {name!r}; recorded: {list(self.cluster_logits)}")
        return name

    @property
    def clusters(self) -> dict[str, Tensor]:
        """name -> (B, M, H, W) soft assignment maps S = softmax(logits over N) (each map sums to 1)."""
        return {name: self.assignment(name) for name in self.cluster_logits}

    def assignment(self, name: str | None = None) -> Tensor:
        """(B, M, H, W) soft assignment maps of one layer (default: the first recorded)."""
        name = self._name(name)
        logits = self.cluster_logits[name]
        h, w = self.grids[name]
        return torch.softmax(logits.float(), dim=-1).reshape(logits.shape[0], logits.shape[1], h, w)

    def hard_assignment(self, name: str | None = None) -> Tensor:
        """(B, H, W) int64: for each patch, the cluster that gives it the most weight (argmax over M
        of S) — a segmentation-like view of the clusters."""
        return self.assignment(name).argmax(dim=1)

    def importance(self, name: str | None = None) -> Tensor:
        """(B, H, W) importance (N/M)·Σ_m S[m, n] (mean 1 over the patches of an image)."""
        s = self.assignment(name)
        _, m, h, w = s.shape
        return s.sum(dim=1) * (h * w / m)

    def importance_mask(
        self, name: str | None = None, keep_ratio: float = 0.5, size: tuple[int, int] | None = None
    ) -> Tensor:
        """(B, 1, H', W') float 0/1 mask of the top ``keep_ratio`` patches by importance, upsampled
        (nearest) to ``size`` (default: the image size)."""
        if not 0.0 < keep_ratio <= 1.0:
            raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
        imp = self.importance(name)
        b, h, w = imp.shape
        flat = imp.reshape(b, -1)
        k = max(1, round(keep_ratio * h * w))
        thresh = flat.topk(k, dim=1).values[:, -1:]  # the k-th largest per image
        mask = (flat >= thresh).to(imp.dtype).reshape(b, 1, h, w)
        size = size or self.image_size or (h, w)
        return F.interpolate(mask, size=size, mode="nearest")

    def masked_images(self, images: Tensor, name: str | None = None, keep_ratio: float = 0.5) -> Tensor:
        """images (B, C, H, W) × the importance mask: the patches outside the top ``keep_ratio`` are 0."""
        mask = self.importance_mask(name, keep_ratio, size=tuple(images.shape[2:]))
        return images * mask.to(images.dtype)

    def attention_maps(self, name: str) -> Tensor:
        """(B, h, M, H, W): for each head and cluster (key) m, the attention each patch pays to it."""
        if name not in self.attention:
            raise KeyError(f"no attention recorded for {name!r} (explain(..., attention=True)); "
                           f"recorded: {list(self.attention)}")
        a = self.attention[name]
        b, heads, _, m = a.shape
        h, w = self.grids[name]
        return a.transpose(2, 3).reshape(b, heads, m, h, w)


class PaCaRecorder:
    """Context manager: while open, records cluster logits (and, with ``attention=True``, attention
    maps) of every PaCa layer, teacher and segmentation head in ``model``; hooks are removed on exit.

    Args:
        model: any module holding PaCaAttention layers (PaCaViT, a backbone, a converted model, ...).
        attention: also record attention maps (makes those layers use the unfused attention path).
        layers: if given, only modules whose name contains one of these strings.
        to_cpu: move the recorded tensors to the CPU.
        image_size: (H, W) of the images, used to infer grids where a hook does not see them.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        attention: bool = False,
        layers: Iterable[str] | None = None,
        to_cpu: bool = False,
        image_size: tuple[int, int] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.attention = attention
        self.layers = list(layers) if layers is not None else None
        self.to_cpu = to_cpu
        self.image_size = image_size
        self.cluster_logits: dict[str, Tensor] = {}
        self.attn: dict[str, Tensor] = {}
        self.grids: dict[str, tuple[int, int]] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _keep(self, name: str) -> bool:
        return self.layers is None or any(s in name for s in self.layers)

    def _store(self, t: Tensor) -> Tensor:
        t = t.detach()
        return t.cpu() if self.to_cpu else t

    def _record_logits(self, name: str, logits: Tensor, grid: tuple[int, int]) -> None:
        self.cluster_logits[name] = self._store(logits)
        self.grids[name] = grid

    def __enter__(self) -> Self:
        for name, mod in self.model.named_modules():
            if not self._keep(name):
                continue
            if isinstance(mod, PaCaAttention):
                if mod.num_clusters > 0 and mod.onsite_clustering:
                    self._handles.append(mod.clustering.register_forward_hook(self._paca_hook(name)))
                if self.attention:
                    self._handles.append(mod.attn_viz.register_forward_hook(self._attn_hook(name)))
            elif isinstance(mod, PaCaTeacher_ConvMixer):
                for i in range(mod.num_stages):
                    conv = getattr(mod, f"to_clusters{i + 1}")
                    if conv is not None:
                        self._handles.append(conv.register_forward_hook(self._map_hook(f"{name}.to_clusters{i + 1}")))
            elif isinstance(mod, PaCaSegHead):
                self._handles.append(mod.clustering.register_forward_hook(self._map_hook(f"{name}.clustering")))
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove every hook (idempotent)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _paca_hook(self, name: str) -> Any:
        def hook(_mod: nn.Module, inputs: tuple[Any, ...], out: Tensor) -> None:
            # The clustering heads are called as head(x, H, W): the grid comes with them.
            h, w = int(inputs[1]), int(inputs[2])
            self._record_logits(name, out, (h, w))
        return hook

    def _map_hook(self, name: str) -> Any:
        def hook(_mod: nn.Module, _inputs: tuple[Any, ...], out: Tensor) -> None:
            b, m, h, w = out.shape
            self._record_logits(name, out.reshape(b, m, h * w), (h, w))
        return hook

    def _attn_hook(self, name: str) -> Any:
        def hook(_mod: nn.Module, _inputs: tuple[Any, ...], out: Tensor) -> None:
            self.attn[name] = self._store(out)
            if name not in self.grids:  # a layer that shares its stage's assignment
                self.grids[name] = _infer_grid(out.shape[2], self.image_size)
        return hook


def explain(
    model: nn.Module,
    images: Tensor,
    *,
    attention: bool = False,
    layers: Iterable[str] | None = None,
    to_cpu: bool = False,
    **forward_kwargs: Any,
) -> Explanation:
    """Run ``model(images, **forward_kwargs)`` once under :class:`PaCaRecorder` and return what it saw.

    Runs in whatever mode (train/eval) and grad mode the caller set; wrap it in ``torch.no_grad()`` for
    inference. The returned ``output`` is the model's ordinary output.

    Args:
        model: a model with PaCa layers (see :class:`PaCaRecorder`).
        images: (B, C, H, W) input.
        attention: record the per-head attention maps too (costs the unfused attention path).
        layers: restrict recording to module names containing one of these strings.
        to_cpu: move the recorded tensors to the CPU.
    """
    if not isinstance(images, Tensor) or images.dim() != 4:
        raise ValueError(f"images must be a (B, C, H, W) tensor, got {getattr(images, 'shape', type(images))}")
    size = (int(images.shape[2]), int(images.shape[3]))
    with PaCaRecorder(model, attention=attention, layers=layers, to_cpu=to_cpu, image_size=size) as rec:
        output = model(images, **forward_kwargs)
    return Explanation(output=output, image_size=size, cluster_logits=dict(rec.cluster_logits),
                       attention=dict(rec.attn), grids=dict(rec.grids))


def _to_display(images: Tensor, mean: Sequence[float] | None, std: Sequence[float] | None) -> Tensor:
    """(B, C, H, W) -> (B, H, W, C) in [0, 1] for imshow (undo a normalisation, else min-max per image)."""
    x = images.detach().float().cpu()
    if mean is not None and std is not None:
        x = x * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)
    else:
        lo = x.amin(dim=(1, 2, 3), keepdim=True)
        hi = x.amax(dim=(1, 2, 3), keepdim=True)
        x = (x - lo) / (hi - lo).clamp_min(1e-12)
    return x.clamp(0, 1).permute(0, 2, 3, 1)


def save_overlays(
    explanation: Explanation,
    images: Tensor,
    out_dir: str | Path,
    *,
    layers: Sequence[str] | None = None,
    max_images: int = 4,
    num_clusters: int = 4,
    keep_ratio: float = 0.5,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    prefix: str = "paca",
) -> list[Path]:
    """Write one PNG per (image, layer): the image, the hard cluster map over it, the importance
    heatmap over it, the importance-masked image, and the ``num_clusters`` clusters with the most
    concentrated assignment as heatmaps. Needs matplotlib (imported here; no pyplot).

    Args:
        explanation: from :func:`explain`.
        images: the (B, C, H, W) images that were explained.
        out_dir: folder (created).
        layers: which recorded layers (default: all with cluster logits).
        max_images: at most this many images of the batch.
        num_clusters: soft maps of this many clusters per figure.
        keep_ratio: of the importance mask.
        mean, std: the normalisation the images carry, undone for display (else min-max per image).
        prefix: file name prefix; files are ``{prefix}_img{i}_{layer}.png``.

    Returns:
        The paths written.
    """
    try:
        # A bare Figure renders with Agg on savefig: no pyplot, so no global backend switch.
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - matplotlib is an optional dependency
        raise ImportError("save_overlays needs matplotlib (pip install matplotlib)") from e

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shown = _to_display(images, mean, std)
    size = tuple(images.shape[2:])
    names = list(layers) if layers is not None else list(explanation.cluster_logits)
    paths: list[Path] = []
    for name in names:
        s = explanation.assignment(name).cpu()  # (B, M, h, w)
        hard = explanation.hard_assignment(name).cpu().float()[:, None]
        imp = explanation.importance(name).cpu()[:, None]
        mask = explanation.importance_mask(name, keep_ratio, size=size).cpu()
        hard_up = F.interpolate(hard, size=size, mode="nearest")[:, 0]
        imp_up = F.interpolate(imp, size=size, mode="bilinear", align_corners=False)[:, 0]
        # The clusters whose assignment is most concentrated (largest peak) are the most readable.
        top = s.flatten(2).amax(-1).topk(min(num_clusters, s.shape[1]), dim=1).indices
        for i in range(min(max_images, images.shape[0])):
            panels = 4 + top.shape[1]
            fig = Figure(figsize=(2.2 * panels, 2.4))
            axes = fig.subplots(1, panels)
            img = shown[i].numpy()
            img_show = img[..., 0] if img.shape[-1] == 1 else img
            cmap_img = "gray" if img.shape[-1] == 1 else None
            axes[0].imshow(img_show, cmap=cmap_img)
            axes[0].set_title("image", fontsize=8)
            axes[1].imshow(img_show, cmap=cmap_img)
            axes[1].imshow(hard_up[i].numpy(), cmap="tab20", alpha=0.55, interpolation="nearest")
            axes[1].set_title("cluster map", fontsize=8)
            axes[2].imshow(img_show, cmap=cmap_img)
            axes[2].imshow(imp_up[i].numpy(), cmap="jet", alpha=0.5)
            axes[2].set_title("importance", fontsize=8)
            masked = img * mask[i, 0].numpy()[..., None]
            axes[3].imshow(masked[..., 0] if masked.shape[-1] == 1 else masked, cmap=cmap_img)
            axes[3].set_title(f"mask (top {keep_ratio:.0%})", fontsize=8)
            for j, m in enumerate(top[i].tolist()):
                ax = axes[4 + j]
                heat = F.interpolate(s[i : i + 1, m : m + 1], size=size, mode="bilinear",
                                     align_corners=False)[0, 0]
                ax.imshow(img_show, cmap=cmap_img)
                ax.imshow(heat.numpy(), cmap="jet", alpha=0.5)
                ax.set_title(f"cluster {m}", fontsize=8)
            for ax in axes:
                ax.axis("off")
            fig.suptitle(name, fontsize=9)
            fig.tight_layout()
            path = out / f"{prefix}_img{i}_{name.replace('.', '_') or 'model'}.png"
            fig.savefig(path, dpi=80)
            paths.append(path)
    return paths
