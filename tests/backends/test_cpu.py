"""cpu-backend-only cases (csrc/cpu): the same bits whatever the thread count, and per-thread scratch
buffers that carry nothing from one call to the next. The op tests (tests/ops/) run the cpu backend
through the same bodies as every other backend; tests/backends/test_cpu_isa.py covers the ISA builds."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from paca_kernels import ops, reference
from paca_kernels.testing import (
    assert_close,
    assert_same_bits_across_thread_counts,
    make_cluster_pool_inputs,
    make_p2c_inputs,
    num_threads,
)

pytestmark = pytest.mark.extension

TOL = ops.get_backend("cpu").tolerance(torch.float32)


def test_p2c_backward_deterministic_across_thread_counts():
    p = make_p2c_inputs(2, 1000, 49, 2, 24)
    g = torch.randn_like(p.q)
    assert_same_bits_across_thread_counts(
        lambda: torch.ops.paca_kernels.p2c_attention_bwd(g, p.q, p.k, p.v, 0.2, True), (1, 2, 1)
    )


def test_p2c_small_n_paths_give_the_chunked_paths_bits():
    # N <= 240 queries per head: one task per (batch, head) packs its own keys and values (forward
    # when there are at least 4 heads' tasks per thread, backward always); else the per-call
    # packing. Both compute every output the same way: 12 (batch, head) pairs take the per-task
    # path at one thread and the per-call one at four (12 < 4 * 4), with the same bits, and agree
    # with float64; the backward's small-N path is checked against float64 and across threads.
    p = make_p2c_inputs(4, 197, 49, 3, 40)
    q, k, v = (t.detach().transpose(1, 2).contiguous().transpose(1, 2) for t in (p.q, p.k, p.v))  # strided
    fwd = torch.ops.paca_kernels.p2c_attention_fwd
    assert_same_bits_across_thread_counts(lambda: fwd(q, k, v, 0.2), (1, 4))
    g = torch.randn_like(p.q)
    assert_same_bits_across_thread_counts(
        lambda: torch.ops.paca_kernels.p2c_attention_bwd(g, q, k, v, 0.2, True), (1, 2, 3)
    )
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    want = reference.p2c_attention(q64, k64, v64, scale=0.2)
    want_grads = torch.autograd.grad(want, (q64, k64, v64), g.double())
    for n in (1, 4):
        with num_threads(n), torch.no_grad():
            out = fwd(q, k, v, 0.2)[0]
            grads = torch.ops.paca_kernels.p2c_attention_bwd(g, q, k, v, 0.2, True)
        assert_close(out, want.float(), **TOL, name=f"out ({n} threads)")
        for name, a, b in zip(("dq", "dk", "dv"), grads, want_grads, strict=True):
            assert_close(a, b.float(), **TOL, name=f"{name} ({n} threads)")


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize(
    ("B", "M", "N", "C"),
    [(2, 13, 784, 24), (1, 7, 1100, 17), (2, 100, 196, 40), (3, 9, 33, 5)],
    ids=lambda v: str(v),
)
def test_cluster_pool_patch_major_logits_give_the_bits_of_contiguous_ones(B, M, N, C, dtype):
    """The clustering heads give logits (B, M, N) with strides (N·M, 1, M) (a channels-last 1×1 conv,
    or (x·W)ᵀ). The kernels read such tiles in place or transpose them, never element by element,
    and must give exactly the bits of contiguous logits, forward and backward; tiles of every size
    (N = 784: balanced tiles, 1100: two forward splits, 33: one short tile), M below and above a
    vector, odd C."""
    base = make_cluster_pool_inputs(B, M, N, C, dtype=dtype)
    patch_major = base.logits.transpose(1, 2).contiguous().transpose(1, 2)
    assert patch_major.stride() == (N * M, 1, M)
    grad_out = torch.randn(B, M, C, dtype=dtype)
    results = []
    for logits in (base.logits, patch_major):
        # detach() keeps the strides (clone() of a non-dense view would not).
        args = [t.detach().requires_grad_(True) for t in (logits, base.x, base.weight, base.bias)]
        out = ops.cluster_pool(*args, backend="cpu")
        out.backward(grad_out)
        results.append([out.detach(), *(a.grad for a in args)])
    for i, (a, b) in enumerate(zip(*results, strict=True)):
        assert torch.equal(a, b), f"output {i}: max difference {(a - b).abs().max().item():.3g}"
    ref_args = [t.detach().double().requires_grad_(True) for t in (patch_major, base.x, base.weight, base.bias)]
    ref = reference.cluster_pool(*ref_args)
    ref.backward(grad_out.double())
    tol = {"rtol": 1e-4, "atol": 5e-5} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-12}
    assert_close(results[1][0].double(), ref.detach(), **tol)
    for got, want in zip(results[1][1:], ref_args, strict=True):
        assert_close(got.double(), want.grad, **tol)


@pytest.mark.parametrize("op", ["p2c_attention", "cluster_pool"])
def test_cpu_backward_makes_no_zero_gradients_for_the_statistics(op):
    """The forward's statistics (the saved numerators, pooled, stats) are non-differentiable outputs:
    autograd must not build zero gradients for them before the backward (a (B, h, N, M) zero fill
    per call cost a third of the attention's backward)."""

    class Fills(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.calls: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func.overloadpacket)
            if any(w in name for w in ("zero", "fill", "full")):
                self.calls.append(name)
            return func(*args, **(kwargs or {}))

    if op == "p2c_attention":
        inp = make_p2c_inputs(2, 33, 17, 2, 24, requires_grad=True)
        leaves = [inp.q, inp.k, inp.v]
        out = ops.p2c_attention(*leaves, backend="cpu")
    else:
        inp = make_cluster_pool_inputs(2, 33, 17, 24, requires_grad=True)
        leaves = [inp.logits, inp.x, inp.weight, inp.bias]
        out = ops.cluster_pool(*leaves, backend="cpu")
    g = torch.randn_like(out)
    with Fills() as mode:
        torch.autograd.grad(out, leaves, g)
    assert mode.calls == [], mode.calls
