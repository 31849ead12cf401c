"""The fused attention of a PaCa layer (``paca_kernels::p2c_attention_proj``, csrc/cpu/fused/p2c_attention_proj.cpp:
q/k/v projections, attention over the M clusters for all heads, output projection, one block of query rows
at a time) against the unfused math in float64, and when PaCaAttention uses it."""

from __future__ import annotations

import math
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F

import paca_kernels.ops.fused.conv_paca_layer as layer_op
import paca_kernels.ops.fused.p2c_attention_proj as attention_op
from paca_kernels import PaCaAttention, _ext, testing

pytestmark = pytest.mark.extension

op = torch.ops.paca_kernels.p2c_attention_proj if _ext.load() else None

# (B, N, C, h, d, M, Co): N below, at and across the 64-row query block (5, 64, 65, 197), head dims
# that are not powers of two (10, 7, 33), widths that leave masked vector tails (h*d = 21, 30, 66;
# Co = 13), one head, one cluster, C != h*d, and the odd shape N = 197, M = 49.
SHAPES = [
    (2, 5, 16, 2, 8, 3, 16),
    (1, 64, 24, 3, 7, 49, 13),
    (2, 65, 30, 3, 10, 17, 30),
    (1, 197, 20, 2, 33, 49, 20),
    (3, 40, 12, 1, 12, 1, 12),
    (1, 130, 48, 4, 12, 100, 40),
]


def _ids(s: tuple) -> str:
    return "B{}-N{}-C{}-h{}-d{}-M{}-Co{}".format(*s)


class Args(NamedTuple):
    x: torch.Tensor  # (B, N, C)
    c: torch.Tensor  # (B, M, C)
    wq: torch.Tensor
    bq: torch.Tensor | None
    wk: torch.Tensor
    bk: torch.Tensor | None
    wv: torch.Tensor
    bv: torch.Tensor | None
    wp: torch.Tensor
    bp: torch.Tensor | None
    heads: int


def _inputs(shape, dtype=torch.float32, bias=True) -> Args:
    B, N, C, h, d, M, Co = shape

    def lin(o, i):
        return torch.randn(o, i, dtype=dtype) / math.sqrt(i), (torch.randn(o, dtype=dtype) if bias else None)

    wq, bq = lin(h * d, C)
    wk, bk = lin(h * d, C)
    wv, bv = lin(h * d, C)
    wp, bp = lin(Co, h * d)
    return Args(torch.randn(B, N, C, dtype=dtype), torch.randn(B, M, C, dtype=dtype),
                wq, bq, wk, bk, wv, bv, wp, bp, h)


def _unfused(a: Args) -> torch.Tensor:
    """proj(softmax(q·kᵀ/√d)·v) with q, k, v from their linears, step by step (what the kernel
    replaces)."""
    B, N, _ = a.x.shape
    M, h = a.c.shape[1], a.heads
    d = a.wq.shape[0] // h
    q = F.linear(a.x, a.wq, a.bq).view(B, N, h, d)
    k = F.linear(a.c, a.wk, a.bk).view(B, M, h, d)
    v = F.linear(a.c, a.wv, a.bv).view(B, M, h, d)
    s = torch.einsum("bnhd,bmhd->bhnm", q, k) / math.sqrt(d)
    o = torch.einsum("bhnm,bmhd->bnhd", s.softmax(-1), v).reshape(B, N, h * d)
    return F.linear(o, a.wp, a.bp)


def _run(a: Args) -> torch.Tensor:
    return op(*a, 1.0 / math.sqrt(a.wq.shape[0] // max(a.heads, 1)))


@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("layout", ["contig", "strided", "nobias"])
def test_attention_proj_matches_unfused_float32(shape, layout):
    a = _inputs(shape, bias=layout != "nobias")
    if layout == "strided":
        a = a._replace(x=testing.noncontiguous(a.x), c=testing.noncontiguous(a.c))
    with testing.poisoned_outputs():
        out = _run(a)
    exact = _unfused(testing.cast_tensors(a, torch.float64))
    assert out.shape == exact.shape and out.dtype == torch.float32 and out.is_contiguous()
    testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-5, name="out")


@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_attention_proj_float64_exact(shape):
    a = _inputs(shape, dtype=torch.float64)
    out = _run(a)
    assert out.dtype == torch.float64
    testing.assert_close(out, _unfused(a), rtol=1e-12, atol=1e-12, name="out")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_attention_proj_low_precision_within_flash_attention_rule(dtype):
    a = _inputs((2, 97, 24, 3, 8, 49, 24))
    exact = _unfused(testing.cast_tensors(a, torch.float64))
    low = testing.cast_tensors(a, dtype)
    out = _run(low)
    assert out.dtype == dtype
    testing.assert_low_precision_ok(out, _unfused(low), exact, name="out")


def test_attention_proj_deterministic_across_thread_counts():
    a = _inputs((3, 150, 24, 3, 8, 20, 24))
    testing.assert_same_bits_across_thread_counts(lambda: _run(a))


def test_attention_proj_scratch_buffers_carry_nothing_between_calls():
    # The kernel's temporaries are per-thread buffers reused across calls (csrc/cpu/math/scratch.h):
    # a call that fills them with NaN (NaN inputs, a bigger shape) must not leak into the next one.
    nan = _inputs((3, 150, 40, 4, 10, 60, 40))
    nan = Args(*(t.fill_(math.nan) if isinstance(t, torch.Tensor) else t for t in nan))
    assert torch.isnan(_run(nan)).all()
    for shape in SHAPES[:4]:
        a = _inputs(shape)
        exact = _unfused(testing.cast_tensors(a, torch.float64))
        testing.assert_close(_run(a).double(), exact, rtol=1e-5, atol=1e-5, name=f"out after a NaN call, {_ids(shape)}")


def test_attention_proj_beyond_the_scratch_cap():
    # Keys and values of B*M*h*d = 8*512*1056 floats (17 MB): above kScratchMaxBytes (16 MiB), so
    # allocated for the call rather than kept by the thread; same results.
    a = _inputs((8, 5, 8, 8, 132, 512, 8))
    exact = _unfused(testing.cast_tensors(a, torch.float64))
    testing.assert_close(_run(a).double(), exact, rtol=1e-5, atol=1e-5, name="out")


def test_attention_proj_softmax_of_an_all_minus_inf_row_is_nan_like_torch():
    a = _inputs((1, 3, 8, 1, 8, 4, 8))
    # Positive q and keys of -inf: every score is -inf.
    a = a._replace(x=a.x.abs() + 1, wq=a.wq.abs(), bq=a.bq.abs(), bk=torch.full_like(a.bk, -math.inf))
    out = _run(a)
    assert torch.isnan(out).all() and torch.isnan(_unfused(a)).all()


def test_attention_proj_errors():
    a = _inputs((2, 6, 12, 2, 4, 5, 10))
    bad = [
        ("\\(B, N, C\\)", {"x": a.x[0]}),
        ("c to have 3 dimensions", {"c": a.c[0]}),
        ("batch size B of c", {"c": a.c[:1]}),
        ("channels C of c", {"c": a.c[..., :11]}),
        ("same dtype", {"c": a.c.double()}),
        ("M > 0", {"c": a.c[:, :0]}),
        ("q_weight of shape", {"wq": a.wq[:, :11]}),
        ("q_bias of shape", {"bq": a.bq[:7]}),
        ("k_weight of shape", {"wk": a.wk[:7]}),
        ("v_bias of shape", {"bv": a.bv[:7]}),
        ("proj_weight of shape \\(out, h\\*d\\)", {"wp": a.wp[:, :7]}),
        ("proj_bias of shape", {"bp": a.bp[:3]}),
        ("num_heads > 0 dividing", {"heads": 3}),
        ("num_heads > 0 dividing", {"heads": 0}),
        ("float64, float32, float16 or bfloat16", {"x": a.x.int(), "c": a.c.int()}),
    ]
    for msg, change in bad:
        with pytest.raises(RuntimeError, match=msg):
            _run(a._replace(**change))
    with pytest.raises(RuntimeError, match="inference-only"):
        _run(a._replace(x=a.x.clone().requires_grad_())).sum().backward()


def test_attention_proj_opcheck():
    a = _inputs((2, 9, 12, 2, 4, 5, 10))
    testing.opcheck_inference_only(op.default, (*a, 0.5))


def test_attention_proj_flops_equal_the_unfused_ops():
    a = _inputs((2, 20, 16, 2, 8, 7, 12))
    testing.assert_same_flops(lambda: _run(a), lambda: _unfused(a))


def _layer(C=24, h=3, M=10) -> PaCaAttention:
    layer = PaCaAttention(C, h, M, clustering="conv", backend="cpu").eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return layer


def test_layer_uses_fused_query_side_only_where_nothing_could_tell(monkeypatch, spy):
    # The per-part path (test_conv_paca_layer covers the whole-layer op, which takes precedence
    # where it applies; the layer falls back to this one e.g. with a cluster position embedding).
    monkeypatch.setattr(layer_op, "REGISTERED", False)
    calls = spy(attention_op, "p2c_attention_proj")
    layer = _layer()
    H, W = 5, 7
    x = torch.randn(2, H * W, 24)
    ref_layer = _layer()
    ref_layer.load_state_dict(layer.state_dict())
    ref_layer.backend = "reference"
    with torch.no_grad():
        expected = ref_layer(x, H, W)[0]
        # Inference: fused, same result as the reference backend's modules.
        testing.assert_close(layer(x, H, W)[0], expected, rtol=1e-5, atol=1e-5, name="out")
        assert len(calls) == 1
        # Attention maps wanted: the modules run.
        layer(x, H, W, return_attn=True)
        assert len(calls) == 1
        # A hook on a projection would be skipped by the kernel: the modules run.
        for mod in (layer.q, layer.k, layer.v, layer.proj):
            hook = mod.register_forward_hook(lambda *a: None)
            layer(x, H, W)
            hook.remove()
        assert len(calls) == 1
        # So would a global hook (it fires for every module call): the modules run, and it sees q.
        seen = []
        hook = torch.nn.modules.module.register_module_forward_hook(
            lambda mod, args, out: seen.append(mod)
        )
        layer(x, H, W)
        hook.remove()
        assert len(calls) == 1 and any(m is layer.q for m in seen)
        # Training with active dropout: the modules run.
        layer.proj_drop.p = 0.5
        layer.train()
        layer(x, H, W)
        assert len(calls) == 1
        layer.proj_drop.p = 0.0
        layer(x, H, W)  # training, but p = 0 and no gradient: nothing could tell
        assert len(calls) == 2
        layer.eval()
        # Another backend: its own ops.
        layer.backend = "reference"
        layer(x, H, W)
        assert len(calls) == 2
        layer.backend = "cpu"
    # Gradients wanted: the modules (and p2c_attention's autograd) run, gradients flow.
    out = layer(x, H, W)[0]
    out.sum().backward()
    assert len(calls) == 2 and layer.q.weight.grad is not None and layer.proj.weight.grad is not None


def test_layer_with_fused_query_side_compiles_fullgraph(monkeypatch):
    monkeypatch.setattr(layer_op, "REGISTERED", False)  # the per-part path
    layer = _layer()
    x = torch.randn(2, 4 * 6, 24)
    with torch.no_grad():
        eager = layer(x, 4, 6)[0]
        compiled = torch.compile(lambda t: layer(t, 4, 6)[0], fullgraph=True, backend="aot_eager")(x)
    testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_without_clusters_runs_self_attention_fused_in_inference(spy, dtype):
    # M = 0 (PaCa-ViT's last stage): self-attention over the patches, as p2c_attention_proj with
    # the patches as the keys (c = x), wherever the per-cluster layers take the op; N = 35 keys
    # (not a multiple of the kernel's blocks), 3 heads of 8 (the shape check in test_models covers
    # the real stage: N = 49, 12 heads of 32).
    calls = spy(attention_op, "p2c_attention_proj")
    torch.manual_seed(0)
    layer = PaCaAttention(24, 3, 0, backend="cpu").eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ref_layer = PaCaAttention(24, 3, 0, backend="reference").eval()
    ref_layer.load_state_dict(layer.state_dict())
    x = torch.randn(2, 5 * 7, 24)
    layer.to(dtype)
    with torch.no_grad():
        out, z = layer(x.to(dtype), 5, 7)
        assert z is None and len(calls) == 1 and calls[0] == (2, 35, 24)
        exact = ref_layer.double()(x.double(), 5, 7)[0]
        if dtype == torch.float32:
            testing.assert_close(out, exact.float(), rtol=1e-5, atol=1e-5, name="out")
        else:
            # FlashAttention's rule against the modules run in bf16.
            ref_bf16 = PaCaAttention(24, 3, 0, backend="reference").eval()
            ref_bf16.load_state_dict(ref_layer.state_dict())
            low = ref_bf16.to(dtype)(x.to(dtype), 5, 7)[0]
            err, ref_err = (out.double() - exact).abs().max(), (low.double() - exact).abs().max()
            assert err <= 2 * ref_err, (err, ref_err)
        # Maps wanted, a hook on a projection, or another backend: the modules run.
        layer(x.to(dtype), 5, 7, return_attn=True)
        hook = layer.v.register_forward_hook(lambda *a: None)
        layer(x.to(dtype), 5, 7)
        hook.remove()
        layer.backend = "reference"
        layer(x.to(dtype), 5, 7)
        assert len(calls) == 1
    # Gradients wanted: the modules, and gradients flow.
    layer.backend = "cpu"
    layer.float()
    layer(x, 5, 7)[0].sum().backward()
    assert len(calls) == 1 and layer.q.weight.grad is not None


# -- the residual epilogue (a pre-norm block's x + attn(norm(x))) ----------------------------------


@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[3], SHAPES[5]], ids=_ids)
@pytest.mark.parametrize(("x_dtype", "res_dtype"), [(torch.float32, torch.float32),
                                                    (torch.bfloat16, torch.bfloat16),
                                                    (torch.bfloat16, torch.float32),
                                                    (torch.float16, torch.float32),
                                                    (torch.float64, torch.float64)])
def test_residual_is_added_to_the_rounded_output(shape, x_dtype, res_dtype):
    """out = residual + (the op's output in x's dtype), summed in the accumulation dtype, stored in
    the residual's dtype: the bits of the op without the residual followed by the PyTorch add the
    block would make (any strides of the residual)."""
    a = _inputs(shape, x_dtype)
    B, N = a.x.shape[:2]
    Co = a.wp.shape[0]
    res = torch.randn(B, Co, N, dtype=res_dtype).transpose(1, 2)  # strided
    with torch.no_grad(), testing.poisoned_outputs():
        got = attention_op.p2c_attention_proj(*a[:-1], a.heads, 0.3, res)
    with torch.no_grad():
        plain = attention_op.p2c_attention_proj(*a[:-1], a.heads, 0.3)
    want = res + plain  # PyTorch promotes: bf16 + float32 -> float32, summed exactly as the kernel
    assert got.dtype == res_dtype and got.is_contiguous()
    assert torch.equal(got, want.to(res_dtype))


def test_residual_errors():
    a = _inputs(SHAPES[0])
    B, N = a.x.shape[:2]
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="expected residual of x's dtype"):
            attention_op.p2c_attention_proj(*a[:-1], a.heads, 0.3, torch.randn(B, N, 16).bfloat16())
        with pytest.raises(RuntimeError, match="expected residual of shape \\(B, N, out\\)"):
            attention_op.p2c_attention_proj(*a[:-1], a.heads, 0.3, torch.randn(B, N, 15))
