"""PaCa-ViT and its external clustering teacher, checkpoint-compatible with the official release.

The constructor takes the official configuration dicts (``stem_cfg``, ``trans_cfg``, ``arch_cfg``,
``paca_cfg``, ``paca_teacher_cfg``, ...) with the official defaults, plus ``backend=`` for the ops.
Module and parameter names are the official ones, so official state dicts load with ``strict=True``.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint

from ..nn._fusion import plan_layer_norm, plan_linear
from ..nn.block import DEFAULT_PACA_CFG, PaCaBlock
from ..nn.downsample import DownsampleV1
from ..nn.layers import BlurConv2d, DropPath, build_act, build_norm
from ..ops.dispatch import check_backend_name
from ..ops.fused import layer_norm as _ln_op
from ..ops.fused import linear as _linear_op
from .pretrained import load_pretrained

__all__ = ["PaCaTeacher_ConvMixer", "PaCaViT", "Residual"]


@contextlib.contextmanager
def _frozen_bn_stats(module: nn.Module) -> Iterator[None]:
    """Within the context, BatchNorm layers of ``module`` in training mode normalise with the batch
    statistics as usual but leave running_mean/var and num_batches_tracked as they were.

    Why: activation checkpointing runs a block's forward twice (once more during the backward); without
    this, every BatchNorm (or SyncBatchNorm) inside would update its running statistics twice per step.
    Momentum 0 makes the running update ``(1 - 0)·running + 0·batch``, an exact no-op, while the op
    itself (and what it saves for the backward, which checkpointing checks) stays the same;
    num_batches_tracked, which the forward increments, is put back afterwards.
    """
    frozen = [(m, m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None)
              for m in module.modules()
              if isinstance(m, _BatchNorm) and m.training and m.track_running_stats]
    for m, _, _ in frozen:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum, tracked in frozen:
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)


def _checkpointed(fn: Callable[..., Any], module: nn.Module, *args: Any) -> Any:
    """``fn(*args)`` under non-reentrant activation checkpointing (the RNG state is restored for the
    recomputation, so dropout/drop_path masks match). BatchNorm running statistics inside ``module`` are
    updated once, by the first forward (see :func:`_frozen_bn_stats`)."""
    if any(isinstance(m, _BatchNorm) for m in module.modules()):
        return checkpoint(fn, *args, use_reentrant=False,
                          context_fn=lambda: (contextlib.nullcontext(), _frozen_bn_stats(module)))
    return checkpoint(fn, *args, use_reentrant=False)


def _checkpoint_active(module: nn.Module) -> bool:
    """Checkpoint only where it saves memory: training mode with autograd recording."""
    return bool(getattr(module, "grad_checkpointing", False)) and module.training and torch.is_grad_enabled()


class Residual(nn.Module):
    """``drop_path(fn(x)) + x`` (the teacher's residual unit; ``fn`` is the official name)."""

    def __init__(self, fn: nn.Module, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        self.fn = fn
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0.0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.drop_path(self.fn(x)) + x


def _mixer_unit(
    dim: int, kernel_size: int, norm_cfg: Mapping[str, Any], act_cfg: Any, dpr: float
) -> nn.Sequential:
    """Residual(depthwise k×k conv, act, norm) then 1×1 conv, act, norm (keys .0.fn.0/2, .1, .3)."""
    return nn.Sequential(
        Residual(
            nn.Sequential(
                nn.Conv2d(dim, dim, kernel_size, groups=dim, padding="same"),
                build_act(act_cfg),
                build_norm(norm_cfg, dim),
            ),
            drop_path_rate=dpr,
        ),
        nn.Conv2d(dim, dim, kernel_size=1),
        build_act(act_cfg),
        build_norm(norm_cfg, dim),
    )


class PaCaTeacher_ConvMixer(nn.Module):
    """The external clustering teacher: a ConvMixer-style pyramid with a top-down path.

    Input: the backbone's patch embedding (B, C0, H, W) (or an image when it has its own stem).
    Output: per stage with clusters, the cluster logits (B, M_i, N_i) (or their softmax over N, as the
    official code returns), and the stage outputs (B, N_i, C_i) that the backbone adds to its own.
    """

    def __init__(
        self,
        in_chans: int = 3,
        stem_cfg: Mapping[str, Any] | None = None,
        embed_dims: Sequence[int] = (96, 192, 320, 384),
        clusters: Sequence[int] = (100, 100, 100, 100),
        depths: Sequence[int] = (2, 2, 2, 2),
        kernel_size: int = 7,
        norm_cfg: Mapping[str, Any] | None = None,
        act_cfg: Mapping[str, Any] | None = None,
        drop_path_rate: float = 0.0,
        return_outs: bool = True,
    ) -> None:
        super().__init__()
        norm_cfg = norm_cfg if norm_cfg is not None else {"type": "BN"}
        act_cfg = act_cfg if act_cfg is not None else {"type": "GELU"}
        self.num_stages = len(depths)
        self.num_clusters = list(clusters)
        self.return_outs = return_outs
        self.grad_checkpointing = False
        dpr = [float(r) for r in torch.linspace(0, drop_path_rate, sum(depths))]
        self.stem = None
        if stem_cfg is not None:
            cfg = dict(stem_cfg)
            cfg.pop("type", None)
            self.stem = DownsampleV1(in_channels=in_chans, out_channels=embed_dims[0], **cfg)
        cur = 0
        for i in range(self.num_stages):
            dim = embed_dims[i]
            block = nn.Sequential(
                *[_mixer_unit(dim, kernel_size, norm_cfg, act_cfg, dpr[cur + j]) for j in range(depths[i])]
            )
            setattr(self, f"block{i + 1}", block)
            if i < self.num_stages - 1:
                nxt = embed_dims[i + 1]
                setattr(self, f"transition{i + 1}", nn.Sequential(
                    BlurConv2d(dim, nxt, 3, 2, 1), build_act(act_cfg), build_norm(norm_cfg, nxt)))
                setattr(self, f"lateral{i + 1}", nn.Sequential(
                    nn.Conv2d(nxt, dim, kernel_size=1), build_act(act_cfg), build_norm(norm_cfg, dim)))
                setattr(self, f"fpn{i + 1}", _mixer_unit(dim, kernel_size, norm_cfg, act_cfg, dpr[cur]))
            to_clusters = nn.Conv2d(dim, clusters[i], 1, 1, 0) if clusters[i] > 0 else None
            setattr(self, f"to_clusters{i + 1}", to_clusters)
            cur += depths[i]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing (timm's spelling): in training, each mixer unit of the bottom-up
        stages (``block{i}[j]``) runs under ``torch.utils.checkpoint.checkpoint(use_reentrant=False)``,
        so its activations are recomputed in the backward instead of stored. Outputs, gradients and
        BatchNorm running statistics are those of the plain forward."""
        self.grad_checkpointing = bool(enable)

    def _run_stage(self, i: int, x: Tensor) -> Tensor:
        stage = getattr(self, f"block{i + 1}")
        if not _checkpoint_active(self):
            return stage(x)
        for unit in stage:
            x = _checkpointed(unit, unit, x)
        return x

    def forward(
        self, x: Tensor, *, return_logits: bool = False
    ) -> tuple[list[Tensor], list[Tensor] | None]:
        """x (B, C0, H, W) -> (assignments, outs).

        assignments: for each stage with clusters, (B, M_i, N_i): softmax over N of the cluster logits,
        or the logits themselves with ``return_logits`` (what PaCaViT consumes: the fused pooling takes
        logits). outs: the stage outputs (B, N_i, C_i), or None when ``return_outs`` is False.
        """
        if self.stem is not None:
            x = self.stem(x)
        outs: list[Tensor] = []
        for i in range(self.num_stages):
            x = self._run_stage(i, x)
            outs.append(x)
            if i < self.num_stages - 1:
                x = getattr(self, f"transition{i + 1}")(x)
        fpn_outs: list[Tensor] = [outs[-1]] * len(outs)
        for i in range(self.num_stages - 1, 0, -1):
            up = F.interpolate(fpn_outs[i], outs[i - 1].shape[2:], mode="bilinear", align_corners=False)
            up = getattr(self, f"lateral{i}")(up)
            fpn_outs[i - 1] = getattr(self, f"fpn{i}")(outs[i - 1] + up)
        assignments: list[Tensor] = []
        for i in range(self.num_stages):
            to_clusters = getattr(self, f"to_clusters{i + 1}")
            if to_clusters is not None:
                logits = to_clusters(fpn_outs[i]).flatten(2)
                assignments.append(logits if return_logits else logits.softmax(dim=-1))
        if not self.return_outs:
            return assignments, None
        return assignments, [o.flatten(2).transpose(1, 2) for o in outs]


class PaCaViT(nn.Module):
    """Patch-to-Cluster Attention Vision Transformer (official constructor and names).

    Args (official): in_chans, num_classes (0: no head, a backbone), img_size (sets the grid of the
    optional block position embedding only; any input divisible by 32 runs), stem_cfg, trans_cfg,
    arch_cfg (embed_dims, num_heads, mlp_ratios, depths), paca_cfg (per-stage lists: clusters,
    onsite_clustering — 0: first block of a stage clusters, the others share; 1: every block; i > 1:
    every i-th block — and clustering_kernel_size), paca_teacher_cfg (the external clustering teacher),
    drop_path_rate, attn_drop, drop, norm_cfg, act_cfg, layer_scale, post_norm, sub_ln,
    with_pos_embed, out_indices (stages whose (B, C, H, W) maps a backbone returns),
    downstream_cluster_num (per-stage cluster counts replacing paca_cfg's), pretrained (a local
    checkpoint path, loaded non-strictly as the official code does, by
    :func:`~paca_kernels.models.pretrained.load_pretrained`: what fits is loaded, the rest keeps its
    initialisation and is logged; a missing file is FileNotFoundError).
    Extra: backend (ops backend for every PaCa layer).
    """

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        img_size: int | tuple[int, int] = 224,
        stem_cfg: Mapping[str, Any] | None = None,
        trans_cfg: Mapping[str, Any] | None = None,
        arch_cfg: Mapping[str, Any] | None = None,
        paca_cfg: Mapping[str, Any] | None = None,
        paca_teacher_cfg: Mapping[str, Any] | None = None,
        drop_path_rate: float = 0.0,
        attn_drop: float = 0.0,
        drop: float = 0.0,
        norm_cfg: Mapping[str, Any] | None = None,
        act_cfg: Mapping[str, Any] | None = None,
        layer_scale: float | None = None,
        post_norm: bool = False,
        sub_ln: bool = False,
        with_pos_embed: bool = False,
        out_indices: Sequence[int] = (),
        downstream_cluster_num: Sequence[int] | None = None,
        pretrained: str | os.PathLike[str] | None = None,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        stem_cfg = dict(stem_cfg or {"type": "DownsampleV1", "patch_size": 4, "kernel_size": 3,
                                     "norm_cfg": {"type": "LayerNorm2d", "eps": 1e-6}})
        trans_cfg = dict(trans_cfg or {"type": "DownsampleV1", "patch_size": 2, "kernel_size": 3,
                                       "norm_cfg": {"type": "LayerNorm2d", "eps": 1e-6}})
        arch_cfg = dict(arch_cfg or {"embed_dims": [96, 192, 320, 384], "num_heads": [2, 4, 8, 16],
                                     "mlp_ratios": [4, 4, 4, 4], "depths": [2, 2, 4, 2]})
        paca = copy.deepcopy(dict(DEFAULT_PACA_CFG))
        paca.update(copy.deepcopy(dict(paca_cfg or {})))
        norm_cfg = norm_cfg if norm_cfg is not None else {"type": "LN", "eps": 1e-6}
        act_cfg = act_cfg if act_cfg is not None else {"type": "GELU"}
        for cfg in (stem_cfg, trans_cfg):
            if cfg.pop("type", "DownsampleV1") != "DownsampleV1":
                raise ValueError("only DownsampleV1 stems/transitions are supported")

        self.num_classes = num_classes
        self.grad_checkpointing = False
        self.depths = list(arch_cfg["depths"])
        self.num_stages = len(self.depths)
        self.out_indices = list(out_indices)
        self.backend = check_backend_name(backend)
        embed_dims = list(arch_cfg["embed_dims"])
        num_heads = list(arch_cfg["num_heads"])
        mlp_ratios = list(arch_cfg["mlp_ratios"])
        self.embed_dims = embed_dims
        if downstream_cluster_num is not None:
            if len(downstream_cluster_num) != len(paca["clusters"]):
                raise ValueError(
                    f"downstream_cluster_num has {len(downstream_cluster_num)} entries, "
                    f"expected one per stage ({len(paca['clusters'])})"
                )
            paca["clusters"] = list(downstream_cluster_num)
        clusters = list(paca["clusters"])
        onsite = list(paca["onsite_clustering"])
        kernels = list(paca["clustering_kernel_size"])
        self.clusters = clusters
        dpr = [float(r) for r in torch.linspace(0, drop_path_rate, sum(self.depths))]

        self.paca_teacher: PaCaTeacher_ConvMixer | None = None
        self.share_stem = False
        if paca_teacher_cfg is not None:
            tcfg = dict(paca_teacher_cfg)
            kind = tcfg.pop("type", "PaCaTeacher_ConvMixer")
            if kind != "PaCaTeacher_ConvMixer":
                raise ValueError(f"unknown teacher type {kind!r}")
            tcfg["return_outs"] = tcfg.get("return_outs", True) and (
                list(tcfg.get("embed_dims", embed_dims)) == embed_dims
            )
            tcfg.setdefault("embed_dims", embed_dims)
            tcfg.update(in_chans=in_chans, clusters=clusters)
            self.paca_teacher = PaCaTeacher_ConvMixer(**tcfg)
            self.share_stem = tcfg.get("stem_cfg") is None

        self.patch_embed = DownsampleV1(in_channels=in_chans, out_channels=embed_dims[0],
                                        img_size=img_size, backend=backend, **stem_cfg)
        self.patch_grid = self.patch_embed.grid_size

        cur = 0
        for i in range(self.num_stages):
            blocks = nn.ModuleList()
            grid = (self.patch_grid[0] // 2**i, self.patch_grid[1] // 2**i)
            for j in range(self.depths[i]):
                if self.paca_teacher is not None and clusters[i] > 0:
                    block_onsite = False
                elif j == 0:
                    block_onsite = True
                elif onsite[i] < 2:
                    block_onsite = bool(onsite[i])
                else:
                    block_onsite = j % onsite[i] == 0
                cfg_j = dict(paca, clusters=clusters[i], onsite_clustering=block_onsite,
                             clustering_kernel_size=kernels[i])
                blocks.append(PaCaBlock(
                    dim=embed_dims[i], num_heads=num_heads[i], paca_cfg=cfg_j,
                    mlp_ratio=mlp_ratios[i], drop_path=dpr[cur + j], attn_drop=attn_drop, drop=drop,
                    act_cfg=act_cfg, layer_scale=layer_scale, input_resolution=grid,
                    with_pos_embed=with_pos_embed if j == 0 else False, post_norm=post_norm,
                    sub_ln=sub_ln, backend=backend,
                ))
            cur += self.depths[i]
            setattr(self, f"stage{i + 1}", blocks)
            setattr(self, f"norm{i + 1}", build_norm(norm_cfg, embed_dims[i]))
            if i < self.num_stages - 1:
                setattr(self, f"transition{i + 1}", DownsampleV1(
                    in_channels=embed_dims[i], out_channels=embed_dims[i + 1], img_size=grid,
                    backend=backend, **trans_cfg))

        self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else None
        self.init_weights()
        if pretrained is not None:
            load_pretrained(self, pretrained)

    def init_weights(self) -> None:
        """The official initialisation: trunc-normal(0.02) linears, unit norms, He-normal convs."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
                if m.weight is not None:
                    nn.init.ones_(m.weight)
            elif isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                with torch.no_grad():
                    m.weight.normal_(0, math.sqrt(2.0 / fan_out))
                    if m.bias is not None:
                        m.bias.zero_()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing (timm's spelling): in training (``model.train()`` with autograd on),
        each PaCaBlock runs under ``torch.utils.checkpoint.checkpoint(use_reentrant=False)`` and its
        activations are recomputed in the backward; the clustering teacher, if any, checkpoints its
        mixer units. Outputs and gradients equal the plain forward's (dropout/drop_path included: the
        RNG state is replayed). Inference and ``torch.no_grad`` are unaffected.
        """
        self.grad_checkpointing = bool(enable)
        if self.paca_teacher is not None:
            self.paca_teacher.set_grad_checkpointing(enable)

    def _check_image(self, x: object) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"images must be a torch.Tensor (B, 3, H, W), got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"images must be floating point, got {str(x.dtype).removeprefix('torch.')}")
        if x.dim() != 4:
            raise ValueError(f"images must have shape (B, C, H, W), got {tuple(x.shape)}")
        in_chans = self.patch_embed.proj[0].in_channels if isinstance(
            self.patch_embed.proj, nn.Sequential) else self.patch_embed.proj.in_channels
        if x.shape[1] != in_chans:
            raise ValueError(f"images have {x.shape[1]} channels, the model expects {in_chans}")
        stride = self.patch_embed.patch_size * 2 ** (self.num_stages - 1)
        if x.shape[2] % stride or x.shape[3] % stride:
            raise ValueError(
                f"image size {tuple(x.shape[2:])} must be divisible by {stride} "
                f"(patch size × 2^(stages-1))"
            )
        return x

    def forward_features(self, x: Tensor) -> Tensor | list[Tensor]:
        """Images (B, 3, H, W) -> final tokens (B, N, C) after the last stage norm, or, without a head,
        the (B, C_i, H_i, W_i) maps of the stages in ``out_indices``."""
        self._check_image(x)
        image = x
        x = self.patch_embed(x)
        logits_list: list[Tensor] | None = None
        teacher_outs: list[Tensor] | None = None
        if self.paca_teacher is not None:
            logits_list, teacher_outs = self.paca_teacher(
                x if self.share_stem else image, return_logits=True
            )
        outs: list[Tensor] = []
        for i in range(self.num_stages):
            b, _, h, w = x.shape
            x = x.flatten(2).transpose(1, 2)
            logits = logits_list[i] if logits_list is not None and i < len(logits_list) else None
            ckpt = _checkpoint_active(self)
            for block in getattr(self, f"stage{i + 1}"):
                if ckpt:
                    # h, w are ints and logits may be None: non-reentrant checkpointing takes any args.
                    x, logits = _checkpointed(block.forward_logits, block, x, h, w, logits)
                else:
                    x, logits = block.forward_logits(x, h, w, logits)
            if teacher_outs is not None and i < len(teacher_outs):
                x = x + teacher_outs[i]
            norm = getattr(self, f"norm{i + 1}")
            fused = plan_layer_norm(norm, self.backend, x)
            x = norm(x) if fused is None else _ln_op.layer_norm(x, *fused)
            if self.head is None and i in self.out_indices:
                outs.append(x.transpose(1, 2).reshape(b, -1, h, w))
            if i != self.num_stages - 1:
                x = x.transpose(1, 2).reshape(b, -1, h, w)
                x = getattr(self, f"transition{i + 1}")(x)
        if self.head is None and self.out_indices:
            return outs
        return x

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        """Images (B, 3, H, W) -> class logits (B, num_classes); without a head: the ``out_indices``
        feature maps, or the pooled features (B, C) when no out_indices are set."""
        feats = self.forward_features(x)
        if isinstance(feats, list):
            return feats
        feats = feats.mean(dim=1)
        if self.head is None:
            return feats
        fused = plan_linear(self.head, self.backend, feats)
        return self.head(feats) if fused is None else _linear_op.linear(feats, *fused)
