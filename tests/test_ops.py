"""paca_kernels.ops: backend selection and its errors, and the C++ cluster_pool op as a torch.library op
(against the reference, forward and every gradient, opcheck, gradcheck, compile, export, FLOPs)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from paca_kernels import _ext, ops, reference
from paca_kernels.ops import BackendError
from paca_kernels.ops import dispatch as _backends
from paca_kernels.testing import (
    assert_close,
    assert_low_precision_ok,
    make_cluster_pool_inputs,
    make_p2c_inputs,
    poisoned_outputs,
    shape_id,
)

needs_ext = pytest.mark.skipif(not _ext.load(), reason=f"C++ extension: {_ext.unavailable_reason()}")


# -- selection --------------------------------------------------------------------------------------


def test_automatic_choice_on_cpu_is_the_cpu_backend_then_reference(monkeypatch):
    monkeypatch.delenv(ops.ENV_VAR, raising=False)
    inp = make_cluster_pool_inputs(1, 2, 3, 4)
    want = "cpu" if _ext.load() else "reference"
    assert ops.select_backend("cluster_pool", (inp.logits, inp.x), None).name == want
    # Without the extension the reference serves the call.
    monkeypatch.setattr(ops.get_backend("cpu"), "availability", lambda: "extension disabled for the test")
    assert ops.select_backend("cluster_pool", (inp.logits, inp.x), None).name == "reference"


def test_unknown_backend_lists_known_ones():
    inp = make_cluster_pool_inputs(1, 2, 3, 4)
    with pytest.raises(ValueError, match="unknown paca_kernels backend 'nope'.*reference"):
        ops.cluster_pool(inp.logits, inp.x, backend="nope")


@pytest.fixture
def pool_only_backend(monkeypatch):
    """A registered backend that serves cluster_pool only (what a partial backend looks like)."""
    backend = ops.Backend(
        name="pool-only", description="test backend", device_types=("cpu",), dtypes=(torch.float32,),
        impls={"cluster_pool": reference.cluster_pool},
    )
    monkeypatch.setitem(_backends._REGISTRY, "pool-only", backend)
    return backend


def test_explicit_backend_that_cannot_serve_lists_every_reason(pool_only_backend):
    p = make_p2c_inputs(1, 3, 2, 1, 8)
    with pytest.raises(BackendError) as info:
        ops.p2c_attention(p.q, p.k, p.v, backend="pool-only")
    msg = str(info.value)
    assert "backend='pool-only'" in msg and "p2c_attention" in msg
    assert "pool-only: has no p2c_attention implementation" in msg
    for name in ops.backend_names():
        assert f"  {name}: " in msg
    assert "reference: can serve this call" in msg
    # A float64 call: the dtype reason is listed too.
    p64 = make_p2c_inputs(1, 3, 2, 1, 8, dtype=torch.float64)
    with pytest.raises(BackendError, match="pool-only: has no p2c_attention"):
        ops.p2c_attention(p64.q, p64.k, p64.v, backend="pool-only")
    inp = make_cluster_pool_inputs(1, 2, 3, 4, dtype=torch.float64)
    with pytest.raises(BackendError, match=r"pool-only: does not support float64 \(supports float32\)"):
        ops.cluster_pool(inp.logits, inp.x, backend="pool-only")


def test_env_var_selects_and_is_strict(monkeypatch, pool_only_backend):
    p = make_p2c_inputs(1, 3, 2, 1, 8)
    monkeypatch.setenv(ops.ENV_VAR, "pool-only")
    with pytest.raises(BackendError, match=f"{ops.ENV_VAR}="):
        ops.p2c_attention(p.q, p.k, p.v)
    # A preference list falls through to the first backend that can serve the call.
    monkeypatch.setenv(ops.ENV_VAR, "pool-only,reference")
    assert_close(ops.p2c_attention(p.q, p.k, p.v), reference.p2c_attention(p.q, p.k, p.v))
    # The argument wins over the environment.
    monkeypatch.setenv(ops.ENV_VAR, "nope")
    ops.p2c_attention(p.q, p.k, p.v, backend="reference")


@needs_ext
def test_backend_for_wrong_device_explains():
    inp = make_cluster_pool_inputs(1, 2, 3, 4, device="meta")
    with pytest.raises(BackendError, match="cpu: does not run on meta"):
        ops.cluster_pool(inp.logits, inp.x, backend="cpu")


def test_backend_status_reports_every_backend():
    status = ops.backend_status()
    assert status["reference"] is None
    assert set(status) == set(ops.backend_names())
    if not _ext.load():
        assert status["cpu"] == _ext.unavailable_reason()


def test_functional_ops_default_to_the_automatic_backend(monkeypatch):
    monkeypatch.delenv(ops.ENV_VAR, raising=False)
    inp = make_cluster_pool_inputs(2, 5, 11, 6)
    auto = ops.select_backend("cluster_pool", (inp.logits, inp.x), None).name
    assert_close(  # bitwise: the default call is the automatic backend's call
        ops.cluster_pool(inp.logits, inp.x, inp.weight, inp.bias),
        ops.cluster_pool(inp.logits, inp.x, inp.weight, inp.bias, backend=auto),
        rtol=0, atol=0,
    )
    assert_close(
        ops.cluster_pool(inp.logits, inp.x, inp.weight, inp.bias),
        reference.cluster_pool(inp.logits, inp.x, inp.weight, inp.bias),
    )
    p = make_p2c_inputs(2, 7, 3, 2, 8)
    assert_close(ops.p2c_attention(p.q, p.k, p.v, 0.5), reference.p2c_attention(p.q, p.k, p.v, 0.5))


# -- bad input --------------------------------------------------------------------------------------

BAD_POOL = [
    ("rank", lambda: (torch.randn(2, 3), torch.randn(2, 3, 4)), ValueError, r"logits must have shape \(B, M, N\)"),
    ("BN", lambda: (torch.randn(2, 3, 5), torch.randn(2, 6, 4)), ValueError, "disagree on B or N"),
    ("int", lambda: (torch.randn(2, 3, 5), torch.ones(2, 5, 4, dtype=torch.int64)), TypeError, "floating"),
    ("mixed", lambda: (torch.randn(2, 3, 5), torch.randn(2, 5, 4, dtype=torch.float64)), TypeError,
     "same dtype"),
    ("device", lambda: (torch.randn(2, 3, 5), torch.randn(2, 5, 4, device="meta")), ValueError,
     "same device"),
]


@pytest.mark.parametrize(("make", "exc", "match"), [b[1:] for b in BAD_POOL], ids=[b[0] for b in BAD_POOL])
def test_cluster_pool_bad_input(make, exc, match):
    logits, x = make()
    with pytest.raises(exc, match=match):
        ops.cluster_pool(logits, x)


def test_cluster_pool_bad_affine():
    with pytest.raises(ValueError, match=r"weight must have shape \(C,\) = \(4,\)"):
        ops.cluster_pool(torch.randn(1, 2, 3), torch.randn(1, 3, 4), torch.ones(5))


def test_p2c_attention_bad_input():
    q, k = torch.randn(2, 5, 2, 8), torch.randn(2, 3, 2, 8)
    with pytest.raises(ValueError, match=r"q must have shape \(B, N, h, d\)"):
        ops.p2c_attention(q[0], k, k)
    with pytest.raises(ValueError, match="disagree on B, h or d"):
        ops.p2c_attention(q, torch.randn(2, 3, 2, 4), torch.randn(2, 3, 2, 4))
    with pytest.raises(ValueError, match="k and v must have the same shape"):
        ops.p2c_attention(q, k, torch.randn(2, 4, 2, 8))
    with pytest.raises(TypeError, match="floating"):
        ops.p2c_attention(q.int(), k, k)


# -- the C++ cluster_pool op ---------------------------------------------------------------------

CPU_SHAPES = [(1, 1, 1, 8), (2, 3, 7, 5), (2, 49, 197, 24), (3, 100, 49, 40)]
CPU_IDS = [shape_id(B=b, M=m, N=n, C=c) for b, m, n, c in CPU_SHAPES]


def _grads(fn, inp, grad_out):
    out = fn(inp.logits, inp.x, inp.weight, inp.bias)
    out.backward(grad_out)
    return out.detach(), [t.grad.clone() for t in (inp.logits, inp.x, inp.weight, inp.bias)]


@needs_ext
@pytest.mark.parametrize("contiguous", [True, False], ids=["contig", "strided"])
@pytest.mark.parametrize("shape", CPU_SHAPES, ids=CPU_IDS)
def test_cpu_cluster_pool_forward_backward_match_reference(shape, contiguous):
    B, M, N, C = shape
    kw = {"requires_grad": True, "contiguous": contiguous}
    a = make_cluster_pool_inputs(B, M, N, C, **kw)
    b = make_cluster_pool_inputs(B, M, N, C, **kw)
    with torch.no_grad():
        for src, dst in zip((a.logits, a.x, a.weight, a.bias), (b.logits, b.x, b.weight, b.bias), strict=True):
            dst.copy_(src)
    grad_out = torch.randn(B, M, C)
    with poisoned_outputs():
        got, got_g = _grads(lambda *t: ops.cluster_pool(*t, backend="cpu"), a, grad_out)
    want, want_g = _grads(reference.cluster_pool, b, grad_out)
    assert_close(got, want)
    for name, g, w in zip(("dlogits", "dx", "dweight", "dbias"), got_g, want_g, strict=True):
        assert_close(g, w, rtol=1e-4, atol=1e-4, name=name)


@needs_ext
def test_cpu_cluster_pool_stride0_grad_and_no_affine():
    inp = make_cluster_pool_inputs(2, 4, 9, 6, affine=False, requires_grad=True)
    out = ops.cluster_pool(inp.logits, inp.x, backend="cpu")
    out.sum().backward()  # the upstream gradient is an expanded (stride-0) tensor
    ref_in = make_cluster_pool_inputs(2, 4, 9, 6, affine=False, requires_grad=True)
    with torch.no_grad():
        ref_in.logits.copy_(inp.logits)
        ref_in.x.copy_(inp.x)
    reference.cluster_pool(ref_in.logits, ref_in.x).sum().backward()
    assert_close(inp.logits.grad, ref_in.logits.grad, rtol=1e-4, atol=1e-5)
    assert_close(inp.x.grad, ref_in.x.grad, rtol=1e-4, atol=1e-5)


@needs_ext
def test_cpu_cluster_pool_float64_gradcheck():
    inp = make_cluster_pool_inputs(2, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b, w, c: ops.cluster_pool(a, b, w, c, backend="cpu"),
        (inp.logits, inp.x, inp.weight, inp.bias),
    )


@needs_ext
def test_cpu_cluster_pool_bf16_within_flash_attention_rule():
    inp = make_cluster_pool_inputs(2, 49, 197, 24, dtype=torch.float64)
    args64 = (inp.logits, inp.x, inp.weight, inp.bias)
    args16 = tuple(t.to(torch.bfloat16) for t in args64)
    exact = reference.cluster_pool(*args64)
    got = ops.cluster_pool(*args16, backend="cpu")
    assert got.dtype == torch.bfloat16
    assert_low_precision_ok(got, reference.cluster_pool(*args16), exact)


@needs_ext
def test_cpu_cluster_pool_extreme_logits():
    inp = make_cluster_pool_inputs(1, 3, 16, 8)
    logits = inp.logits.sign() * 1e4
    out = ops.cluster_pool(logits, inp.x, inp.weight, inp.bias, backend="cpu")
    assert torch.isfinite(out).all()
    assert_close(out, reference.cluster_pool(logits, inp.x, inp.weight, inp.bias))
    # A cluster whose logits are -inf everywhere but one patch pools exactly that patch.
    masked = torch.full_like(inp.logits, float("-inf"))
    masked[:, :, 5] = 0.0
    out = ops.cluster_pool(masked, inp.x, inp.weight, inp.bias, backend="cpu")
    assert_close(out, reference.cluster_pool(masked, inp.x, inp.weight, inp.bias))
    assert torch.isfinite(out).all()


@needs_ext
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
def test_cpu_cluster_pool_opcheck(affine):
    inp = make_cluster_pool_inputs(2, 3, 7, 5, affine=affine, requires_grad=True)
    torch.library.opcheck(
        torch.ops.paca_kernels.cluster_pool_fwd, (inp.logits, inp.x, inp.weight, inp.bias, 1e-6)
    )
    pooled, lse = torch.ops.paca_kernels.cluster_pool_fwd(inp.logits, inp.x, inp.weight, inp.bias, 1e-6)[1:]
    g = torch.randn(2, 3, 5)
    torch.library.opcheck(
        torch.ops.paca_kernels.cluster_pool_bwd,
        (g, inp.logits.detach(), inp.x.detach(), inp.weight.detach() if affine else None, pooled, lse, 1e-6),
    )


@needs_ext
def test_cpu_cluster_pool_compiles_fullgraph_forward_and_backward():
    torch._dynamo.reset()

    def f(logits, x, w, b):
        return ops.cluster_pool(logits, x, w, b, backend="cpu").square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    a = make_cluster_pool_inputs(2, 4, 10, 6, requires_grad=True)
    b = make_cluster_pool_inputs(2, 4, 10, 6, requires_grad=True)
    with torch.no_grad():
        for s, d in zip((a.logits, a.x, a.weight, a.bias), (b.logits, b.x, b.weight, b.bias), strict=True):
            d.copy_(s)
    compiled(a.logits, a.x, a.weight, a.bias).backward()
    f(b.logits, b.x, b.weight, b.bias).backward()
    for s, d in zip((a.logits, a.x, a.weight, a.bias), (b.logits, b.x, b.weight, b.bias), strict=True):
        assert_close(s.grad, d.grad)


@needs_ext
def test_cpu_cluster_pool_export_keeps_the_op():
    class Pool(torch.nn.Module):
        def forward(self, logits, x):
            return ops.cluster_pool(logits, x, backend="cpu")

    inp = make_cluster_pool_inputs(1, 3, 5, 4, affine=False)
    ep = torch.export.export(Pool(), (inp.logits, inp.x))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert "paca_kernels.cluster_pool_fwd.default" in targets


@needs_ext
def test_cpu_cluster_pool_flops_match_unfused():
    def count(backend: str) -> int:
        inp = make_cluster_pool_inputs(2, 5, 12, 8, requires_grad=True)
        with FlopCounterMode(display=False) as fc:
            ops.cluster_pool(inp.logits, inp.x, inp.weight, inp.bias, backend=backend).sum().backward()
        return fc.get_total_flops()

    assert count("cpu") == count("reference") == 3 * 2 * 2 * 5 * 12 * 8


# -- autocast -----------------------------------------------------------------------------------------

AUTOCAST_BACKENDS = ["reference", pytest.param("cpu", marks=needs_ext)]


@pytest.mark.parametrize("backend", AUTOCAST_BACKENDS)
def test_ops_run_in_the_autocast_dtype(backend):
    inp = make_cluster_pool_inputs(2, 5, 11, 8, requires_grad=True)
    p = make_p2c_inputs(2, 9, 5, 2, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        # Mixed input dtypes, as autocast produces them (a conv's bf16 logits, fp32 LayerNorm output).
        pooled = ops.cluster_pool(inp.logits.to(torch.bfloat16), inp.x, inp.weight, inp.bias, backend=backend)
        attn = ops.p2c_attention(p.q, p.k.to(torch.bfloat16), p.v, backend=backend)
    assert pooled.dtype == torch.bfloat16 and attn.dtype == torch.bfloat16
    exact = reference.cluster_pool(*(t.detach().double() for t in (inp.logits, inp.x, inp.weight, inp.bias)))
    low = reference.cluster_pool(*(t.detach().to(torch.bfloat16) for t in (inp.logits, inp.x, inp.weight,
                                                                           inp.bias)))
    assert_low_precision_ok(pooled, low, exact)
    exact = reference.p2c_attention(*(t.detach().double() for t in (p.q, p.k, p.v)))
    low = reference.p2c_attention(*(t.detach().to(torch.bfloat16) for t in (p.q, p.k, p.v)))
    assert_low_precision_ok(attn, low, exact)
    (pooled.float().sum() + attn.float().sum()).backward()
    for t in (inp.logits, inp.x, inp.weight, inp.bias, p.q, p.k, p.v):
        assert t.grad is not None and t.grad.dtype == torch.float32 and torch.isfinite(t.grad).all()


@needs_ext
def test_autocast_compiles_fullgraph():
    torch._dynamo.reset()

    def f(q, k, v):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return ops.p2c_attention(q, k, v, backend="cpu")

    p = make_p2c_inputs(1, 7, 3, 2, 8)
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(p.q, p.k, p.v)
    assert out.dtype == torch.bfloat16
    assert_close(out, f(p.q, p.k, p.v))


@pytest.mark.parametrize("backend", AUTOCAST_BACKENDS)
def test_model_forward_under_autocast(backend):
    from paca_kernels import create_model

    model = create_model("pacavit_tiny_p2cconv_100_0", num_classes=5, backend=backend).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = model(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = model(images)
    assert torch.isfinite(got).all()
    assert float((got.float() - want).abs().max() / want.abs().max()) < 0.05


@needs_ext
def test_paper_macs_hold_with_the_fused_cpu_backend():
    from paca_kernels import create_model

    def macs(backend: str) -> int:
        model = create_model("pacavit_tiny_p2cconv_100_0", backend=backend).eval()
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            model(torch.randn(1, 3, 224, 224))
        return fc.get_total_flops() // 2

    assert macs("cpu") == macs("reference") == 3_219_262_208  # the official count (compat README)
