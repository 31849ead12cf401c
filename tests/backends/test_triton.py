"""Triton-only cases (paca_kernels/triton): the split-N pooling forced through the launchers. The GPU
compiler's view of every launch (resources, grids) is tests/backends/test_triton_resources.py; the op
tests (tests/ops/) run the triton backend through the same bodies as every other backend."""

from __future__ import annotations

import math

import pytest
import torch

from paca_kernels import reference
from paca_kernels.testing import (
    assert_close,
    backend_device,
    clone_leaves,
    grads,
    make_cluster_pool_inputs,
    shape_id,
)
from paca_kernels.triton import TRITON_AVAILABLE, TRITON_UNAVAILABLE_REASON

if not TRITON_AVAILABLE:
    pytest.skip(f"Triton kernels: {TRITON_UNAVAILABLE_REASON}", allow_module_level=True)

from paca_kernels.ops import get_backend
from paca_kernels.ops.cluster_pool import cluster_pool_triton
from paca_kernels.triton.cluster_pool import cluster_pool_bwd, cluster_pool_fwd

BACKEND = get_backend("triton")
pytestmark = pytest.mark.skipif(BACKEND.unavailable_reason() is not None,
                                reason=f"triton: {BACKEND.unavailable_reason()}")
DEVICE = backend_device("triton")
FWD_TOL, BWD_TOL = BACKEND.tolerance(torch.float32), BACKEND.tolerance(torch.float32, grad=True)


# -- cluster_pool: the split-N path -------------------------------------------------------------------

# (B, M, N, C, affine, contiguous, num_splits): num_splits forces the split-N path (partial softmax
# sums over chunks of N, merged afterwards) that the heuristic takes for few (B, M) programs.
SPLIT_SHAPES = [
    (3, 3, 197, 64, True, True, 2),
    (1, 17, 300, 40, True, False, 3),
    (2, 1, 197, 8, False, True, 4),
]


def _split_id(s):
    b, m, n, c, affine, contiguous, splits = s
    return (f"triton-{shape_id(B=b, M=m, N=n, C=c)}" + ("" if affine else "-noaffine")
            + ("" if contiguous else "-strided") + f"-split{splits}-fp32")


@pytest.mark.parametrize("shape", SPLIT_SHAPES, ids=[_split_id(s) for s in SPLIT_SHAPES])
def test_split_n_pool_matches_reference(shape):
    b, m, n, c, affine, contiguous, splits = shape
    inp = make_cluster_pool_inputs(b, m, n, c, device=DEVICE, affine=affine, contiguous=contiguous,
                                   requires_grad=True)
    args = (inp.logits, inp.x, inp.weight, inp.bias)
    grad_out = torch.randn(b, m, c, device=DEVICE)

    class _Fn(torch.autograd.Function):
        """The raw launchers with a forced split count, wired to the Triton backward."""

        @staticmethod
        def forward(ctx, logits, x, w, bias):
            out, pooled, stats = cluster_pool_fwd(logits, x, w, bias, 1e-6, num_splits=splits)
            ctx.save_for_backward(logits, x, w, pooled, stats)
            return out

        @staticmethod
        def backward(ctx, g):
            logits, x, w, pooled, stats = ctx.saved_tensors
            dl, dx, dw, db = cluster_pool_bwd(g, logits, x, w, pooled, stats, 1e-6)
            return dl, dx, dw if affine else None, db if affine else None

    got, got_g = grads(_Fn.apply, args, grad_out)
    want, want_g = grads(reference.cluster_pool, clone_leaves(args), grad_out)
    assert_close(got, want, **FWD_TOL)
    for name, g, w in zip(("dlogits", "dx", "dweight", "dbias"), got_g, want_g, strict=False):
        assert_close(g, w, name=name, **BWD_TOL)


def test_split_n_saved_pooled_and_stats():
    """pooled, and stats = (row max, Σ exp(logits − max)) with the max exact, one pass and split-N."""
    inp = make_cluster_pool_inputs(2, 5, 30, 12, device=DEVICE)
    row_max = inp.logits.amax(-1)
    for splits in (1, 3):
        _, pooled, stats = cluster_pool_fwd(inp.logits, inp.x, inp.weight, inp.bias, 1e-6, num_splits=splits)
        assert_close(pooled, torch.softmax(inp.logits, -1) @ inp.x, **FWD_TOL)
        assert torch.equal(stats[..., 0], row_max)
        assert_close(stats[..., 1], torch.exp(inp.logits - row_max[..., None]).sum(-1), **FWD_TOL)


def test_split_n_extreme_logits_no_nan():
    """Logits of ±1e4, and a cluster that is -inf on every patch but one: -inf on whole chunks."""
    inp = make_cluster_pool_inputs(1, 4, 40, 16, device=DEVICE, requires_grad=True)
    with torch.no_grad():
        inp.logits.copy_(torch.sign(inp.logits) * 1e4 + inp.logits)
        inp.logits[0, 1] = -math.inf
        inp.logits[0, 1, 37] = 0.5
    args = (inp.logits, inp.x, inp.weight, inp.bias)
    out, pooled, stats = cluster_pool_fwd(*args, 1e-6, num_splits=3)
    assert torch.isfinite(out).all() and torch.isfinite(stats).all()
    assert_close(out, reference.cluster_pool(*args), rtol=1e-4, atol=1e-4)
    assert_close(pooled[0, 1], inp.x[0, 37], **FWD_TOL)  # all the weight on patch 37
    cluster_pool_triton(*args).sum().backward()
    for t in args:
        assert torch.isfinite(t.grad).all()
