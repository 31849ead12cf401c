"""The CUDA C++ kernels (csrc/cuda, backend "cuda") against the reference, on a GPU.

Every test is marked ``gpu`` (skipped without a CUDA device) and also needs ``_C`` built with its CUDA
kernels. Covers: forward and every gradient on odd shapes (N=197, M=49, d=24/40/48, the limits M=256,
d=128, C=1024), non-contiguous inputs, stride-0 upstream gradients, NaN-poisoned allocations, fp16/bf16
by FlashAttention's 2x rule, the split-N pooling path and the one-pass path, extreme logits,
deterministic (bitwise) p2c backward against the atomic one, opcheck on every raw op,
torch.compile(fullgraph=True), backend dispatch, grid-stride loops past 65535 (batch, head) pairs, and
index arithmetic past 2^31 elements.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from paca_kernels import _ext, ops, reference
from paca_kernels.testing import (
    assert_close,
    assert_low_precision_ok,
    make_cluster_pool_inputs,
    make_p2c_inputs,
    poisoned_outputs,
    shape_id,
)


def _cuda_kernels_reason() -> str | None:
    """Why the CUDA kernels cannot be tested here (None when they can). Touches no CUDA context."""
    if not _ext.load():
        return f"C++ extension: {_ext.unavailable_reason()}"
    if not torch._C._dispatch_has_kernel_for_dispatch_key("paca_kernels::cluster_pool_fwd", "CUDA"):
        return "paca_kernels._C was built without CUDA kernels (CPU-only torch, or no nvcc at build time)"
    return None


_REASON = _cuda_kernels_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]

DEVICE = "cuda"
P2C = torch.ops.paca_kernels.p2c_attention_fwd
P2C_BWD = torch.ops.paca_kernels.p2c_attention_bwd
POOL = torch.ops.paca_kernels.cluster_pool_fwd
POOL_BWD = torch.ops.paca_kernels.cluster_pool_bwd

# fp32 runs fp32 FMA (no TF32): the Triton backend's tolerances (errors against float64 <= 6e-6 there).
FWD_TOL = {"rtol": 1e-5, "atol": 1e-5}
BWD_TOL = {"rtol": 3e-5, "atol": 3e-5}


def _clone(tensors):
    return [t.detach().clone().requires_grad_(True) if t is not None else None for t in tensors]


def _grads(fn, inputs, grad_out):
    out = fn(*inputs)
    used = [t for t in inputs if t is not None]
    return out, torch.autograd.grad(out, used, grad_out)


def p2c_cuda(q, k, v, scale=None):
    return ops.p2c_attention(q, k, v, scale, backend="cuda")


def pool_cuda(logits, x, weight=None, bias=None, eps=1e-6):
    return ops.cluster_pool(logits, x, weight, bias, eps, backend="cuda")


def _num_sms() -> int:
    return torch.cuda.get_device_properties(0).multi_processor_count


# -- p2c_attention ----------------------------------------------------------------------------------

# (B, N, M, h, d, contiguous): N in {1, 7, 33, 197, 300}, M in {1, 3, 17, 49, 100, 256}, d in
# {8, 24, 40, 48, 64, 128}: padding of M and d (to 16 / 4), one partial query tile, several key chunks.
P2C_SHAPES = [
    (1, 1, 1, 1, 8, True),
    (2, 7, 3, 2, 24, True),
    (2, 197, 49, 3, 24, False),
    (3, 7, 100, 1, 40, True),
    (1, 197, 100, 2, 48, False),
    (2, 197, 49, 2, 40, True),
    (2, 1, 49, 2, 64, False),
    (3, 197, 3, 1, 64, True),
    (1, 7, 256, 1, 128, False),
    (1, 300, 256, 2, 128, True),
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
    with poisoned_outputs():
        got, got_g = _grads(lambda *t: p2c_cuda(*t, scale), (inp.q, inp.k, inp.v), grad_out)
    want, want_g = _grads(lambda *t: reference.p2c_attention(*t, scale), _clone((inp.q, inp.k, inp.v)), grad_out)
    assert_close(got, want, **FWD_TOL)
    for name, g, w in zip(("dq", "dk", "dv"), got_g, want_g, strict=True):
        assert_close(g, w, name=name, **BWD_TOL)


def test_p2c_lse_is_logsumexp_of_scores():
    inp = make_p2c_inputs(2, 9, 5, 2, 16, device=DEVICE)
    _, lse = P2C(inp.q, inp.k, inp.v, 0.3)
    scores = torch.einsum("bnhd,bmhd->bhnm", inp.q, inp.k) * 0.3
    assert lse.dtype == torch.float32 and lse.shape == (2, 2, 9)
    assert_close(lse, torch.logsumexp(scores, -1), **FWD_TOL)


def test_p2c_stride0_grad_poisoned_outputs_and_bitwise_deterministic():
    """out.sum().backward() gives a stride-0 gradient; NaN-filled empties catch unwritten outputs; with
    deterministic algorithms on, dk/dv go through the fixed-order reduction and repeat bitwise."""
    inp = make_p2c_inputs(2, 200, 20, 2, 24, device=DEVICE, requires_grad=True)
    ref = _clone((inp.q, inp.k, inp.v))
    reference.p2c_attention(*ref).sum().backward()
    results = []
    with poisoned_outputs():
        for _ in range(2):
            for t in (inp.q, inp.k, inp.v):
                t.grad = None
            out = p2c_cuda(inp.q, inp.k, inp.v)
            assert torch.isfinite(out).all()
            out.sum().backward()
            results.append([t.grad.clone() for t in (inp.q, inp.k, inp.v)])
    for name, g, w in zip(("dq", "dk", "dv"), results[0], (t.grad for t in ref), strict=True):
        assert_close(g, w, name=name, **BWD_TOL)
    for g0, g1 in zip(results[0], results[1], strict=True):
        assert torch.equal(g0, g1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bh", [(1, 1), (2, 3), (64, 4)], ids=["B1H1", "B2H3", "B64H4"])
def test_p2c_deterministic_matches_atomics_bitwise_repeatable(bh, dtype):
    """Deterministic dk/dv (group partials, fixed order) against atomics, and bitwise across runs; the
    (B, h) sizes give 1, a few, and many query tiles per deterministic group."""
    b, h = bh
    inp = make_p2c_inputs(b, 1000, 49, h, 40, device=DEVICE, dtype=dtype)
    out, lse = P2C(inp.q, inp.k, inp.v, 0.25)
    g = torch.randn_like(out)
    atomic = P2C_BWD(g, inp.q, inp.k, inp.v, out, lse, 0.25, False)
    det = [P2C_BWD(g, inp.q, inp.k, inp.v, out, lse, 0.25, True) for _ in range(3)]
    tol = FWD_TOL if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    for a, d0, d1, d2 in zip(atomic, *det, strict=True):
        assert_close(d0, a, **tol)
        assert torch.equal(d0, d1) and torch.equal(d0, d2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize(
    "shape", [(2, 197, 49, 3, 24), (2, 37, 20, 2, 40), (1, 197, 100, 2, 48), (1, 70, 256, 1, 128)],
    ids=lambda s: shape_id(B=s[0], N=s[1], M=s[2], H=s[3], D=s[4]),
)
def test_p2c_low_precision(shape, dtype):
    """Tensor-core path: error against float64 <= 2x the PyTorch reference's own error in that dtype."""
    b, n, m, h, d = shape
    inp = make_p2c_inputs(b, n, m, h, d, device=DEVICE, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(b, n, h, d, device=DEVICE).to(dtype)
    got, got_g = _grads(p2c_cuda, (inp.q, inp.k, inp.v), grad_out)
    low, low_g = _grads(reference.p2c_attention, _clone((inp.q, inp.k, inp.v)), grad_out)
    exact_in = [t.detach().double().requires_grad_(True) for t in (inp.q, inp.k, inp.v)]
    exact, exact_g = _grads(reference.p2c_attention, exact_in, grad_out.double())
    assert got.dtype == dtype
    assert_low_precision_ok(got, low, exact)
    for name, g, lg, eg in zip(("dq", "dk", "dv"), got_g, low_g, exact_g, strict=True):
        assert g.dtype == dtype
        assert_low_precision_ok(g, lg, eg, name=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_p2c_opcheck(dtype):
    inp = make_p2c_inputs(2, 9, 5, 2, 16, device=DEVICE, dtype=dtype, contiguous=False, requires_grad=True)
    torch.library.opcheck(P2C, (inp.q, inp.k, inp.v, 0.25))
    out, lse = P2C(inp.q, inp.k, inp.v, 0.25)
    g = torch.randn_like(out)
    for det in (False, True):
        torch.library.opcheck(P2C_BWD, (g, inp.q.detach(), inp.k.detach(), inp.v.detach(), out, lse, 0.25, det))


def test_p2c_many_batch_heads_grid_stride():
    """B*h > 65535 (gridDim.y): the kernels loop over the rest."""
    inp = make_p2c_inputs(33000, 3, 2, 2, 8, device=DEVICE, requires_grad=True)
    grad_out = torch.randn(33000, 3, 2, 8, device=DEVICE)
    got, got_g = _grads(p2c_cuda, (inp.q, inp.k, inp.v), grad_out)
    want, want_g = _grads(reference.p2c_attention, _clone((inp.q, inp.k, inp.v)), grad_out)
    assert_close(got, want, **FWD_TOL)
    for name, g, w in zip(("dq", "dk", "dv"), got_g, want_g, strict=True):
        assert_close(g, w, name=name, **BWD_TOL)


def test_p2c_compiles_fullgraph_forward_and_backward():
    torch._dynamo.reset()

    def f(q, k, v):
        return p2c_cuda(q, k, v).square().sum()

    compiled = torch.compile(f, fullgraph=True)
    a = make_p2c_inputs(2, 50, 7, 2, 16, device=DEVICE, requires_grad=True)
    b = _clone((a.q, a.k, a.v))
    compiled(a.q, a.k, a.v).backward()
    f(*b).backward()
    for s, d in zip((a.q, a.k, a.v), b, strict=True):
        assert_close(s.grad, d.grad, **FWD_TOL)


def test_p2c_flops_match_the_reference():
    inp = make_p2c_inputs(2, 10, 4, 2, 8, device=DEVICE, requires_grad=True)
    with FlopCounterMode(display=False) as fc:
        p2c_cuda(inp.q, inp.k, inp.v).sum().backward()
    assert fc.get_total_flops() == 12 * 2 * 2 * 10 * 4 * 8  # 4·BhNMd forward + 8·BhNMd backward


def test_p2c_backend_dispatch_and_limits():
    from paca_kernels.ops.backends.cuda import BACKEND

    backend = BACKEND
    assert backend.unavailable_reason() is None
    q = torch.empty(1, 4, 1, 8, device="meta")
    big_m = torch.empty(1, 300, 1, 8, device="meta")
    reasons = backend.not_supported_reasons("p2c_attention", (q, big_m, big_m))
    assert any("M = 300" in r for r in reasons) and any("cuda" in r for r in reasons)
    inp = make_p2c_inputs(1, 5, 3, 1, 8, device=DEVICE, dtype=torch.float64)
    with pytest.raises(ops.BackendError, match="float64"):
        p2c_cuda(inp.q, inp.k, inp.v)


# -- cluster_pool -----------------------------------------------------------------------------------

# (B, M, N, C, affine, contiguous): C in {8, 24, 96, 320, 384, 512, 1000}: every tile configuration;
# B = 1 splits N across CTAs (flash-decoding merge), B = 160 fills the GPU in one pass.
POOL_SHAPES = [
    (2, 3, 5, 8, True, True),
    (1, 49, 197, 24, True, False),
    (2, 49, 197, 96, False, True),
    (1, 100, 3136, 96, True, True),
    (160, 4, 300, 24, True, False),
    (3, 17, 300, 320, True, True),
    (1, 2, 784, 384, False, False),
    (2, 100, 196, 512, True, True),
    (1, 7, 1000, 1000, True, True),
]


def _pool_id(s):
    b, m, n, c, affine, contiguous = s
    sid = shape_id(B=b, M=m, N=n, C=c) + ("" if affine else "-noaffine") + ("" if contiguous else "-strided")
    return sid + "-fp32"


def _pool_supported(c: int) -> bool:
    from paca_kernels.ops.backends.cuda import BACKEND

    x = torch.empty(1, 1, c, device=DEVICE)
    return not BACKEND.not_supported_reasons("cluster_pool", (torch.empty(1, 1, 1, device=DEVICE), x))


@pytest.mark.parametrize("shape", POOL_SHAPES, ids=[_pool_id(s) for s in POOL_SHAPES])
def test_pool_matches_reference(shape):
    b, m, n, c, affine, contiguous = shape
    if not _pool_supported(c):
        pytest.skip(f"C = {c}: this GPU has too little shared memory for the backward")
    inp = make_cluster_pool_inputs(b, m, n, c, device=DEVICE, affine=affine, contiguous=contiguous,
                                   requires_grad=True)
    args = (inp.logits, inp.x, inp.weight, inp.bias)
    grad_out = torch.randn(b, m, c, device=DEVICE)
    with poisoned_outputs():
        got, got_g = _grads(pool_cuda, args, grad_out)
    want, want_g = _grads(reference.cluster_pool, _clone(args), grad_out)
    # Sums over N (up to 3136 patches) and over B·M rows (dweight/dbias): a little more headroom.
    assert_close(got, want, rtol=2e-5, atol=2e-5)
    for name, g, w in zip(("dlogits", "dx", "dweight", "dbias"), got_g, want_g, strict=False):
        assert_close(g, w, name=name, rtol=1e-4, atol=5e-5)


@pytest.mark.parametrize("b", [1, 300], ids=["split", "one-pass"])
def test_pool_saved_pooled_and_lse(b):
    inp = make_cluster_pool_inputs(b, 5, 700, 12, device=DEVICE)
    _, pooled, lse = POOL(inp.logits, inp.x, inp.weight, inp.bias, 1e-6)
    assert pooled.dtype == lse.dtype == torch.float32
    assert_close(pooled, torch.softmax(inp.logits, -1) @ inp.x, **FWD_TOL)
    assert_close(lse, torch.logsumexp(inp.logits, -1), **FWD_TOL)


def test_pool_stride0_grad_poisoned_outputs_and_bitwise_repeatable():
    inp = make_cluster_pool_inputs(2, 6, 400, 24, device=DEVICE, requires_grad=True)
    args = (inp.logits, inp.x, inp.weight, inp.bias)
    ref = _clone(args)
    reference.cluster_pool(*ref).sum().backward()
    grads = []
    with poisoned_outputs():
        for _ in range(2):
            for t in args:
                t.grad = None
            out = pool_cuda(*args)
            out.sum().backward()  # stride-0 upstream gradient
            grads.append([t.grad.clone() for t in args])
    assert torch.isfinite(out).all()
    for name, g, r in zip(("dlogits", "dx", "dweight", "dbias"), grads[0], ref, strict=True):
        assert_close(g, r.grad, name=name, rtol=1e-4, atol=5e-5)
    for g0, g1 in zip(*grads, strict=True):
        assert torch.equal(g0, g1)  # the cluster_pool backward has no atomics


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", [(2, 10, 50, 40), (1, 49, 784, 96), (2, 100, 196, 320)],
                         ids=lambda s: shape_id(B=s[0], M=s[1], N=s[2], C=s[3]))
def test_pool_low_precision(shape, dtype):
    b, m, n, c = shape
    inp = make_cluster_pool_inputs(b, m, n, c, device=DEVICE, dtype=dtype, requires_grad=True)
    args = (inp.logits, inp.x, inp.weight, inp.bias)
    grad_out = torch.randn(b, m, c, device=DEVICE).to(dtype)
    got, got_g = _grads(pool_cuda, args, grad_out)
    low, low_g = _grads(reference.cluster_pool, _clone(args), grad_out)
    exact_in = [t.detach().double().requires_grad_(True) for t in args]
    exact, exact_g = _grads(reference.cluster_pool, exact_in, grad_out.double())
    assert got.dtype == dtype
    assert_low_precision_ok(got, low, exact)
    for name, g, lg, eg in zip(("dlogits", "dx", "dweight", "dbias"), got_g, low_g, exact_g, strict=True):
        assert g.dtype == dtype
        assert_low_precision_ok(g, lg, eg, name=name)


def test_pool_fp32_affine_with_half_inputs():
    """float32 LayerNorm parameters with bf16 activations: dweight/dbias come back float32."""
    inp = make_cluster_pool_inputs(2, 5, 60, 32, device=DEVICE, dtype=torch.bfloat16)
    w = (1 + 0.5 * torch.randn(32, device=DEVICE)).requires_grad_(True)
    bias = (0.5 * torch.randn(32, device=DEVICE)).requires_grad_(True)
    out = pool_cuda(inp.logits, inp.x, w, bias)
    out.float().square().sum().backward()
    assert w.grad.dtype == bias.grad.dtype == torch.float32
    w2, b2 = w.detach().clone().requires_grad_(True), bias.detach().clone().requires_grad_(True)
    reference.cluster_pool(inp.logits.float(), inp.x.float(), w2, b2).square().sum().backward()
    assert_close(w.grad, w2.grad, rtol=5e-2, atol=5e-2)
    assert_close(bias.grad, b2.grad, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("b", [1, 300], ids=["split", "one-pass"])
def test_pool_extreme_logits_no_nan(b):
    """Logits of ±1e4, and a cluster that is -inf on every patch but one (split-N: on whole splits)."""
    inp = make_cluster_pool_inputs(b, 4, 900, 16, device=DEVICE, requires_grad=True)
    with torch.no_grad():
        inp.logits.copy_(torch.sign(inp.logits) * 1e4 + inp.logits)
        inp.logits[:, 1] = -math.inf
        inp.logits[:, 1, 837] = 0.5
    args = (inp.logits, inp.x, inp.weight, inp.bias)
    out, pooled, lse = POOL(*args, 1e-6)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert_close(out, reference.cluster_pool(*args), rtol=1e-4, atol=1e-4)
    assert_close(pooled[:, 1], inp.x[:, 837], **FWD_TOL)  # all the weight on patch 837
    pool_cuda(*args).sum().backward()
    for t in args:
        assert torch.isfinite(t.grad).all()


def test_pool_all_inf_row_gives_nan_like_softmax():
    inp = make_cluster_pool_inputs(1, 3, 40, 8, device=DEVICE, affine=False)
    inp.logits[0, 2] = -math.inf
    out, pooled, lse = POOL(inp.logits, inp.x, None, None, 1e-6)
    assert torch.isnan(pooled[0, 2]).all() and torch.isnan(out[0, 2]).all() and lse[0, 2] == -math.inf
    assert torch.isfinite(out[0, :2]).all()


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
def test_pool_opcheck(affine):
    inp = make_cluster_pool_inputs(2, 3, 7, 8, device=DEVICE, affine=affine, contiguous=False, requires_grad=True)
    torch.library.opcheck(POOL, (inp.logits, inp.x, inp.weight, inp.bias, 1e-6))
    out, pooled, lse = POOL(inp.logits, inp.x, inp.weight, inp.bias, 1e-6)
    g = torch.randn_like(out)
    w = inp.weight.detach() if affine else None
    torch.library.opcheck(POOL_BWD, (g, inp.logits.detach(), inp.x.detach(), w, pooled, lse, 1e-6))


def test_pool_many_batches_grid_stride():
    """B > 65535 (gridDim.y): the kernels loop over the rest."""
    inp = make_cluster_pool_inputs(70000, 1, 3, 8, device=DEVICE, requires_grad=True)
    args = (inp.logits, inp.x, inp.weight, inp.bias)
    grad_out = torch.randn(70000, 1, 8, device=DEVICE)
    got, got_g = _grads(pool_cuda, args, grad_out)
    want, want_g = _grads(reference.cluster_pool, _clone(args), grad_out)
    assert_close(got, want, rtol=2e-5, atol=2e-5)
    for name, g, w in zip(("dlogits", "dx", "dweight", "dbias"), got_g, want_g, strict=True):
        assert_close(g, w, name=name, rtol=1e-4, atol=1e-4)


def test_pool_compiles_fullgraph_forward_and_backward():
    torch._dynamo.reset()

    def f(logits, x, w, b):
        return pool_cuda(logits, x, w, b).square().sum()

    compiled = torch.compile(f, fullgraph=True)
    a = make_cluster_pool_inputs(2, 4, 100, 16, device=DEVICE, requires_grad=True)
    args = (a.logits, a.x, a.weight, a.bias)
    b = _clone(args)
    compiled(*args).backward()
    f(*b).backward()
    for s, d in zip(args, b, strict=True):
        assert_close(s.grad, d.grad, rtol=1e-4, atol=1e-5)


def test_pool_backend_dispatch_and_limits():
    from paca_kernels.ops.backends.cuda import BACKEND

    inp = make_cluster_pool_inputs(1, 3, 5, 8, device=DEVICE)
    out = pool_cuda(inp.logits, inp.x, inp.weight, inp.bias)
    assert_close(out, reference.cluster_pool(inp.logits, inp.x, inp.weight, inp.bias), **FWD_TOL)
    wide = make_cluster_pool_inputs(1, 2, 3, 2048, device="meta", affine=False)
    reasons = BACKEND.not_supported_reasons("cluster_pool", (wide.logits, wide.x))
    assert any("C = 2048" in r for r in reasons)


def test_paca_attention_module_on_cuda_matches():
    from paca_kernels import PaCaAttention

    layer = PaCaAttention(96, 2, 49, clustering="conv", backend="cuda").to(DEVICE)
    ref = PaCaAttention(96, 2, 49, clustering="conv", backend="reference").to(DEVICE)
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(2, 14 * 14, 96, device=DEVICE)

    def step(mod):
        mod.zero_grad()
        xx = x.clone().requires_grad_(True)
        out, z = mod(xx, 14, 14)
        (out.square().sum() + z.sum()).backward()
        return out.detach(), xx.grad, [p.grad.clone() for p in mod.parameters()]

    got, want = step(layer), step(ref)
    assert_close(got[0], want[0], rtol=1e-4, atol=1e-4)
    assert_close(got[1], want[1], rtol=1e-4, atol=1e-4)
    for g, w in zip(got[2], want[2], strict=True):
        assert_close(g, w, rtol=1e-3, atol=1e-3)


# -- past 2^31 elements (~20 GB of GPU memory) ---------------------------------------------------------


def test_p2c_index_arithmetic_past_2_pow_31():
    h, d, m = 2, 64, 16
    n = 2**31 // (h * d) + 4099  # q, out, grad_out and dq hold more than 2^31 elements
    q = torch.randn(1, n, h, d, device=DEVICE, dtype=torch.bfloat16).requires_grad_(True)
    k = torch.randn(1, m, h, d, device=DEVICE, dtype=torch.bfloat16).requires_grad_(True)
    v = torch.randn(1, m, h, d, device=DEVICE, dtype=torch.bfloat16).requires_grad_(True)
    out = p2c_cuda(q, k, v)
    tail = slice(n - 300, n)
    qt = q.detach()[:, tail].float().requires_grad_(True)
    kt, vt = k.detach().float(), v.detach().float()
    want = reference.p2c_attention(qt, kt, vt)
    assert_close(out[:, tail].float(), want, rtol=2e-2, atol=2e-2)
    grad = torch.zeros_like(out)
    grad[:, tail] = 1.0  # only the last rows get a gradient: dq there, dk/dv from them alone
    out.backward(grad)
    want.sum().backward()
    assert_close(q.grad[:, tail].float(), qt.grad, rtol=3e-2, atol=3e-2)
    assert torch.isfinite(k.grad).all() and torch.isfinite(v.grad).all()
    del q, out, grad


def test_cluster_pool_index_arithmetic_past_2_pow_31():
    m, c = 8, 64
    n = 2**31 // c + 4099  # x and dx hold more than 2^31 elements
    x = torch.randn(1, n, c, device=DEVICE, dtype=torch.bfloat16).requires_grad_(True)
    logits = torch.full((1, m, n), float("-inf"), device=DEVICE, dtype=torch.bfloat16)
    logits[..., -5:] = torch.randn(1, m, 5, device=DEVICE, dtype=torch.bfloat16)  # mass only at the end
    logits.requires_grad_(True)
    out = pool_cuda(logits, x)
    xt = x.detach()[:, -5:].float().requires_grad_(True)
    lt = logits.detach()[..., -5:].float().requires_grad_(True)
    want = reference.cluster_pool(lt, xt)
    assert_close(out.float(), want, rtol=2e-2, atol=2e-2)
    g = torch.randn_like(out)
    out.backward(g)
    want.backward(g.float())
    assert_close(x.grad[:, -5:].float(), xt.grad, rtol=3e-2, atol=3e-2)
    assert_close(logits.grad[..., -5:].float(), lt.grad, rtol=3e-2, atol=3e-2)
    assert not x.grad[:, :-5].any()  # zero weight elsewhere
