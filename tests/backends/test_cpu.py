"""cpu-backend-only cases (csrc/cpu): the same bits whatever the thread count, and per-thread scratch
buffers that carry nothing from one call to the next. The op tests (tests/ops/) run the cpu backend
through the same bodies as every other backend; tests/backends/test_cpu_isa.py covers the ISA builds."""

from __future__ import annotations

import math

import pytest
import torch

from paca_kernels import ops, reference
from paca_kernels.testing import (
    assert_close,
    assert_same_bits_across_thread_counts,
    make_cluster_pool_inputs,
    make_p2c_inputs,
)

pytestmark = pytest.mark.extension

TOL = ops.get_backend("cpu").tolerance(torch.float32)


def test_p2c_backward_deterministic_across_thread_counts():
    p = make_p2c_inputs(2, 1000, 49, 2, 24)
    g = torch.randn_like(p.q)
    assert_same_bits_across_thread_counts(
        lambda: torch.ops.paca_kernels.p2c_attention_bwd(g, p.q, p.k, p.v, 0.2, True), (1, 2, 1)
    )


def test_cluster_pool_backward_deterministic_across_thread_counts():
    inp = make_cluster_pool_inputs(3, 49, 1000, 24)
    pooled, lse = torch.ops.paca_kernels.cluster_pool_fwd(inp.logits, inp.x, inp.weight, inp.bias, 1e-6)[1:]
    g = torch.randn(3, 49, 24)
    assert_same_bits_across_thread_counts(
        lambda: torch.ops.paca_kernels.cluster_pool_bwd(g, inp.logits, inp.x, inp.weight, pooled, lse, 1e-6),
        (1, 2, 1),
    )


def test_cluster_pool_forward_deterministic_across_thread_counts():
    inp = make_cluster_pool_inputs(1, 20, 5000, 24)
    assert_same_bits_across_thread_counts(
        lambda: torch.ops.paca_kernels.cluster_pool_fwd(inp.logits, inp.x, inp.weight, inp.bias, 1e-6), (1, 2)
    )


def test_cluster_pool_forward_scratch_buffers_carry_nothing_between_calls():
    # Per-thread scratch buffers (the split partials, the tiles) are reused across calls: after a
    # NaN call with more splits, a smaller one still matches the reference.
    nan = make_cluster_pool_inputs(2, 30, 2500, 40)
    for t in (nan.logits, nan.x):
        t.fill_(math.nan)
    out = torch.ops.paca_kernels.cluster_pool_fwd(nan.logits, nan.x, nan.weight, nan.bias, 1e-6)[0]
    assert torch.isnan(out).all()
    for B, M, N, C in [(2, 3, 1100, 20), (1, 49, 197, 40)]:
        inp = make_cluster_pool_inputs(B, M, N, C)
        got = ops.cluster_pool(inp.logits, inp.x, inp.weight, inp.bias, backend="cpu")
        assert_close(got, reference.cluster_pool(inp.logits, inp.x, inp.weight, inp.bias), **TOL)
