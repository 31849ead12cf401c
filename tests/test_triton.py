"""Triton kernels (paca_kernels.triton, ops/_triton.py) against the reference.

Without a GPU these run in Triton's CPU interpreter (conftest sets TRITON_INTERPRET=1), where each
program instance costs ~1 ms: shapes are small, and every case checks the forward and every gradient.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from paca_kernels import ops, reference
from paca_kernels.testing import (
    assert_close,
    assert_low_precision_ok,
    make_cluster_pool_inputs,
    make_p2c_inputs,
    poisoned_outputs,
    shape_id,
)
from paca_kernels.triton import TRITON_AVAILABLE, TRITON_UNAVAILABLE_REASON

if not TRITON_AVAILABLE:
    pytest.skip(f"Triton kernels: {TRITON_UNAVAILABLE_REASON}", allow_module_level=True)

from paca_kernels.ops.backends.triton import BACKEND as TRITON_BACKEND
from paca_kernels.ops.cluster_pool import cluster_pool_triton
from paca_kernels.ops.p2c_attention import p2c_attention_triton
from paca_kernels.triton.cluster_pool import cluster_pool_bwd, cluster_pool_fwd
from paca_kernels.triton.p2c_attention import p2c_attention_bwd, p2c_attention_fwd

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
P2C = torch.ops.paca_kernels.p2c_attention_fwd_triton
P2C_BWD = torch.ops.paca_kernels.p2c_attention_bwd_triton
POOL = torch.ops.paca_kernels.cluster_pool_fwd_triton
POOL_BWD = torch.ops.paca_kernels.cluster_pool_bwd_triton

# fp32 tolerances from the max errors measured against float64 on the shapes below (forward ≤ 3.1e-6,
# gradients ≤ 6.1e-6: dbias/dweight sum B·M rows, dk/dv sum N = 197 queries), with ~3-5× headroom.
FWD_TOL = {"rtol": 1e-5, "atol": 1e-5}
BWD_TOL = {"rtol": 3e-5, "atol": 3e-5}


@pytest.fixture
def triton_backend():
    """The "triton" backend registered in paca_kernels.ops for the test (removed again afterwards)."""
    from paca_kernels.ops import dispatch as _backends

    had = _backends._REGISTRY.get("triton")
    ops.register_backend(TRITON_BACKEND)
    yield
    if had is None:
        _backends._REGISTRY.pop("triton", None)
    else:
        ops.register_backend(had)


def _clone(tensors):
    return [t.detach().clone().requires_grad_(True) if t is not None else None for t in tensors]


def _grads(fn, inputs, grad_out):
    out = fn(*inputs)
    used = [t for t in inputs if t is not None]
    return out, torch.autograd.grad(out, used, grad_out)


# -- p2c_attention ----------------------------------------------------------------------------------

# (B, N, M, h, d, contiguous): every N in {1, 7, 197}, M in {1, 3, 49, 100}, d in {8, 24, 40, 48, 64},
# B in {1, 2, 3}, plus the limits M = 256, d = 128 and non-power-of-two N/M around one tile.
P2C_SHAPES = [
    (1, 1, 1, 1, 8, True),
    (2, 7, 3, 2, 24, True),
    (2, 197, 49, 3, 24, False),
    (3, 7, 100, 1, 40, True),
    (1, 197, 100, 2, 48, False),
    (2, 1, 49, 2, 64, False),
    (3, 197, 3, 1, 64, True),
    (1, 7, 256, 1, 128, False),
    (1, 33, 17, 2, 8, True),
    (2, 7, 1, 1, 40, False),
]


def _p2c_id(s):
    b, n, m, h, d, contiguous = s
    return shape_id(B=b, N=n, M=m, H=h, D=d) + ("" if contiguous else "-strided") + "-fp32"


@pytest.mark.parametrize("shape", P2C_SHAPES, ids=[_p2c_id(s) for s in P2C_SHAPES])
def test_p2c_matches_reference(shape):
    b, n, m, h, d, contiguous = shape
    inp = make_p2c_inputs(b, n, m, h, d, device=DEVICE, contiguous=contiguous, requires_grad=True)
    scale = d**-0.5
    grad_out = torch.randn(b, n, h, d, device=DEVICE)
    got, got_g = _grads(lambda *t: p2c_attention_triton(*t, scale), (inp.q, inp.k, inp.v), grad_out)
    want, want_g = _grads(lambda *t: reference.p2c_attention(*t, scale), _clone((inp.q, inp.k, inp.v)), grad_out)
    assert_close(got, want, **FWD_TOL)
    for name, g, w in zip(("dq", "dk", "dv"), got_g, want_g, strict=True):
        assert_close(g, w, name=name, **BWD_TOL)


def test_p2c_lse_is_logsumexp_of_scores():
    inp = make_p2c_inputs(2, 9, 5, 2, 16, device=DEVICE)
    _, lse = P2C(inp.q, inp.k, inp.v, 0.3)
    scores = torch.einsum("bnhd,bmhd->bhnm", inp.q, inp.k) * 0.3
    assert_close(lse, torch.logsumexp(scores, -1), **FWD_TOL)


def test_p2c_stride0_grad_poisoned_outputs_and_bitwise_deterministic():
    """out.sum().backward() gives a stride-0 gradient; NaN-filled empties catch unwritten outputs; with
    deterministic algorithms on, dk/dv go through the fixed-order reduction and repeat bitwise."""
    inp = make_p2c_inputs(2, 40, 20, 2, 24, device=DEVICE, requires_grad=True)
    ref = _clone((inp.q, inp.k, inp.v))
    reference.p2c_attention(*ref).sum().backward()
    results = []
    with poisoned_outputs():
        for _ in range(2):
            for t in (inp.q, inp.k, inp.v):
                t.grad = None
            out = p2c_attention_triton(inp.q, inp.k, inp.v)
            assert torch.isfinite(out).all()
            out.sum().backward()
            results.append([t.grad.clone() for t in (inp.q, inp.k, inp.v)])
    for name, g, w in zip(("dq", "dk", "dv"), results[0], (t.grad for t in ref), strict=True):
        assert_close(g, w, name=name, **BWD_TOL)
    for g0, g1 in zip(results[0], results[1], strict=True):
        assert torch.equal(g0, g1)


def test_p2c_deterministic_matches_atomics():
    inp = make_p2c_inputs(1, 197, 7, 2, 16, device=DEVICE)
    out, lse = p2c_attention_fwd(inp.q, inp.k, inp.v, 0.25)
    g = torch.randn_like(out)
    atomic = p2c_attention_bwd(g, inp.q, inp.k, inp.v, out, lse, 0.25, deterministic=False)
    det = [p2c_attention_bwd(g, inp.q, inp.k, inp.v, out, lse, 0.25, deterministic=True) for _ in range(2)]
    for a, d0, d1 in zip(atomic, *det, strict=True):
        assert_close(a, d0, **FWD_TOL)
        assert torch.equal(d0, d1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_p2c_low_precision(dtype):
    b, n, m, h, d = 2, 37, 20, 2, 40
    inp = make_p2c_inputs(b, n, m, h, d, device=DEVICE, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(b, n, h, d, device=DEVICE).to(dtype)
    got, got_g = _grads(p2c_attention_triton, (inp.q, inp.k, inp.v), grad_out)
    low, low_g = _grads(reference.p2c_attention, _clone((inp.q, inp.k, inp.v)), grad_out)
    exact_in = [t.detach().double().requires_grad_(True) for t in (inp.q, inp.k, inp.v)]
    exact, exact_g = _grads(reference.p2c_attention, exact_in, grad_out.double())
    assert got.dtype == dtype
    assert_low_precision_ok(got, low, exact)
    for name, g, lg, eg in zip(("dq", "dk", "dv"), got_g, low_g, exact_g, strict=True):
        assert g.dtype == dtype
        assert_low_precision_ok(g, lg, eg, name=name)


def test_p2c_backward_against_float64_autograd():
    """No fp64 in the kernels, so no gradcheck: compare with autograd of the float64 reference."""
    inp = make_p2c_inputs(2, 5, 3, 2, 8, device=DEVICE, requires_grad=True)
    grad_out = torch.randn(2, 5, 2, 8, device=DEVICE)
    _, got_g = _grads(p2c_attention_triton, (inp.q, inp.k, inp.v), grad_out)
    exact_in = [t.detach().double().requires_grad_(True) for t in (inp.q, inp.k, inp.v)]
    _, exact_g = _grads(reference.p2c_attention, exact_in, grad_out.double())
    for name, g, e in zip(("dq", "dk", "dv"), got_g, exact_g, strict=True):
        assert_close(g.double(), e, rtol=1e-5, atol=1e-6, name=name)


def test_p2c_large_scores_no_nan():
    inp = make_p2c_inputs(1, 7, 5, 1, 16, device=DEVICE, requires_grad=True)
    with torch.no_grad():
        inp.q.mul_(1e4)  # scaled scores q·kᵀ·d^-1/2 of order ±1e4
    out = p2c_attention_triton(inp.q, inp.k, inp.v)
    out.sum().backward()
    assert torch.isfinite(out).all()
    for t in (inp.q, inp.k, inp.v):
        assert torch.isfinite(t.grad).all()
    assert_close(out, reference.p2c_attention(inp.q, inp.k, inp.v), rtol=1e-4, atol=1e-4)


def test_p2c_opcheck():
    inp = make_p2c_inputs(2, 5, 3, 2, 8, device=DEVICE, contiguous=False, requires_grad=True)
    torch.library.opcheck(P2C, (inp.q, inp.k, inp.v, 0.35))
    out, lse = P2C(inp.q, inp.k, inp.v, 0.35)
    g = torch.randn_like(out)
    for det in (False, True):
        torch.library.opcheck(
            P2C_BWD, (g, inp.q.detach(), inp.k.detach(), inp.v.detach(), out.detach(), lse, 0.35, det)
        )


def test_p2c_compiles_fullgraph_forward_and_backward(triton_backend):
    torch._dynamo.reset()

    def f(q, k, v):
        return ops.p2c_attention(q, k, v, backend="triton").square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    a = make_p2c_inputs(2, 9, 4, 2, 16, device=DEVICE, requires_grad=True)
    b = _clone((a.q, a.k, a.v))
    compiled(a.q, a.k, a.v).backward()
    f(*b).backward()
    for s, d in zip((a.q, a.k, a.v), b, strict=True):
        assert_close(s.grad, d.grad, **FWD_TOL)


def test_p2c_flops_match_the_reference():
    inp = make_p2c_inputs(2, 9, 4, 2, 16, device=DEVICE, requires_grad=True)
    ref = _clone((inp.q, inp.k, inp.v))
    with FlopCounterMode(display=False) as fc_ref:
        reference.p2c_attention(*ref).sum().backward()
    with FlopCounterMode(display=False) as fc:
        p2c_attention_triton(inp.q, inp.k, inp.v).sum().backward()
    assert fc.get_total_flops() == fc_ref.get_total_flops() == 12 * 2 * 2 * 9 * 4 * 16


def test_p2c_backend_dispatch_and_limits(triton_backend):
    inp = make_p2c_inputs(1, 5, 3, 1, 8, device=DEVICE)
    out = ops.p2c_attention(inp.q, inp.k, inp.v, backend="triton")
    assert_close(out, reference.p2c_attention(inp.q, inp.k, inp.v), **FWD_TOL)
    big = make_p2c_inputs(1, 2, 257, 1, 8, device="meta")
    assert any("M = 257" in r for r in TRITON_BACKEND.not_supported_reasons("p2c_attention", (big.q, big.k, big.v)))
    wide = make_p2c_inputs(1, 2, 3, 1, 256, device="meta")
    reasons = TRITON_BACKEND.not_supported_reasons("p2c_attention", (wide.q, wide.k, wide.v))
    assert any("d = 256" in r for r in reasons)
    with pytest.raises(ops.BackendError, match="triton: .*float64"):
        d64 = make_p2c_inputs(1, 2, 3, 1, 8, device=DEVICE, dtype=torch.float64)
        ops.p2c_attention(d64.q, d64.k, d64.v, backend="triton")


# -- cluster_pool -----------------------------------------------------------------------------------

# (B, M, N, C, affine, contiguous, num_splits): N in {1, 7, 197}, M in {1, 3, 49, 100}, C in
# {8, 24, 40, 48, 64}, B in {1, 2, 3}; num_splits forces the split-N path (None: the heuristic).
POOL_SHAPES = [
    (1, 1, 1, 8, True, True, None),
    (2, 3, 7, 24, False, True, None),
    (2, 49, 197, 24, True, False, None),
    (3, 100, 7, 40, True, True, None),
    (1, 100, 197, 48, False, False, None),
    (2, 49, 1, 64, True, False, None),
    (3, 3, 197, 64, True, True, 2),
    (1, 17, 300, 40, True, False, 3),
    (2, 1, 197, 8, False, True, 4),
]


def _pool_id(s):
    b, m, n, c, affine, contiguous, splits = s
    sid = shape_id(B=b, M=m, N=n, C=c) + ("" if affine else "-noaffine") + ("" if contiguous else "-strided")
    return sid + (f"-split{splits}" if splits else "") + "-fp32"


@pytest.mark.parametrize("shape", POOL_SHAPES, ids=[_pool_id(s) for s in POOL_SHAPES])
def test_pool_matches_reference(shape):
    b, m, n, c, affine, contiguous, splits = shape
    inp = make_cluster_pool_inputs(
        b, m, n, c, device=DEVICE, affine=affine, contiguous=contiguous, requires_grad=True
    )
    args = (inp.logits, inp.x, inp.weight, inp.bias)
    grad_out = torch.randn(b, m, c, device=DEVICE)

    class _Fn(torch.autograd.Function):
        """The raw launchers with a forced split count, wired to the Triton backward."""

        @staticmethod
        def forward(ctx, logits, x, w, bias):
            out, pooled, lse = cluster_pool_fwd(logits, x, w, bias, 1e-6, num_splits=splits)
            ctx.save_for_backward(logits, x, w, pooled, lse)
            return out

        @staticmethod
        def backward(ctx, g):
            logits, x, w, pooled, lse = ctx.saved_tensors
            dl, dx, dw, db = cluster_pool_bwd(g, logits, x, w, pooled, lse, 1e-6)
            return dl, dx, dw if affine else None, db if affine else None

    fn = _Fn.apply if splits else (lambda *t: cluster_pool_triton(*t))
    got, got_g = _grads(fn, args, grad_out)
    want, want_g = _grads(reference.cluster_pool, _clone(args), grad_out)
    assert_close(got, want, **FWD_TOL)
    for name, g, w in zip(("dlogits", "dx", "dweight", "dbias"), got_g, want_g, strict=False):
        assert_close(g, w, name=name, **BWD_TOL)


def test_pool_saved_pooled_and_lse():
    inp = make_cluster_pool_inputs(2, 5, 30, 12, device=DEVICE)
    for splits in (1, 3):
        _, pooled, lse = cluster_pool_fwd(inp.logits, inp.x, inp.weight, inp.bias, 1e-6, num_splits=splits)
        assert_close(pooled, torch.softmax(inp.logits, -1) @ inp.x, **FWD_TOL)
        assert_close(lse, torch.logsumexp(inp.logits, -1), **FWD_TOL)


def test_pool_stride0_grad_and_poisoned_outputs():
    inp = make_cluster_pool_inputs(2, 6, 40, 24, device=DEVICE, requires_grad=True)
    args = (inp.logits, inp.x, inp.weight, inp.bias)
    ref = _clone(args)
    reference.cluster_pool(*ref).sum().backward()
    with poisoned_outputs():
        out = cluster_pool_triton(*args)
        out.sum().backward()  # stride-0 upstream gradient
    assert torch.isfinite(out).all()
    for name, t, r in zip(("dlogits", "dx", "dweight", "dbias"), args, ref, strict=True):
        assert_close(t.grad, r.grad, name=name, **BWD_TOL)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_pool_low_precision(dtype):
    b, m, n, c = 2, 10, 50, 40
    inp = make_cluster_pool_inputs(b, m, n, c, device=DEVICE, dtype=dtype, requires_grad=True)
    args = (inp.logits, inp.x, inp.weight, inp.bias)
    grad_out = torch.randn(b, m, c, device=DEVICE).to(dtype)
    got, got_g = _grads(cluster_pool_triton, args, grad_out)
    low, low_g = _grads(reference.cluster_pool, _clone(args), grad_out)
    exact_in = [t.detach().double().requires_grad_(True) for t in args]
    exact, exact_g = _grads(reference.cluster_pool, exact_in, grad_out.double())
    assert got.dtype == dtype
    assert_low_precision_ok(got, low, exact)
    for name, g, lg, eg in zip(("dlogits", "dx", "dweight", "dbias"), got_g, low_g, exact_g, strict=True):
        assert g.dtype == dtype
        assert_low_precision_ok(g, lg, eg, name=name)


def test_pool_backward_against_float64_autograd():
    inp = make_cluster_pool_inputs(2, 3, 5, 8, device=DEVICE, requires_grad=True)
    args = (inp.logits, inp.x, inp.weight, inp.bias)
    grad_out = torch.randn(2, 3, 8, device=DEVICE)
    _, got_g = _grads(cluster_pool_triton, args, grad_out)
    exact_in = [t.detach().double().requires_grad_(True) for t in args]
    _, exact_g = _grads(reference.cluster_pool, exact_in, grad_out.double())
    for name, g, e in zip(("dlogits", "dx", "dweight", "dbias"), got_g, exact_g, strict=True):
        assert_close(g.double(), e, rtol=1e-4, atol=2e-5, name=name)


@pytest.mark.parametrize("splits", [1, 3], ids=["one-pass", "split3"])
def test_pool_extreme_logits_no_nan(splits):
    """Logits of ±1e4, and a cluster that is -inf on every patch but one (split-N: on whole chunks)."""
    inp = make_cluster_pool_inputs(1, 4, 40, 16, device=DEVICE, requires_grad=True)
    with torch.no_grad():
        inp.logits.copy_(torch.sign(inp.logits) * 1e4 + inp.logits)
        inp.logits[0, 1] = -math.inf
        inp.logits[0, 1, 37] = 0.5
    args = (inp.logits, inp.x, inp.weight, inp.bias)
    out, pooled, lse = cluster_pool_fwd(*args, 1e-6, num_splits=splits)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert_close(out, reference.cluster_pool(*args), rtol=1e-4, atol=1e-4)
    assert_close(pooled[0, 1], inp.x[0, 37], **FWD_TOL)  # all the weight on patch 37
    cluster_pool_triton(*args).sum().backward()
    for t in args:
        assert torch.isfinite(t.grad).all()


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
def test_pool_opcheck(affine):
    inp = make_cluster_pool_inputs(2, 3, 7, 8, device=DEVICE, affine=affine, contiguous=False, requires_grad=True)
    torch.library.opcheck(POOL, (inp.logits, inp.x, inp.weight, inp.bias, 1e-6))
    out, pooled, lse = POOL(inp.logits, inp.x, inp.weight, inp.bias, 1e-6)
    g = torch.randn_like(out)
    w = inp.weight.detach() if affine else None
    torch.library.opcheck(POOL_BWD, (g, inp.logits.detach(), inp.x.detach(), w, pooled, lse, 1e-6))


def test_pool_compiles_fullgraph_forward_and_backward(triton_backend):
    torch._dynamo.reset()

    def f(logits, x, w, b):
        return ops.cluster_pool(logits, x, w, b, backend="triton").square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    a = make_cluster_pool_inputs(2, 4, 10, 16, device=DEVICE, requires_grad=True)
    args = (a.logits, a.x, a.weight, a.bias)
    b = _clone(args)
    compiled(*args).backward()
    f(*b).backward()
    for s, d in zip(args, b, strict=True):
        assert_close(s.grad, d.grad, **FWD_TOL)


def test_pool_flops_match_the_reference():
    inp = make_cluster_pool_inputs(2, 4, 10, 16, device=DEVICE, affine=False, requires_grad=True)
    ref = _clone((inp.logits, inp.x))
    with FlopCounterMode(display=False) as fc_ref:
        torch.bmm(torch.softmax(ref[0], -1), ref[1]).sum().backward()  # the unfused bmm alone
    with FlopCounterMode(display=False) as fc:
        cluster_pool_triton(inp.logits, inp.x).sum().backward()
    assert fc.get_total_flops() == fc_ref.get_total_flops() == 6 * 2 * 4 * 10 * 16


def test_pool_backend_dispatch_and_limits(triton_backend):
    inp = make_cluster_pool_inputs(1, 3, 5, 8, device=DEVICE)
    out = ops.cluster_pool(inp.logits, inp.x, inp.weight, inp.bias, backend="triton")
    assert_close(out, reference.cluster_pool(inp.logits, inp.x, inp.weight, inp.bias), **FWD_TOL)
    wide = make_cluster_pool_inputs(1, 2, 3, 2048, device="meta", affine=False)
    reasons = TRITON_BACKEND.not_supported_reasons("cluster_pool", (wide.logits, wide.x))
    assert any("C = 2048" in r for r in reasons)


# -- property test ----------------------------------------------------------------------------------

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies
MAX_EXAMPLES = int(os.environ.get("PACA_KERNELS_HYPOTHESIS_MAX", "10"))


@hypothesis.settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True)
@hypothesis.given(
    b=st.integers(1, 2), n=st.integers(1, 70), m=st.integers(1, 40), h=st.integers(1, 2),
    d=st.sampled_from([8, 12, 16, 24, 40]), contiguous=st.booleans(), seed=st.integers(0, 2**16),
)  # fmt: skip
def test_property_both_ops_match_reference(b, n, m, h, d, contiguous, seed):
    torch.manual_seed(seed)
    p = make_p2c_inputs(b, n, m, h, d, device=DEVICE, contiguous=contiguous, requires_grad=True)
    g = torch.randn(b, n, h, d, device=DEVICE)
    got, got_g = _grads(p2c_attention_triton, (p.q, p.k, p.v), g)
    want, want_g = _grads(reference.p2c_attention, _clone((p.q, p.k, p.v)), g)
    assert_close(got, want, **FWD_TOL)
    for name, a, e in zip(("dq", "dk", "dv"), got_g, want_g, strict=True):
        assert_close(a, e, name=name, **BWD_TOL)

    c = h * d
    cp = make_cluster_pool_inputs(b, m, n, c, device=DEVICE, contiguous=contiguous, requires_grad=True)
    args = (cp.logits, cp.x, cp.weight, cp.bias)
    g = torch.randn(b, m, c, device=DEVICE)
    got, got_g = _grads(cluster_pool_triton, args, g)
    want, want_g = _grads(reference.cluster_pool, _clone(args), g)
    assert_close(got, want, **FWD_TOL)
    for name, a, e in zip(("dlogits", "dx", "dweight", "dbias"), got_g, want_g, strict=True):
        assert_close(a, e, name=name, **BWD_TOL)


# -- the GPU compiler accepts the kernels (no GPU needed) ---------------------------------------------

# Run in a fresh interpreter without TRITON_INTERPRET: in this process the kernels are interpreted
# functions, and the interpreter accepts code (tl.dot shapes < 16, non-power-of-two blocks) that the
# GPU compiler rejects. Ahead-of-time compilation for sm_90 runs Triton's whole pipeline down to ptxas.
_AOT_SCRIPT = r"""
import inspect, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import ASTSource
from paca_kernels.triton import cluster_pool as cp, p2c_attention as p2c

FP32_PTRS = {"lse_ptr", "part_m_ptr", "part_l_ptr", "part_acc_ptr", "dk_ptr", "dv_ptr", "pooled_ptr",
             "dp_ptr", "rowdot_ptr"}

def check(kernel, dtype, consts, num_warps):
    names = list(inspect.signature(kernel.fn).parameters)
    sig = {}
    for n in names:
        if n in consts:
            sig[n] = "constexpr"
        elif n.endswith("_ptr"):
            sig[n] = "*fp32" if n in FP32_PTRS else "*" + dtype
        elif n in ("scale", "eps"):
            sig[n] = "fp32"
        else:
            sig[n] = "i64" if n.startswith("s") else "i32"
    try:
        src = ASTSource(kernel, sig, constexprs={(names.index(k),): v for k, v in consts.items()})
    except TypeError as exc:  # another Triton's AOT API: nothing to conclude
        print("SKIP", exc)
        sys.exit(0)
    triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    print("ok", kernel.fn.__name__, dtype, consts)

check(p2c._p2c_fwd_kernel, "bf16", dict(BLOCK_N=64, BLOCK_M=64, BLOCK_D=64, FP32=False), 4)
check(p2c._p2c_bwd_kernel, "fp32", dict(BLOCK_N=16, BLOCK_M=256, BLOCK_D=128, FP32=True, DETERMINISTIC=False), 8)
check(p2c._p2c_bwd_kernel, "bf16", dict(BLOCK_N=32, BLOCK_M=64, BLOCK_D=32, FP32=False, DETERMINISTIC=True), 4)
check(cp._cluster_pool_fwd_kernel, "fp16",
      dict(HAS_W=True, HAS_B=True, SPLIT=False, BLOCK_M=32, BLOCK_K=64, BLOCK_C=128, FP32=False), 4)
check(cp._cluster_pool_fwd_kernel, "fp32",
      dict(HAS_W=False, HAS_B=False, SPLIT=True, BLOCK_M=16, BLOCK_K=32, BLOCK_C=512, FP32=True), 8)
check(cp._cluster_pool_bwd_kernel, "bf16", dict(BLOCK_M=16, BLOCK_K=32, BLOCK_C=256, FP32=False), 8)
print("ALL OK")
"""


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the other tests compile the kernels")
def test_kernels_compile_for_sm90():
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", _AOT_SCRIPT], env=env, capture_output=True, text=True, timeout=600, check=False
    )
    if "SKIP" in proc.stdout:
        pytest.skip(f"this Triton's ahead-of-time compile API differs: {proc.stdout.strip()}")
    assert proc.returncode == 0 and "ALL OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-5000:]


def test_ops_export_keeps_the_triton_ops():
    class Core(torch.nn.Module):
        def forward(self, logits, x, q):
            z = ops.cluster_pool(logits, x, backend="triton")
            kv = z.view(z.shape[0], z.shape[1], 2, -1)
            return ops.p2c_attention(q, kv, kv, backend="triton")

    inp = make_cluster_pool_inputs(1, 3, 6, 32, affine=False, device=DEVICE)
    q = torch.randn(1, 6, 2, 16, device=DEVICE)
    ep = torch.export.export(Core(), (inp.logits, inp.x, q))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert "paca_kernels.cluster_pool_fwd_triton.default" in targets
    assert "paca_kernels.p2c_attention_fwd_triton.default" in targets
    assert_close(ep.module()(inp.logits, inp.x, q), Core()(inp.logits, inp.x, q))


def test_paca_attention_module_on_triton_compiles_and_matches():
    from paca_kernels import PaCaAttention

    torch._dynamo.reset()
    layer = PaCaAttention(32, 2, 7, clustering="conv", clustering_kernel_size=3, backend="triton").to(DEVICE)
    ref = PaCaAttention(32, 2, 7, clustering="conv", clustering_kernel_size=3, backend="reference").to(DEVICE)
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(2, 15, 32, device=DEVICE)

    def step(mod, fn):
        mod.zero_grad()
        xx = x.clone().requires_grad_(True)
        out, z = fn(xx)
        (out.square().sum() + z.sum()).backward()
        return out.detach(), xx.grad, [p.grad.clone() for p in mod.parameters()]

    got = step(layer, torch.compile(lambda t: layer(t, 3, 5), fullgraph=True, backend="aot_eager"))
    want = step(ref, lambda t: ref(t, 3, 5))
    assert_close(got[0], want[0], **FWD_TOL)
    assert_close(got[1], want[1], **BWD_TOL)
    for g, w in zip(got[2], want[2], strict=True):
        assert_close(g, w, rtol=1e-4, atol=1e-4)


# -- past 2^31 elements (GPU only: ~9 GB of inputs) ---------------------------------------------------


@pytest.mark.gpu
def test_p2c_index_arithmetic_past_2_pow_31():
    h, d, m = 2, 64, 16
    n = 2**31 // (h * d) + 4099  # q and out hold more than 2^31 elements
    q = torch.randn(1, n, h, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, m, h, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, m, h, d, device="cuda", dtype=torch.bfloat16)
    out = ops.p2c_attention(q, k, v, backend="triton")
    tail = slice(n - 300, n)
    want = reference.p2c_attention(q[:, tail].float(), k.float(), v.float())
    assert_close(out[:, tail].float(), want, rtol=2e-2, atol=2e-2)
    del q, out


@pytest.mark.gpu
def test_cluster_pool_index_arithmetic_past_2_pow_31():
    m, c = 8, 64
    n = 2**31 // c + 4099  # x holds more than 2^31 elements
    x = torch.randn(1, n, c, device="cuda", dtype=torch.bfloat16)
    logits = torch.full((1, m, n), float("-inf"), device="cuda", dtype=torch.bfloat16)
    logits[..., -5:] = torch.randn(1, m, 5, device="cuda", dtype=torch.bfloat16)  # mass only at the end
    out = ops.cluster_pool(logits, x, backend="triton")
    want = reference.cluster_pool(logits[..., -5:].float(), x[:, -5:].float())
    assert_close(out.float(), want, rtol=2e-2, atol=2e-2)
