"""The pure-PyTorch oracle for the two PaCa computations.

Everything here is written to be obviously correct, not fast: plain softmax, matmul and LayerNorm,
in whatever dtype the inputs have (float64 included, so gradcheck works). Every kernel of the library
is tested against these functions, and the ``"reference"`` backend of :mod:`paca_kernels.ops` runs them.

Shapes (B batch, N = H·W patches, M clusters, C channels, h heads, d = C/h head dim):

- :func:`cluster_pool`: logits (B, M, N), x (B, N, C) -> (B, M, C)
- :func:`layer_norm` / :func:`layer_norm_stats`: the LayerNorm cluster_pool ends with, free of overflow
- :func:`p2c_attention`: q (B, N, h, d), k and v (B, M, h, d) -> (B, N, h, d)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["cluster_assign", "cluster_pool", "layer_norm", "layer_norm_stats", "p2c_attention", "p2c_attention_weights"]


def cluster_assign(logits: Tensor) -> Tensor:
    """Soft cluster assignment S = softmax(logits over N).

    Args:
        logits: (B, M, N) clustering scores.

    Returns:
        (B, M, N): each cluster's distribution over the patches (rows sum to 1 over N).
    """
    return torch.softmax(logits, dim=-1)


def layer_norm_stats(p: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """LayerNorm statistics of the rows of ``p`` (..., C) that neither overflow nor underflow.

    ``F.layer_norm`` squares the deviations: a float32 row of magnitude 1e20 overflows (PyTorch returns
    NaN), and one of 1e-20 squares to nothing. Each row is first divided by a power of two near its
    largest magnitude, which LayerNorm is invariant under (with eps scaled alike):

        q = p / scale,   x̂ = (q − mean(q)) / sqrt(var(q) + eps / scale²) = (p − mean(p)) / sqrt(var(p) + eps)

    and which is exact, so ordinary rows round as unscaled code does. ``scale`` is clamped so that
    eps / scale² stays finite (scale ≥ about sqrt(eps)·2⁻⁴¹: below that eps dominates the variance
    anyway) and 1/scale is a normal number; eps / scale² is floored at the smallest normal number
    (which only matters for an exactly constant row, whose deviations are all 0). A zero, inf or NaN
    row keeps scale 1. The same rule as the kernels' (csrc/cpu/math/layernorm.h, the Triton and CUDA
    epilogues), so every backend gives the same answer.

    Args:
        p: (..., C) rows, float32 or float64 (C = 0: statistics of empty rows, unused).
        eps: the LayerNorm epsilon.

    Returns:
        inv_scale, mean, rstd, each (..., 1): x̂ = (p·inv_scale − mean)·rstd, and the rstd of p itself is
        rstd·inv_scale. Gradients flow through mean and rstd (the scale is piecewise constant).
    """
    fi = torch.finfo(p.dtype)
    max_exp, min_exp = round(math.log2(fi.max)), round(math.log2(fi.tiny)) + 1  # frexp's range
    lo = min_exp + 30
    if eps > 0:
        lo = max(lo, math.frexp(math.sqrt(eps))[1] - 41)
    with torch.no_grad():
        # C = 0: no statistics to take (the caller's rows are empty); amax of nothing is refused by torch.
        amax = p.abs().amax(-1, keepdim=True) if p.shape[-1] > 0 else p.new_zeros((*p.shape[:-1], 1))
        # scale = 2^floor(log2 amax), through log2/floor/exp2 rather than frexp/ldexp so that the ONNX
        # exporter can translate it (the op decompositions use this function). Only that scale is a power
        # of two matters (dividing by it is exact): a log2 rounded across a power of two moves it by one
        # binade, which changes no result bit.
        exponent = torch.floor(torch.log2(amax)).clamp(lo, max_exp - 28)
        scale = torch.exp2(exponent)
        scale = torch.where((amax > 0) & (amax <= fi.max), scale, torch.ones_like(scale))
        inv_scale = 1.0 / scale
    q = p * inv_scale
    mean = q.mean(-1, keepdim=True)
    var = (q - mean).square().mean(-1, keepdim=True)
    eps_q = (eps * inv_scale * inv_scale).clamp_min(fi.tiny)
    return inv_scale, mean, torch.rsqrt(var + eps_q)


def layer_norm(p: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """``F.layer_norm(p, (C,), weight, bias, eps)`` (biased variance), without its overflow.

    Computed in float32 (float64 for float64 ``p``) like PyTorch's kernels, with the statistics of
    :func:`layer_norm_stats`: a float32 row of 1e20 gives its true (finite) normalised values where
    F.layer_norm gives NaN, and a row of 1e-20 keeps its variance.

    Args:
        p: (..., C) rows.
        weight, bias: (C,) affine, or None.
        eps: the LayerNorm epsilon.

    Returns:
        (..., C) in p's dtype: (p − mean)/sqrt(var + eps)·weight + bias.
    """
    acc = torch.float64 if p.dtype == torch.float64 else torch.float32
    pa = p.to(acc)
    inv_scale, mean, rstd = layer_norm_stats(pa, eps)
    y = (pa * inv_scale - mean) * rstd
    if weight is not None:
        y = y * weight.to(acc)
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(p.dtype)


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

    The LayerNorm is :func:`layer_norm`: F.layer_norm's result, computed without overflow (a pooled row
    of 1e20 in float32 gives its true normalised values, where F.layer_norm gives NaN).

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
    return layer_norm(pooled, weight, bias, eps)


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
