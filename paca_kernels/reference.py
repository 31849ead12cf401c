"""The pure-PyTorch oracle for the two PaCa computations.

Everything here is written to be obviously correct, not fast: plain softmax, matmul and LayerNorm,
in whatever dtype the inputs have (float64 included, so gradcheck works). Every kernel of the library
is tested against these functions, and the ``"reference"`` backend of :mod:`paca_kernels.ops` runs them.

Shapes (B batch, N = H·W patches, M clusters, C channels, h heads, d = C/h head dim):

- :func:`cluster_pool`: logits (B, M, N), x (B, N, C) -> (B, M, C)
- :func:`p2c_attention`: q (B, N, h, d), k and v (B, M, h, d) -> (B, N, h, d)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["cluster_assign", "cluster_pool", "p2c_attention", "p2c_attention_weights"]


def cluster_assign(logits: Tensor) -> Tensor:
    """Soft cluster assignment S = softmax(logits over N).

    Args:
        logits: (B, M, N) clustering scores.

    Returns:
        (B, M, N): each cluster's distribution over the patches (rows sum to 1 over N).
    """
    return torch.softmax(logits, dim=-1)


def cluster_pool(
    logits: Tensor,
    x: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-6,
) -> Tensor:
    """Cluster tokens Z = LayerNorm(softmax(logits over N) · x).

    Math, per batch b and cluster m:
        S[b, m, n] = exp(logits[b, m, n]) / Σ_n' exp(logits[b, m, n'])
        P[b, m, :] = Σ_n S[b, m, n] · x[b, n, :]
        Z[b, m, :] = (P[b, m, :] − mean_c P[b, m, :]) / sqrt(var_c P[b, m, :] + eps) · weight + bias

    Args:
        logits: (B, M, N) clustering scores.
        x: (B, N, C) patch tokens.
        weight: (C,) LayerNorm scale, or None (no scale).
        bias: (C,) LayerNorm shift, or None (no shift).
        eps: LayerNorm epsilon (the official PaCa-ViT uses 1e-6).

    Returns:
        (B, M, C) cluster tokens, dtype of x.
    """
    pooled = torch.matmul(cluster_assign(logits), x)
    return F.layer_norm(pooled, (x.shape[-1],), weight, bias, eps)


def p2c_attention_weights(q: Tensor, k: Tensor, scale: float | None = None) -> Tensor:
    """Per-head patch-to-cluster attention maps A = softmax(q·kᵀ·scale over M).

    Args:
        q: (B, N, h, d) queries (one per patch).
        k: (B, M, h, d) keys (one per cluster).
        scale: score scale; defaults to d^-1/2.

    Returns:
        (B, h, N, M) attention probabilities (rows sum to 1 over M).
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    # kᵀ as two transposes, not k.permute(0, 2, 3, 1): with the permute, Inductor's fused-attention
    # pattern (torch 2.13, CPU inference) reads k and v as (B, h, M, d) and compiles a wrong graph.
    scores = torch.matmul(q.transpose(1, 2), k.transpose(1, 2).transpose(-2, -1)) * scale  # (B, h, N, M)
    return torch.softmax(scores, dim=-1)


def p2c_attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> Tensor:
    """Patch-to-cluster attention out = softmax(q·kᵀ·scale over M) · v, per head.

    Args:
        q: (B, N, h, d) queries.
        k: (B, M, h, d) keys.
        v: (B, M, h, d) values.
        scale: score scale; defaults to d^-1/2.

    Returns:
        (B, N, h, d), dtype of q.
    """
    attn = p2c_attention_weights(q, k, scale)  # (B, h, N, M)
    return torch.matmul(attn, v.transpose(1, 2)).transpose(1, 2)  # (B, N, h, d)
