"""The reference oracle against explicit float64 formulas written element by element."""

from __future__ import annotations

import math

import pytest
import torch

from paca_kernels import reference
from paca_kernels.testing import assert_close, make_cluster_pool_inputs, make_p2c_inputs, shape_id

POOL_SHAPES = [(1, 1, 1, 4), (2, 3, 7, 5), (2, 49, 197, 24), (3, 100, 49, 40)]


def _explicit_cluster_pool(logits, x, weight, bias, eps):
    """Loops over b, m: softmax by exp/sum, weighted sum, then mean/var normalisation."""
    B, M, _ = logits.shape
    C = x.shape[2]
    out = torch.empty(B, M, C, dtype=torch.float64)
    for b in range(B):
        for m in range(M):
            row = logits[b, m]
            e = torch.exp(row - row.max())
            s = e / e.sum()
            p = (s[:, None] * x[b]).sum(0)
            mu = p.sum() / C
            var = ((p - mu) ** 2).sum() / C
            z = (p - mu) / math.sqrt(var + eps)
            if weight is not None:
                z = z * weight
            if bias is not None:
                z = z + bias
            out[b, m] = z
    return out


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("shape", POOL_SHAPES, ids=[shape_id(B=b, M=m, N=n, C=c) for b, m, n, c in POOL_SHAPES])
def test_cluster_pool_matches_explicit_formula(shape, affine):
    B, M, N, C = shape
    inp = make_cluster_pool_inputs(B, M, N, C, dtype=torch.float64, affine=affine)
    got = reference.cluster_pool(inp.logits, inp.x, inp.weight, inp.bias, eps=1e-6)
    want = _explicit_cluster_pool(inp.logits, inp.x, inp.weight, inp.bias, 1e-6)
    assert got.dtype == torch.float64 and got.shape == (B, M, C)
    assert_close(got, want)


def test_cluster_assign_is_a_distribution_over_n():
    logits = torch.randn(2, 5, 33, dtype=torch.float64) * 10
    s = reference.cluster_assign(logits)
    assert (s >= 0).all()
    assert_close(s.sum(-1), torch.ones(2, 5, dtype=torch.float64))


def test_cluster_pool_eps_matters():
    # A constant pooled row has zero variance: the result is (0 - 0)/sqrt(eps) * w + b = b.
    logits = torch.randn(1, 2, 4, dtype=torch.float64)
    x = torch.ones(1, 4, 3, dtype=torch.float64) * 2.5
    bias = torch.randn(3, dtype=torch.float64)
    out = reference.cluster_pool(logits, x, torch.ones(3, dtype=torch.float64), bias, eps=1e-6)
    assert_close(out, bias.expand(1, 2, 3))


ATTN_SHAPES = [(1, 1, 1, 1, 8), (2, 7, 3, 2, 24), (2, 197, 49, 3, 40), (1, 16, 100, 1, 48)]


def _explicit_p2c(q, k, v, scale):
    B, N, h, _ = q.shape
    out = torch.empty_like(q)
    for b in range(B):
        for head in range(h):
            for n in range(N):
                s = (k[b, :, head] * q[b, n, head]).sum(-1) * scale  # (M,)
                p = torch.exp(s - s.max())
                p = p / p.sum()
                out[b, n, head] = (p[:, None] * v[b, :, head]).sum(0)
    return out


@pytest.mark.parametrize(
    "shape", ATTN_SHAPES, ids=[shape_id(B=b, N=n, M=m, H=h, D=d) for b, n, m, h, d in ATTN_SHAPES]
)
def test_p2c_attention_matches_explicit_formula(shape):
    B, N, M, h, d = shape
    inp = make_p2c_inputs(B, N, M, h, d, dtype=torch.float64)
    got = reference.p2c_attention(inp.q, inp.k, inp.v)
    assert got.shape == (B, N, h, d)
    assert_close(got, _explicit_p2c(inp.q, inp.k, inp.v, d**-0.5))


def test_p2c_attention_explicit_scale_and_weights():
    inp = make_p2c_inputs(2, 9, 4, 2, 8, dtype=torch.float64)
    got = reference.p2c_attention(inp.q, inp.k, inp.v, scale=0.3)
    assert_close(got, _explicit_p2c(inp.q, inp.k, inp.v, 0.3))
    attn = reference.p2c_attention_weights(inp.q, inp.k, scale=0.3)
    assert attn.shape == (2, 2, 9, 4)
    assert_close(attn.sum(-1), torch.ones(2, 2, 9, dtype=torch.float64))


def test_reference_is_differentiable_in_float64():
    inp = make_cluster_pool_inputs(1, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b, w, c: reference.cluster_pool(a, b, w, c), (inp.logits, inp.x, inp.weight, inp.bias)
    )
    p = make_p2c_inputs(1, 4, 3, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(reference.p2c_attention, (p.q, p.k, p.v))
