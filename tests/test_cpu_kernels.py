"""The C++ CPU kernels (csrc/cpu) against the reference: p2c_attention forward/backward and the
cluster_pool backward, through the raw ops and the ``cpu`` backend.

Covers: forward and every gradient on assorted shapes, non-contiguous inputs, stride-0 upstream
gradients, NaN-poisoned allocations, float64 gradcheck, opcheck, bf16 against FlashAttention's rule,
torch.compile (fullgraph), determinism across thread counts, extreme inputs and FLOP counts.
"""

from __future__ import annotations

import contextlib
import math
import textwrap

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from paca_kernels import _ext, ops, reference
from paca_kernels.testing import (
    assert_close,
    assert_low_precision_ok,
    assert_passes_on_cpu_isa,
    make_cluster_pool_inputs,
    make_p2c_inputs,
    poisoned_outputs,
    shape_id,
)

pytestmark = pytest.mark.skipif(not _ext.load(), reason=f"C++ extension: {_ext.unavailable_reason()}")

if _ext.load():
    from paca_kernels.ops.p2c_attention import p2c_attention_cpp


@contextlib.contextmanager
def num_threads(n: int):
    """torch's intra-op thread count set to ``n`` for the block."""
    prev = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def _twins(make, *args, **kwargs):
    """Two independent leaf copies of the same random inputs (one for the kernel, one for the oracle)."""
    a = make(*args, **kwargs)
    fields = [f for f in vars(a) if getattr(a, f) is not None]
    b = make(*args, **kwargs)
    with torch.no_grad():
        for f in fields:
            getattr(b, f).copy_(getattr(a, f))
    return a, b


# -- p2c_attention ----------------------------------------------------------------------------------

# (B, N, M, h, d)
P2C_SHAPES = [
    (1, 1, 1, 1, 8),
    (2, 7, 3, 2, 24),
    (1, 7, 49, 3, 40),
    (3, 197, 3, 2, 48),
    (2, 197, 49, 3, 24),
    (2, 197, 100, 2, 48),
    (1, 197, 100, 1, 64),
    (3, 1, 100, 2, 8),
    (2, 300, 1, 1, 40),
    (1, 600, 49, 2, 64),
]
P2C_IDS = [shape_id(B=b, N=n, M=m, H=h, D=d) for b, n, m, h, d in P2C_SHAPES]


def _p2c_grads(fn, inp, grad_out):
    out = fn(inp.q, inp.k, inp.v)
    out.backward(grad_out)
    return out.detach(), [t.grad.clone() for t in (inp.q, inp.k, inp.v)]


@pytest.mark.parametrize("contiguous", [True, False], ids=["contig", "strided"])
@pytest.mark.parametrize("shape", P2C_SHAPES, ids=P2C_IDS)
def test_p2c_forward_backward_match_reference(shape, contiguous):
    B, N, M, h, d = shape
    a, b = _twins(make_p2c_inputs, B, N, M, h, d, requires_grad=True, contiguous=contiguous)
    scale = d**-0.5
    grad_out = torch.randn(B, N, h, d)
    with poisoned_outputs():
        got, got_g = _p2c_grads(lambda q, k, v: p2c_attention_cpp(q, k, v, scale), a, grad_out)
    want, want_g = _p2c_grads(lambda q, k, v: reference.p2c_attention(q, k, v, scale), b, grad_out)
    assert_close(got, want, rtol=1e-5, atol=1e-5)
    for name, g, w in zip(("dq", "dk", "dv"), got_g, want_g, strict=True):
        assert_close(g, w, rtol=1e-4, atol=2e-5, name=name)


def test_p2c_lse_matches_logsumexp():
    p = make_p2c_inputs(2, 9, 5, 3, 16)
    _, lse = torch.ops.paca_kernels.p2c_attention_fwd(p.q, p.k, p.v, 0.3)
    scores = torch.einsum("bnhd,bmhd->bhnm", p.q, p.k) * 0.3
    assert lse.dtype == torch.float32 and lse.shape == (2, 3, 9)
    assert_close(lse, torch.logsumexp(scores, -1), rtol=1e-5, atol=1e-5, name="lse")


def test_p2c_stride0_grad_and_backend():
    a, b = _twins(make_p2c_inputs, 2, 13, 5, 2, 8, requires_grad=True)
    ops.p2c_attention(a.q, a.k, a.v, backend="cpu").sum().backward()  # expanded (stride-0) gradient
    reference.p2c_attention(b.q, b.k, b.v).sum().backward()
    for name, g, w in zip("qkv", (a.q.grad, a.k.grad, a.v.grad), (b.q.grad, b.k.grad, b.v.grad), strict=True):
        assert_close(g, w, rtol=1e-4, atol=1e-5, name=f"d{name}")


def test_p2c_float64_gradcheck():
    p = make_p2c_inputs(2, 5, 3, 2, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k, v: p2c_attention_cpp(q, k, v, 0.7), (p.q, p.k, p.v))
    s = make_p2c_inputs(1, 4, 2, 1, 3, dtype=torch.float64, requires_grad=True, contiguous=False)
    assert torch.autograd.gradcheck(lambda q, k, v: p2c_attention_cpp(q, k, v, 0.7), (s.q, s.k, s.v))


@pytest.mark.parametrize("contiguous", [True, False], ids=["contig", "strided"])
def test_p2c_opcheck(contiguous):
    p = make_p2c_inputs(2, 7, 3, 2, 8, requires_grad=True, contiguous=contiguous)
    torch.library.opcheck(torch.ops.paca_kernels.p2c_attention_fwd, (p.q, p.k, p.v, 0.35))
    out, lse = torch.ops.paca_kernels.p2c_attention_fwd(p.q.detach(), p.k.detach(), p.v.detach(), 0.35)
    g = torch.randn(2, 7, 2, 8)
    torch.library.opcheck(
        torch.ops.paca_kernels.p2c_attention_bwd,
        (g, p.q.detach(), p.k.detach(), p.v.detach(), out, lse, 0.35, True),
    )


def test_p2c_bf16_within_flash_attention_rule():
    p = make_p2c_inputs(2, 197, 49, 2, 48, dtype=torch.float64, requires_grad=True)
    args64 = (p.q, p.k, p.v)
    args16 = [t.detach().to(torch.bfloat16).requires_grad_(True) for t in args64]
    ref16 = [t.detach().to(torch.bfloat16).requires_grad_(True) for t in args64]
    g = torch.randn(2, 197, 2, 48, dtype=torch.float64)
    exact = reference.p2c_attention(*args64)
    exact.backward(g)
    got = p2c_attention_cpp(*args16, 48**-0.5)
    got.backward(g.to(torch.bfloat16))
    low = reference.p2c_attention(*ref16)
    low.backward(g.to(torch.bfloat16))
    assert got.dtype == torch.bfloat16
    assert_low_precision_ok(got, low, exact)
    for name, t, r, e in zip("qkv", args16, ref16, args64, strict=True):
        assert t.grad.dtype == torch.bfloat16
        assert_low_precision_ok(t.grad, r.grad, e.grad, name=f"d{name}")


def test_p2c_fp16_forward():
    p = make_p2c_inputs(1, 50, 7, 2, 24, dtype=torch.float64)
    exact = reference.p2c_attention(p.q, p.k, p.v)
    half = [t.half() for t in (p.q, p.k, p.v)]
    got = p2c_attention_cpp(*half, 24**-0.5)
    assert got.dtype == torch.float16
    assert_low_precision_ok(got, reference.p2c_attention(*half), exact)


def test_p2c_compiles_fullgraph_forward_and_backward():
    torch._dynamo.reset()

    def f(q, k, v):
        return ops.p2c_attention(q, k, v, backend="cpu").square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    a, b = _twins(make_p2c_inputs, 2, 11, 4, 2, 8, requires_grad=True)
    compiled(a.q, a.k, a.v).backward()
    f(b.q, b.k, b.v).backward()
    for s, d in zip((a.q, a.k, a.v), (b.q, b.k, b.v), strict=True):
        assert_close(s.grad, d.grad)


def test_p2c_backward_deterministic_across_thread_counts():
    p = make_p2c_inputs(2, 1000, 49, 2, 24)
    out, lse = torch.ops.paca_kernels.p2c_attention_fwd(p.q, p.k, p.v, 0.2)
    g = torch.randn_like(out)
    results = []
    for n in (1, 2, 1):
        with num_threads(n):
            results.append(torch.ops.paca_kernels.p2c_attention_bwd(g, p.q, p.k, p.v, out, lse, 0.2, True))
    for other in results[1:]:
        for x, y in zip(results[0], other, strict=True):
            assert torch.equal(x, y)


def test_p2c_large_scores_stay_finite():
    p = make_p2c_inputs(1, 20, 6, 2, 8, requires_grad=True)
    q = (p.q.detach() * 1e3).requires_grad_(True)  # scores of order ±1e4
    out = p2c_attention_cpp(q, p.k, p.v, 1.0)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(q.grad).all()
    assert torch.isfinite(p.k.grad).all() and torch.isfinite(p.v.grad).all()
    assert_close(out, reference.p2c_attention(q, p.k, p.v, 1.0), rtol=1e-5, atol=1e-5)


def test_p2c_flops_match_unfused():
    def count(backend: str) -> int:
        p = make_p2c_inputs(2, 12, 5, 3, 8, requires_grad=True)
        with FlopCounterMode(display=False) as fc:
            ops.p2c_attention(p.q, p.k, p.v, backend=backend).sum().backward()
        return fc.get_total_flops()

    assert count("cpu") == count("reference") == 3 * 4 * 2 * 3 * 12 * 5 * 8


# -- cluster_pool backward ------------------------------------------------------------------------

# (B, M, N, C)
POOL_SHAPES = [
    (1, 1, 1, 8),
    (2, 3, 7, 24),
    (1, 49, 197, 40),
    (3, 100, 7, 48),
    (2, 100, 197, 64),
    (2, 3, 600, 96),
    (2, 3, 1100, 20),  # more than one forward split (kSplitRows = 1024), ragged last tile
]
POOL_IDS = [shape_id(B=b, M=m, N=n, C=c) for b, m, n, c in POOL_SHAPES]


def _pool_grads(fn, inp, grad_out):
    out = fn(inp.logits, inp.x, inp.weight, inp.bias)
    out.backward(grad_out)
    grads = [t.grad.clone() if t is not None else None for t in (inp.logits, inp.x, inp.weight, inp.bias)]
    return out.detach(), grads


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("contiguous", [True, False], ids=["contig", "strided"])
@pytest.mark.parametrize("shape", POOL_SHAPES, ids=POOL_IDS)
def test_cluster_pool_forward_backward_match_reference(shape, contiguous, affine):
    B, M, N, C = shape
    kw = {"requires_grad": True, "contiguous": contiguous, "affine": affine}
    a, b = _twins(make_cluster_pool_inputs, B, M, N, C, **kw)
    grad_out = torch.randn(B, M, C)
    with poisoned_outputs():
        got, got_g = _pool_grads(lambda *t: ops.cluster_pool(*t, backend="cpu"), a, grad_out)
    want, want_g = _pool_grads(reference.cluster_pool, b, grad_out)
    assert_close(got, want, rtol=1e-5, atol=2e-5)
    for name, g, w in zip(("dlogits", "dx", "dweight", "dbias"), got_g, want_g, strict=True):
        if w is None:
            assert g is None
        else:
            assert_close(g, w, rtol=1e-4, atol=5e-5, name=name)


def test_cluster_pool_bwd_stride0_grad():
    a, b = _twins(make_cluster_pool_inputs, 2, 5, 33, 16, requires_grad=True)
    ops.cluster_pool(a.logits, a.x, a.weight, a.bias, backend="cpu").sum().backward()
    reference.cluster_pool(b.logits, b.x, b.weight, b.bias).sum().backward()
    for name in ("logits", "x", "weight", "bias"):
        assert_close(getattr(a, name).grad, getattr(b, name).grad, rtol=1e-4, atol=5e-5, name=f"d{name}")


def test_cluster_pool_float64_gradcheck_strided():
    inp = make_cluster_pool_inputs(2, 3, 6, 5, dtype=torch.float64, requires_grad=True, contiguous=False)
    assert torch.autograd.gradcheck(
        lambda a, b, w, c: ops.cluster_pool(a, b, w, c, backend="cpu"),
        (inp.logits, inp.x, inp.weight, inp.bias),
    )


def test_cluster_pool_bwd_opcheck_strided():
    inp = make_cluster_pool_inputs(2, 3, 7, 5, contiguous=False)
    pooled, lse = torch.ops.paca_kernels.cluster_pool_fwd(inp.logits, inp.x, inp.weight, inp.bias, 1e-6)[1:]
    g = torch.randn(2, 3, 5).expand(2, 3, 5)
    torch.library.opcheck(
        torch.ops.paca_kernels.cluster_pool_bwd, (g, inp.logits, inp.x, inp.weight, pooled, lse, 1e-6)
    )


def test_cluster_pool_bwd_bf16_within_flash_attention_rule():
    a = make_cluster_pool_inputs(2, 49, 197, 24, dtype=torch.float64, requires_grad=True)
    args64 = (a.logits, a.x, a.weight, a.bias)
    got_in = [t.detach().to(torch.bfloat16).requires_grad_(True) for t in args64]
    low_in = [t.detach().to(torch.bfloat16).requires_grad_(True) for t in args64]
    g = torch.randn(2, 49, 24, dtype=torch.float64)
    reference.cluster_pool(*args64).backward(g)
    ops.cluster_pool(*got_in, backend="cpu").backward(g.to(torch.bfloat16))
    reference.cluster_pool(*low_in).backward(g.to(torch.bfloat16))
    for name, t, r, e in zip(("logits", "x", "weight", "bias"), got_in, low_in, args64, strict=True):
        assert t.grad.dtype == torch.bfloat16
        # dweight/dbias sum B*M terms: allow a relative floor for bf16 rounding of large sums.
        assert_low_precision_ok(t.grad, r.grad, e.grad, floor=1e-2 * float(e.grad.abs().max()), name=f"d{name}")


def test_cluster_pool_bwd_deterministic_across_thread_counts():
    inp = make_cluster_pool_inputs(3, 49, 1000, 24)
    pooled, lse = torch.ops.paca_kernels.cluster_pool_fwd(inp.logits, inp.x, inp.weight, inp.bias, 1e-6)[1:]
    g = torch.randn(3, 49, 24)
    results = []
    for n in (1, 2, 1):
        with num_threads(n):
            results.append(
                torch.ops.paca_kernels.cluster_pool_bwd(g, inp.logits, inp.x, inp.weight, pooled, lse, 1e-6)
            )
    for other in results[1:]:
        for x, y in zip(results[0], other, strict=True):
            assert torch.equal(x, y)


def test_cluster_pool_forward_deterministic_across_thread_counts():
    inp = make_cluster_pool_inputs(1, 20, 5000, 24)
    outs = []
    for n in (1, 2):
        with num_threads(n):
            outs.append(torch.ops.paca_kernels.cluster_pool_fwd(inp.logits, inp.x, inp.weight, inp.bias, 1e-6))
    for x, y in zip(*outs, strict=True):
        assert torch.equal(x, y)


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
        assert_close(got, reference.cluster_pool(inp.logits, inp.x, inp.weight, inp.bias), rtol=1e-5, atol=2e-5)


def test_cluster_pool_extreme_logits_backward_finite():
    a, b = _twins(make_cluster_pool_inputs, 2, 4, 40, 8, requires_grad=True)
    with torch.no_grad():
        a.logits.copy_(a.logits.sign() * 1e4)
        b.logits.copy_(a.logits)
    ops.cluster_pool(a.logits, a.x, a.weight, a.bias, backend="cpu").square().sum().backward()
    reference.cluster_pool(b.logits, b.x, b.weight, b.bias).square().sum().backward()
    # The saved float32 lse is ~1e4, whose ulp is ~1e-3: S = exp(logits - lse) is recomputed with
    # ~1e-3 relative error, hence the looser tolerance (the reference's own unfused backward shares it).
    for name in ("logits", "x", "weight", "bias"):
        grad = getattr(a, name).grad
        assert torch.isfinite(grad).all()
        assert_close(grad, getattr(b, name).grad, rtol=5e-3, atol=5e-3, name=f"d{name}")


@pytest.mark.parametrize("N", [600, 2100], ids=["one-split", "three-splits"])
def test_cluster_pool_masked_prefix_and_growing_max(N):
    """Online-softmax edge cases of the forward: a row whose first tiles (and, at N = 2100, whole
    first split) are -inf, so the first finite tile rescales an accumulator that is still unwritten;
    and a row whose max grows tile after tile, so every tile rescales the running sums."""
    inp = make_cluster_pool_inputs(2, 4, N, 24)
    logits = inp.logits.clone()
    logits[0, 1, : N - 300] = float("-inf")
    logits[1, 2] = torch.linspace(-20.0, 20.0, N) + 0.1 * torch.randn(N)
    with poisoned_outputs():
        got = ops.cluster_pool(logits, inp.x, inp.weight, inp.bias, backend="cpu")
    want = reference.cluster_pool(logits, inp.x, inp.weight, inp.bias)
    assert_close(got, want, rtol=1e-5, atol=2e-5)


def test_cluster_pool_all_masked_row_is_nan_like_torch():
    inp = make_cluster_pool_inputs(1, 3, 10, 4)
    logits = inp.logits.clone()
    logits[0, 1] = float("-inf")
    out, _, lse = torch.ops.paca_kernels.cluster_pool_fwd(logits, inp.x, inp.weight, inp.bias, 1e-6)
    assert torch.isnan(out[0, 1]).all() and lse[0, 1] == float("-inf")
    assert torch.isfinite(out[0, [0, 2]]).all()


# -- the baseline (non-AVX2) float32 build -----------------------------------------------------------

_BASELINE_SCRIPT = textwrap.dedent(
    """
    import torch
    from paca_kernels import ops, reference
    from paca_kernels.testing import assert_close, make_cluster_pool_inputs, make_p2c_inputs

    torch.manual_seed(0)
    for shape in [(2, 37, 13, 2, 24), (1, 70, 100, 1, 40)]:
        a = make_p2c_inputs(*shape, requires_grad=True)
        b = make_p2c_inputs(*shape, requires_grad=True)
        with torch.no_grad():
            for s, d in zip((a.q, a.k, a.v), (b.q, b.k, b.v)):
                d.copy_(s)
        ops.p2c_attention(a.q, a.k, a.v, backend="cpu").square().sum().backward()
        reference.p2c_attention(b.q, b.k, b.v).square().sum().backward()
        for s, d in zip((a.q, a.k, a.v), (b.q, b.k, b.v)):
            assert_close(s.grad, d.grad, rtol=1e-4, atol=2e-5)
    for shape in [(2, 5, 150, 24), (1, 100, 70, 40)]:
        a = make_cluster_pool_inputs(*shape, requires_grad=True)
        b = make_cluster_pool_inputs(*shape, requires_grad=True)
        with torch.no_grad():
            for s, d in zip((a.logits, a.x, a.weight, a.bias), (b.logits, b.x, b.weight, b.bias)):
                d.copy_(s)
        out = ops.cluster_pool(a.logits, a.x, a.weight, a.bias, backend="cpu")
        ref = reference.cluster_pool(b.logits, b.x, b.weight, b.bias)
        assert_close(out, ref, rtol=1e-5, atol=2e-5)
        out.square().sum().backward()
        ref.square().sum().backward()
        for s, d in zip((a.logits, a.x, a.weight, a.bias), (b.logits, b.x, b.weight, b.bias)):
            assert_close(s.grad, d.grad, rtol=1e-4, atol=5e-5)
    print("isa ok")
    """
)


@pytest.mark.parametrize("isa", ["baseline", "avx2"])
def test_capped_isa_build_matches_reference(isa: str):
    """The float32 kernels with the build capped by PACA_KERNELS_CPU_ISA (read at first use): the
    portable one ("baseline"), and the AVX2 products where the CPU would use the AVX-512 ones."""
    assert_passes_on_cpu_isa(_BASELINE_SCRIPT, isa)


# -- the AVX-512 products against the AVX2 ones ------------------------------------------------------

# Every C++ kernel that multiplies matrices, on shapes whose columns and rows leave ragged tiles
# (C = 30: a 16-lane vector and 14 masked lanes; M = 7 and 49; 13 x 15 grids), forward and
# backward, written to the file named by argv[1].
_ISA_OUTPUTS = textwrap.dedent(
    """
    import sys
    import torch
    from paca_kernels import PaCaAttention, ops
    from paca_kernels.nn.block import Mlp
    from paca_kernels.testing import make_cluster_pool_inputs, make_p2c_inputs

    torch.manual_seed(0)
    outs = []
    with torch.no_grad():
        for C, h, M, H, W in [(96, 2, 100, 14, 14), (40, 4, 49, 13, 15), (30, 3, 7, 5, 9)]:
            layer = PaCaAttention(C, h, M, clustering="conv", backend="cpu").eval()
            outs += list(layer(torch.randn(2, H * W, C), H, W))
        for B, H, W, C in [(2, 7, 9, 24), (1, 13, 3, 30)]:
            m = Mlp(C, 3 * C + 1, with_dwconv=True, with_shortcut=True, backend="cpu").eval()
            outs.append(m(torch.randn(B, H * W, C), H, W))  # the whole-MLP kernel (small weights)
    for shape in [(2, 37, 13, 3, 24), (1, 70, 49, 2, 40)]:
        a = make_p2c_inputs(*shape, requires_grad=True)
        out = ops.p2c_attention(a.q, a.k, a.v, backend="cpu")
        out.square().sum().backward()
        outs += [out.detach(), a.q.grad, a.k.grad, a.v.grad]
    for shape in [(2, 7, 150, 30), (1, 49, 70, 40)]:
        a = make_cluster_pool_inputs(*shape, requires_grad=True)
        out = ops.cluster_pool(a.logits, a.x, a.weight, a.bias, backend="cpu")
        out.square().sum().backward()
        outs += [out.detach(), a.logits.grad, a.x.grad, a.weight.grad, a.bias.grad]
    torch.save(outs, sys.argv[1])
    print("isa ok")
    """
)


def _cpu_has_avx512f() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " avx512f" in line for line in f)
    except OSError:
        return False


@pytest.mark.skipif(not _cpu_has_avx512f(), reason="no AVX-512F: the default build is the AVX2 one")
def test_avx512_products_give_the_avx2_bits(tmp_path):
    """On an AVX-512 CPU the products run 16-lane tiles by default: every output is the same chain
    of FMAs in the same order as in the AVX2 tiles, so both builds give the same bits."""
    import os
    import subprocess
    import sys

    paths = {}
    for isa in ("default", "avx2"):
        paths[isa] = tmp_path / f"{isa}.pt"
        env = {k: v for k, v in os.environ.items() if k != "PACA_KERNELS_CPU_ISA"}
        if isa == "avx2":
            env["PACA_KERNELS_CPU_ISA"] = "avx2"
        proc = subprocess.run([sys.executable, "-c", _ISA_OUTPUTS, str(paths[isa])], env=env,
                              capture_output=True, text=True, timeout=120, check=False)
        assert proc.returncode == 0 and "isa ok" in proc.stdout, proc.stdout + proc.stderr
    default, avx2 = torch.load(paths["default"]), torch.load(paths["avx2"])
    assert len(default) == len(avx2) == 26
    for i, (a, b) in enumerate(zip(default, avx2, strict=True)):
        assert torch.isfinite(a).all(), i
        assert torch.equal(a, b), f"output {i}: max difference {(a - b).abs().max().item():.3g}"
