"""PaCaAttention: the patch-to-cluster attention layer (the official ``PaCaLayer``), drop-in.

Forward, for patch tokens x (B, N, C) on an H×W grid and M > 0 clusters:

    logits = clustering(x)                         (B, M, N)   (or a shared assignment z is given)
    Z      = LayerNorm(softmax(logits over N)·x)   (B, M, C)   -> paca_kernels.ops.cluster_pool
    q, k, v = x·Wq + bq, Z·Wk + bk, Z·Wv + bv      split into h heads of d = C/h
    out    = proj(softmax(q·kᵀ/√d over M)·v)       (B, N, C)   -> paca_kernels.ops.p2c_attention

With M = 0 it is multi-head self-attention over the patches. Parameter and buffer names are the
official ones, so official checkpoints load with ``strict=True``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops, reference
from ..ops.fused import conv_cluster_logits as _head_op
from ..ops.fused import conv_paca_layer as _layer_op
from ..ops.fused import p2c_attention_proj as _attention_op
from ._fusion import BLOCK_PARTS, AttentionPlan, plan_attention
from .clustering import build_clustering
from .layers import build_norm

__all__ = ["PaCaAttention", "PaCaLayer", "check_tokens"]


def check_tokens(x: object, H: int, W: int, dim: int | None = None) -> Tensor:
    """Validate patch tokens x (B, N, C) on an H×W grid; ValueError/TypeError naming the problem."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor of shape (B, N, C), got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating tensor, got {str(x.dtype).removeprefix('torch.')}")
    if x.dim() != 3:
        raise ValueError(f"x must have shape (B, N, C), got a {x.dim()}-d tensor {tuple(x.shape)}")
    if dim is not None and x.shape[2] != dim:
        raise ValueError(f"x has C = {x.shape[2]} channels but the layer was built for dim = {dim}")
    if H < 0 or W < 0:
        raise ValueError(f"H and W must be >= 0, got H = {H}, W = {W}")
    if int(H) * int(W) != x.shape[1]:
        raise ValueError(f"H·W = {H}·{W} = {int(H) * int(W)} does not match N = {x.shape[1]} of x")
    return x


def _check_positive_int(**values: object) -> None:
    """ValueError naming the argument unless each value is an int >= 1 (bools excluded)."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")


class PaCaAttention(nn.Module):
    """Patch-to-cluster attention (PaCa), with the fused ops underneath.

    Args:
        dim: channels C.
        num_heads: heads h (C must be divisible by h).
        num_clusters: M; 0 gives multi-head self-attention over the patches.
        clustering: clustering head, "conv" (P2CConv2d), "mlp" (P2CMlp), "linear" (P2CLinear) or a class.
        onsite_clustering: compute the assignment in this layer; False: it must be passed in (``z``).
        clustering_kernel_size: depthwise kernel of the conv head.
        cluster_norm: LayerNorm the cluster tokens (True, or an official norm cfg dict; False/None: no
            norm, as ``cluster_norm_cfg=None`` in the official code).
        cluster_norm_eps: epsilon of that LayerNorm.
        cluster_pos_embed: add a learned (1, M, C) position embedding to the cluster tokens before the norm.
        attn_drop: dropout on the attention probabilities (training only).
        proj_drop: dropout after the output projection.
        mlp_ratio: hidden ratio of the MLP clustering head.
        act_cfg: activation of the clustering head (official dict, name or class; default GELU).
        backend: ops backend for this layer (None: ``PACA_KERNELS_BACKEND``, then automatic).

    Which path serves a call is decided once per call (:func:`paca_kernels.nn._fusion.plan_attention`):
    on the cpu backend in
    inference (no gradient wanted, no autocast but to bf16/fp16, no forward hooks that a kernel would
    skip) the whole layer runs as one fused op (``paca_kernels.ops.fused.conv_paca_layer``), or its
    conv head and its attention as fused parts (under autocast in its dtype); otherwise the modules and the differentiable ops
    (``ops.cluster_pool``, ``ops.p2c_attention``) run.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_clusters: int = 100,
        *,
        clustering: str | type[nn.Module] = "conv",
        onsite_clustering: bool = True,
        clustering_kernel_size: int = 7,
        cluster_norm: bool | Mapping[str, Any] | None = True,
        cluster_norm_eps: float = 1e-6,
        cluster_pos_embed: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        mlp_ratio: float = 4.0,
        act_cfg: Mapping[str, Any] | str | type[nn.Module] | None = None,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        _check_positive_int(dim=dim, num_heads=num_heads)
        if dim % num_heads != 0:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        if isinstance(num_clusters, bool) or not isinstance(num_clusters, int) or num_clusters < 0:
            raise ValueError(f"num_clusters must be an int >= 0, got {num_clusters!r}")
        if num_clusters > 0 and onsite_clustering:
            _check_positive_int(clustering_kernel_size=clustering_kernel_size)
            if clustering_kernel_size % 2 == 0:
                raise ValueError(
                    f"clustering_kernel_size must be odd (its 'same' padding is (k - 1) / 2), got "
                    f"{clustering_kernel_size}"
                )
        ops.check_backend_name(backend)
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.num_clusters = num_clusters
        self.onsite_clustering = bool(onsite_clustering) and num_clusters > 0
        self.backend = backend
        self.cluster_pos_embed = bool(cluster_pos_embed) and num_clusters > 0
        self._ln_eps: float | None = None  # set when the cluster norm is a LayerNorm

        if num_clusters > 0:
            if cluster_norm is True:
                cluster_norm = {"type": "LN", "eps": cluster_norm_eps}
            self.cluster_norm = build_norm(cluster_norm or None, dim)
            if isinstance(self.cluster_norm, nn.LayerNorm):
                self._ln_eps = self.cluster_norm.eps
            if self.onsite_clustering:
                self.clustering = build_clustering(
                    clustering, dim, num_clusters, kernel_size=clustering_kernel_size,
                    mlp_ratio=mlp_ratio, act_cfg=act_cfg,
                )
            if self.cluster_pos_embed:
                self.cluster_pos_enc = nn.Parameter(torch.zeros(1, num_clusters, dim))
                nn.init.trunc_normal_(self.cluster_pos_enc, std=0.02)

        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.attn_drop = float(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        # Forward hooks (and pre-hooks) on attn_viz receive the (B, h, N, M) attention maps, as in the
        # official layer; the maps are computed only when one is registered (or return_attn).
        self.attn_viz = nn.Identity()

    # -- the one decision point ---------------------------------------------------------------------
    def _plan(self, x: Tensor, given: Tensor | None, return_attn: bool) -> AttentionPlan:
        """Which path serves this call (x and ``given``, the logits or z passed in, validated):
        :func:`paca_kernels.nn._fusion.plan_attention`, which holds every condition."""
        return plan_attention(self, x, given, return_attn)

    # -- the paths ----------------------------------------------------------------------------------
    def _fused_layer(
        self, x: Tensor, H: int, W: int, plan: AttentionPlan, probs: bool, residual: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        norm = self._modules["cluster_norm"]
        return _layer_op.conv_paca_layer(
            x, H, W, plan.head, (norm.weight, norm.bias, norm.eps), plan.attention, self.num_heads,
            1.0 / math.sqrt(self.head_dim), probs, residual,
        )

    def _cluster_tokens(self, x: Tensor, logits: Tensor | None, z: Tensor | None, plan: AttentionPlan) -> Tensor:
        """(B, M, C) cluster tokens from logits (the fused op where the plan says) or probabilities z."""
        if logits is not None and plan.fused_pool:
            norm = self.cluster_norm
            return ops.cluster_pool(logits, x, norm.weight, norm.bias, self._ln_eps, backend=self.backend)
        if z is None:
            z = reference.cluster_assign(logits)
        c = torch.matmul(z, x)
        if self.cluster_pos_embed:
            c = c + self.cluster_pos_enc
        return self.cluster_norm(c)

    def _check_assignment(self, name: str, t: Tensor, x: Tensor) -> None:
        b, n, _ = x.shape
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape (B, M, N), got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
        if tuple(t.shape) != (b, self.num_clusters, n):
            raise ValueError(
                f"{name} must have shape (B, M, N) = ({b}, {self.num_clusters}, {n}), "
                f"got {tuple(t.shape)}"
            )
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")

    def _given(self, x: Tensor, logits: Tensor | None, z: Tensor | None) -> Tensor | None:
        """The validated assignment passed in (logits or z), or None when the layer clusters on site
        (or has no clusters); ValueError when a layer without a head of its own gets neither."""
        if self.num_clusters == 0 or self.onsite_clustering:
            return None
        if logits is not None:
            self._check_assignment("logits", logits, x)
            return logits
        if z is not None:
            self._check_assignment("z", z, x)
            return z
        raise ValueError(
            "this PaCa layer has no clustering head of its own (onsite_clustering=False): pass "
            "the cluster assignment z (B, M, N) computed by an earlier layer or a teacher"
        )

    def _attend(
        self, x: Tensor, c: Tensor, plan: AttentionPlan, residual: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """proj(softmax(q·kᵀ/√d)·v) with q from x (B, N, C) and k, v from c (B, M, C), plus
        ``residual`` when given."""
        b, n, _ = x.shape
        m = c.shape[1]
        h, d = self.num_heads, self.head_dim
        if plan.attention is not None:
            # The projections and the attention over the clusters in one pass over the patches
            # (the residual added as the output rows are written).
            out = _attention_op.p2c_attention_proj(x, c, *plan.attention, h, 1.0 / math.sqrt(d), residual)
            return out, None
        q = self.q(x).view(b, n, h, d)
        k = self.k(c).view(b, m, h, d)
        v = self.v(c).view(b, m, h, d)
        drop = self.attn_drop if self.training else 0.0
        attn: Tensor | None = None
        if plan.want_maps or drop > 0.0:
            attn = reference.p2c_attention_weights(q, k)  # (B, h, N, M)
            if plan.want_maps:
                attn = self.attn_viz(attn)
            probs = F.dropout(attn, drop, training=True) if drop > 0.0 else attn
            out = torch.matmul(probs, v.transpose(1, 2)).transpose(1, 2)
        elif self.num_clusters == 0:
            if x.is_cuda:
                # Self-attention over the patches (N keys): SDPA's fused kernels are the right tool.
                out = F.scaled_dot_product_attention(
                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=1.0 / math.sqrt(d)
                ).transpose(1, 2)
            else:
                # On the CPU the last stage is tiny (N = 49 at 224²) and FlopCounterMode does not
                # count SDPA's CPU kernel: explicit matmuls keep the official MAC counts exact.
                out = reference.p2c_attention(q, k, v)
        else:
            out = ops.p2c_attention(q, k, v, backend=self.backend)
        out = self.proj_drop(self.proj(out.reshape(b, n, self.dim)))
        return (out if residual is None else residual + out), attn

    def _run(
        self, x: Tensor, H: int, W: int, logits: Tensor | None, z: Tensor | None, plan: AttentionPlan,
        residual: Tensor | None,
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """The per-part path: (out, logits computed on site or None, maps or None)."""
        if self.num_clusters == 0:
            out, attn = self._attend(x, x, plan, residual)
            return out, None, attn
        if self.onsite_clustering:
            if plan.head is not None:
                logits = _head_op.conv_cluster_logits(x, H, W, *plan.head)
            else:
                logits = self.clustering(x, H, W)
            z = None
        c = self._cluster_tokens(x, logits, z, plan)
        out, attn = self._attend(x, c, plan, residual)
        return out, logits, attn

    def forward(
        self, x: Tensor, H: int, W: int, z: Tensor | None = None, *, return_attn: bool = False,
        residual: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None] | tuple[Tensor, Tensor | None, Tensor]:
        """Official interface.

        Args:
            x: (B, N, C) patch tokens, N = H·W.
            H, W: the patch grid.
            z: (B, M, N) cluster assignment (probabilities over N) from an earlier layer or a teacher;
                ignored when this layer clusters on site.
            return_attn: also return the per-head attention maps (B, h, N, M).
            residual: (B, N, C) or None (not in the official interface): added to out, so that a
                pre-norm block's ``x + attn(norm(x))`` is one fused call (the fused ops add it as
                they write their output, in the residual's dtype: float32 under autocast).

        Returns:
            (out (B, N, C), z (B, M, N) or None when M = 0), plus the maps when ``return_attn``.
        """
        check_tokens(x, H, W, self.dim)
        given = self._given(x, None, z)
        return self._planned(x, H, W, z, given, self._plan(x, given, return_attn), False, return_attn, residual)

    def forward_logits(
        self,
        x: Tensor,
        H: int,
        W: int,
        logits: Tensor | None = None,
        *,
        return_attn: bool = False,
        residual: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None] | tuple[Tensor, Tensor | None, Tensor]:
        """Like :meth:`forward`, but the assignment travels as logits (z = softmax(logits over N)).

        This is the path the models use: the fused pooling consumes logits directly, so sharing an
        assignment across the blocks of a stage never materialises the (B, M, N) probabilities.
        """
        check_tokens(x, H, W, self.dim)
        given = self._given(x, logits, None)
        return self._planned(x, H, W, None, given, self._plan(x, given, return_attn), True, return_attn, residual)

    def _planned(
        self, x: Tensor, H: int, W: int, z: Tensor | None, given: Tensor | None, plan: AttentionPlan,
        as_logits: bool, return_attn: bool, residual: Tensor | None,
    ) -> tuple[Tensor, ...]:
        """:meth:`forward_logits` (``as_logits``: ``given`` is the validated logits or None) or
        :meth:`forward` (``given`` the validated z or None, ``z`` the argument, returned where the
        layer computes no assignment) on validated x, with the path decided: ``plan`` (also made by
        :func:`~paca_kernels.nn._fusion.plan_block` for a whole block)."""
        if plan.layer:
            return self._fused_layer(x, H, W, plan, not as_logits, residual)
        if as_logits:
            # The logits computed on site, or the ones passed in (None when M = 0).
            out, logits, attn = self._run(x, H, W, given, None, plan, residual)
            return (out, logits, attn) if return_attn else (out, logits)
        out, logits, attn = self._run(x, H, W, None, given, plan, residual)
        if logits is not None:
            z = reference.cluster_assign(logits)
        return (out, z, attn) if return_attn else (out, z)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, num_clusters={self.num_clusters}, "
            f"onsite_clustering={self.onsite_clustering}, attn_drop={self.attn_drop}, "
            f"backend={self.backend!r}"
        )


class PaCaLayer(PaCaAttention):
    """The official constructor signature: ``PaCaLayer(paca_cfg, dim, num_heads, ...)``.

    ``paca_cfg`` keys (official names): type ("P2CConv2d", "P2CMlp", "P2CLinear"), clusters,
    onsite_clustering, clustering_kernel_size, cluster_norm_cfg (dict or None), cluster_pos_embed.
    """

    def __init__(
        self,
        paca_cfg: Mapping[str, Any],
        dim: int,
        num_heads: int,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        mlp_ratio: float = 4.0,
        act_cfg: Mapping[str, Any] | None = None,
        backend: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**paca_layer_kwargs(paca_cfg), dim=dim, num_heads=num_heads,
                         attn_drop=attn_drop, proj_drop=proj_drop, mlp_ratio=mlp_ratio,
                         act_cfg=act_cfg, backend=backend)


def paca_layer_kwargs(paca_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Translate an official ``paca_cfg`` dict into :class:`PaCaAttention` keyword arguments."""
    norm = paca_cfg.get("cluster_norm_cfg", {"type": "LN", "eps": 1e-6})
    return {
        "num_clusters": int(paca_cfg.get("clusters", 100)),
        "clustering": paca_cfg.get("type", "P2CConv2d"),
        "onsite_clustering": bool(paca_cfg.get("onsite_clustering", True)),
        "clustering_kernel_size": int(paca_cfg.get("clustering_kernel_size", 7)),
        "cluster_norm": norm if norm else False,
        "cluster_pos_embed": bool(paca_cfg.get("cluster_pos_embed", False)),
    }


BLOCK_PARTS.update((PaCaAttention, PaCaLayer))
