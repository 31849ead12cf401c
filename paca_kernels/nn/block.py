"""PaCaBlock: pre-norm transformer block with PaCa attention and a depthwise-conv MLP (official names)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.dispatch import check_backend_name
from ..ops.fused import cached_linear as _cached_linear_op
from ..ops.fused import layer_norm as _ln_op
from ..ops.fused import mlp_dwconv as _dwconv_op
from ..ops.fused import mlp_fused as _mlp_op
from ._fusion import BLOCK_PARTS, MlpPath, plan_attention_residual, plan_block, plan_mlp, plan_mlp_residual
from .attention import PaCaAttention, check_tokens, paca_layer_kwargs
from .layers import DropPath, DWConv, build_act, build_norm, to_2tuple

__all__ = ["DEFAULT_PACA_CFG", "DWConv", "Mlp", "PaCaBlock"]

#: The official default ``paca_cfg`` (onsite, stage-wise conv clustering, 100 clusters in stages 1-3).
DEFAULT_PACA_CFG: dict[str, Any] = {
    "type": "P2CConv2d",
    "clusters": [100, 100, 100, 0],
    "onsite_clustering": [0, 0, 0, 0],
    "clustering_kernel_size": [7, 7, 7, 7],
    "cluster_norm_cfg": {"type": "LN", "eps": 1e-6},
    "cluster_pos_embed": False,
    "norm_cfg1": {"type": "LN", "eps": 1e-6},
    "norm_cfg2": {"type": "LN", "eps": 1e-6},
    "mlp_func": "Mlp",
    "with_dwconv_in_mlp": True,
    "with_shortcut_in_mlp": True,
}


class Mlp(nn.Module):
    """fc1 -> [DWConv] -> act -> drop -> fc2 -> drop, on (B, N, C) tokens.

    ``backend`` is the ops backend of the enclosing block. Which path serves a call is decided once
    (:func:`paca_kernels.nn._fusion.plan_mlp`): in CPU inference on the cpu backend the whole MLP runs as one fused op
    (:mod:`paca_kernels.ops.fused.mlp_fused`) where its weights are small, or fc1's bias, the DWConv
    and the activation as one (:mod:`paca_kernels.ops.fused.mlp_dwconv`); in training on the cpu
    backend (float32/float64, no autocast) the latter too, through its backward kernel; otherwise
    the modules run.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        drop: float = 0.0,
        with_dwconv: bool = False,
        with_shortcut: bool = False,
        act_cfg: Mapping[str, Any] | str | None = None,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        self.backend = check_backend_name(backend)
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.dwconv = DWConv(hidden_features, with_shortcut=with_shortcut) if with_dwconv else None
        self.act = build_act(act_cfg if act_cfg is not None else "gelu")
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop = nn.Dropout(drop)

    def _plan(self, x: Tensor) -> MlpPath:
        """Which path serves this call: :func:`paca_kernels.nn._fusion.plan_mlp`, which holds every
        condition ("whole", "dwconv", "train" or "modules")."""
        return plan_mlp(self, x)

    def forward(self, x: Tensor, H: int, W: int) -> Tensor:
        plan = self._plan(x)
        if plan == "whole":
            # fc1, DWConv, GELU and fc2 in one pass; the dropouts are identities here (eval, or p = 0).
            return self._whole(x, H, W)
        if plan in ("dwconv", "train"):
            # fc1's bias is added inside the fused kernel, as it loads its input (and its gradient
            # summed by the backward kernel, when training). "train": fc1 and fc2 write into the
            # CPU output cache (cached_linear), the same products.
            linear = _cached_linear_op.cached_linear if plan == "train" else F.linear
            conv = self.dwconv.dwconv
            x = _dwconv_op.mlp_dwconv(
                linear(x, self.fc1.weight, None), H, W, conv.weight, conv.bias, self.fc1.bias,
                bool(self.dwconv.with_shortcut), type(self.act) is nn.GELU,
            )
        else:
            x = self.fc1(x)
            if self.dwconv is not None:
                x = self.dwconv(x, H, W)
            x = self.act(x)
        x = self.drop(x)
        if plan == "train":
            return self.drop(_cached_linear_op.cached_linear(x, self.fc2.weight, self.fc2.bias))
        return self.drop(self.fc2(x))

    def _whole(self, x: Tensor, H: int, W: int, norm: nn.LayerNorm | None = None) -> Tensor:
        """The whole MLP as one ``mlp_fused`` call; with ``norm``, x + mlp(norm(x)) (LayerNorm
        prologue, residual epilogue)."""
        conv = self.dwconv.dwconv
        return _mlp_op.mlp_fused(
            x, H, W, self.fc1.weight, self.fc1.bias, conv.weight, conv.bias,
            bool(self.dwconv.with_shortcut), type(self.act) is nn.GELU, self.fc2.weight, self.fc2.bias,
            norm=None if norm is None else (norm.weight, norm.bias, norm.eps), residual=norm is not None,
        )

    def forward_residual(self, x: Tensor, H: int, W: int, norm: nn.LayerNorm) -> Tensor:
        """x + self(norm(x), H, W) as one fused call, for :class:`PaCaBlock` where
        :func:`~paca_kernels.nn._fusion.plan_mlp_residual` allows it."""
        return self._whole(x, H, W, norm)


class PaCaBlock(nn.Module):
    """x + drop_path(PaCa(norm1(x))); x + drop_path(Mlp(norm2(x))) — the official block.

    Args follow the official ``PaCaBlock``; ``paca_cfg`` is the per-block official dict (keys of
    :data:`DEFAULT_PACA_CFG` with scalar ``clusters``/``onsite_clustering``/``clustering_kernel_size``),
    ``backend`` selects the ops backend of the attention.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        paca_cfg: Mapping[str, Any] | None = None,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        attn_drop: float = 0.0,
        drop: float = 0.0,
        act_cfg: Mapping[str, Any] | None = None,
        layer_scale: float | None = None,
        input_resolution: int | tuple[int, int] | None = None,
        with_pos_embed: bool = False,
        post_norm: bool = False,
        sub_ln: bool = False,
        backend: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        cfg = dict(DEFAULT_PACA_CFG)
        cfg.update({"clusters": 100, "onsite_clustering": True, "clustering_kernel_size": 7})
        if paca_cfg is not None:
            cfg.update(paca_cfg)
        self.dim = dim
        self.post_norm = post_norm
        self.with_pos_embed = with_pos_embed
        self.input_resolution = to_2tuple(input_resolution) if input_resolution is not None else None
        if with_pos_embed:
            if self.input_resolution is None:
                raise ValueError("with_pos_embed=True needs input_resolution")
            h, w = self.input_resolution
            self.pos_embed = nn.Parameter(torch.zeros(1, h * w, dim))
            self.pos_drop = nn.Dropout(p=drop)
            nn.init.trunc_normal_(self.pos_embed, std=0.02)

        pre, post = sub_ln or not post_norm, sub_ln or post_norm
        self.norm1_before = build_norm(cfg["norm_cfg1"], dim) if pre else nn.Identity()
        self.attn = PaCaAttention(
            dim=dim, num_heads=num_heads, attn_drop=attn_drop, proj_drop=drop, mlp_ratio=mlp_ratio,
            act_cfg=act_cfg, backend=backend, **paca_layer_kwargs(cfg),
        )
        self.norm1_after = build_norm(cfg["norm_cfg1"], dim) if post else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2_before = build_norm(cfg["norm_cfg2"], dim) if pre else nn.Identity()
        if cfg.get("mlp_func", "Mlp") != "Mlp":
            raise ValueError(f"unknown mlp_func {cfg['mlp_func']!r} (only 'Mlp')")
        self.mlp = Mlp(
            in_features=dim, hidden_features=int(dim * mlp_ratio), drop=drop,
            with_dwconv=cfg["with_dwconv_in_mlp"], with_shortcut=cfg["with_shortcut_in_mlp"],
            act_cfg=act_cfg, backend=backend,
        )
        self.norm2_after = build_norm(cfg["norm_cfg2"], dim) if post else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.layer_scale = isinstance(layer_scale, (int, float)) and not isinstance(layer_scale, bool)
        if self.layer_scale:
            self.gamma1 = nn.Parameter(layer_scale * torch.ones(dim))
            self.gamma2 = nn.Parameter(layer_scale * torch.ones(dim))

    def _norm1_fused(self, x: Tensor) -> Tensor:
        """norm1_before(x) on the block's fused path (:func:`~paca_kernels.nn._fusion.plan_attention_residual`)
        as ``ops.fused.layer_norm``: the dispatched row kernel into an output from the kernels' pool,
        and under CPU autocast (to bf16: the plan allows no other) of float32 x straight into bf16,
        the attention op's cast of it in the same pass (bf16 x stays bf16, as autocast's LayerNorm
        gives). Measured, PaCa-ViT-Tiny, B = 1, in-process A/B against the module: 4 % off the bf16
        forward, 3 % under autocast, the same in float32."""
        n = self.norm1_before
        if not _ln_op.REGISTERED:
            return n(x)
        cast = x.dtype == torch.float32 and torch.is_autocast_enabled("cpu")
        return _ln_op.layer_norm(x, n.weight, n.bias, n.eps, torch.bfloat16 if cast else None)

    def _pos(self, x: Tensor, H: int, W: int) -> Tensor:
        pos = self.pos_embed
        if self.input_resolution != (H, W):
            h0, w0 = self.input_resolution
            grid = pos.transpose(1, 2).reshape(1, -1, h0, w0)
            grid = F.interpolate(grid, size=(H, W), mode="bilinear", align_corners=True)
            pos = grid.flatten(2).transpose(1, 2)
        return self.pos_drop(x + pos)

    def _run(self, x: Tensor, H: int, W: int, a_fn: Any) -> tuple[Tensor, Any, Any]:
        if self.with_pos_embed:
            x = self._pos(x, H, W)
        if plan_attention_residual(self, x):
            # x + attn(norm1(x)) with the residual added by the attention's fused op as it writes
            # its output (the identities around it are no-ops here).
            x, *rest = a_fn(self._norm1_fused(x), residual=x)
            if plan_mlp_residual(self, x):
                return self.mlp.forward_residual(x, H, W, self.norm2_before), *rest
            return x + self.drop_path2(self.norm2_after(self.mlp(self.norm2_before(x), H, W))), *rest
        a, *rest = a_fn(self.norm1_before(x))
        a = self.norm1_after(a)
        if self.layer_scale:
            x = x + self.drop_path1(self.gamma1 * a)
            x = x + self.drop_path2(self.gamma2 * self.norm2_after(self.mlp(self.norm2_before(x), H, W)))
        else:
            x = x + self.drop_path1(a)
            if plan_mlp_residual(self, x):
                # x + mlp(norm2(x)) in one kernel call (the identities around it are no-ops here).
                x = self.mlp.forward_residual(x, H, W, self.norm2_before)
            else:
                x = x + self.drop_path2(self.norm2_after(self.mlp(self.norm2_before(x), H, W)))
        return x, *rest

    def _fused(
        self, x: Tensor, H: int, W: int, assignment: Tensor | None, as_logits: bool, return_attn: bool,
    ) -> tuple[Tensor, Tensor | None] | None:
        """The whole block as fused calls where :func:`~paca_kernels.nn._fusion.plan_block` says so
        (CPU inference, every condition checked once): norm1 and the attention with the residual
        added as it writes its output, then norm2, the MLP and the residual in one ``mlp_fused``
        call; else None. What the halves' plans would run, without planning each part again."""
        plan = plan_block(self, x, return_attn)
        if plan is None:
            return None
        mods = self._modules
        attn = mods["attn"]
        if as_logits:
            given, z = attn._given(x, assignment, None), None
        else:
            given, z = attn._given(x, None, assignment), assignment
        x, a = attn._planned(self._norm1_fused(x), H, W, z, given, plan, as_logits, False, x)
        return mods["mlp"].forward_residual(x, H, W, mods["norm2_before"]), a

    def forward(
        self, x: Tensor, H: int, W: int, z: Tensor | None = None, *, return_attn: bool = False,
    ) -> tuple[Tensor, ...]:
        """Official interface: x (B, N, C), grid H×W, shared assignment z (B, M, N) or None.

        Returns (x, z), plus the attention maps when ``return_attn``.
        """
        check_tokens(x, H, W, self.dim)
        fused = self._fused(x, H, W, z, False, return_attn)
        if fused is not None:
            return fused
        return self._run(
            x, H, W, lambda t, residual=None: self.attn(t, H, W, z, return_attn=return_attn, residual=residual)
        )

    def forward_logits(
        self, x: Tensor, H: int, W: int, logits: Tensor | None = None, *, return_attn: bool = False,
    ) -> tuple[Tensor, ...]:
        """As :meth:`forward` with the assignment as logits (see PaCaAttention.forward_logits)."""
        check_tokens(x, H, W, self.dim)
        fused = self._fused(x, H, W, logits, True, return_attn)
        if fused is not None:
            return fused
        return self._run(
            x, H, W,
            lambda t, residual=None: self.attn.forward_logits(
                t, H, W, logits, return_attn=return_attn, residual=residual
            ),
        )


BLOCK_PARTS.add(Mlp)
