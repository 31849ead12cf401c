"""CUDA-only cases (csrc/cuda, backend "cuda"), on a GPU: grid-stride loops past gridDim.y = 65535.
The op tests (tests/ops/) run the cuda backend through the same bodies as every other backend; the
kernels' float32 path is also checked on the CPU (test_cuda_emulation.py) and compiled by nvcc
(test_cuda_compile.py)."""

from __future__ import annotations

import pytest
import torch

from paca_kernels import ops, reference
from paca_kernels.testing import assert_close, clone_leaves, grads, make_cluster_pool_inputs, make_p2c_inputs

BACKEND = ops.get_backend("cuda")
# Marked gpu (skipped without a CUDA device), and skipped with the backend's reason where _C has no
# CUDA kernels.
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(BACKEND.unavailable_reason() is not None,
                                                  reason=f"cuda: {BACKEND.unavailable_reason()}")]
FWD_TOL, BWD_TOL = BACKEND.tolerance(torch.float32), BACKEND.tolerance(torch.float32, grad=True)


def test_p2c_many_batch_heads_grid_stride():
    """B*h > 65535 (gridDim.y): the kernels loop over the rest."""
    inp = make_p2c_inputs(33000, 3, 2, 2, 8, device="cuda", requires_grad=True)
    grad_out = torch.randn(33000, 3, 2, 8, device="cuda")
    p2c = lambda *t: ops.p2c_attention(*t, backend="cuda")
    got, got_g = grads(p2c, (inp.q, inp.k, inp.v), grad_out)
    want, want_g = grads(reference.p2c_attention, clone_leaves((inp.q, inp.k, inp.v)), grad_out)
    assert_close(got, want, **FWD_TOL)
    for name, g, w in zip(("dq", "dk", "dv"), got_g, want_g, strict=True):
        assert_close(g, w, name=name, **BWD_TOL)


def test_pool_many_batches_grid_stride():
    """B > 65535 (gridDim.y): the kernels loop over the rest."""
    inp = make_cluster_pool_inputs(70000, 1, 3, 8, device="cuda", requires_grad=True)
    args = (inp.logits, inp.x, inp.weight, inp.bias)
    grad_out = torch.randn(70000, 1, 8, device="cuda")
    pool = lambda *t: ops.cluster_pool(*t, backend="cuda")
    got, got_g = grads(pool, args, grad_out)
    want, want_g = grads(reference.cluster_pool, clone_leaves(args), grad_out)
    assert_close(got, want, rtol=2e-5, atol=2e-5)
    for name, g, w in zip(("dlogits", "dx", "dweight", "dbias"), got_g, want_g, strict=True):
        assert_close(g, w, name=name, rtol=1e-4, atol=1e-4)
