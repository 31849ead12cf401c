"""The fused query side of a PaCa layer (``paca_kernels::p2c_attention_proj``, csrc/cpu/p2c_attention.cpp:
q projection, attention over the M clusters for all heads, output projection, one block of query rows
at a time) against the unfused math in float64, and when PaCaAttention uses it."""

from __future__ import annotations

import math
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from paca_kernels import PaCaAttention, _ext
from paca_kernels.nn import attention as attention_mod
from paca_kernels.testing import (
    assert_close,
    assert_low_precision_ok,
    assert_passes_on_baseline_isa,
    noncontiguous,
    poisoned_outputs,
)

pytestmark = pytest.mark.skipif(not _ext.load(), reason=f"C++ extension: {_ext.unavailable_reason()}")

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


def _inputs(shape, dtype=torch.float32, bias=True):
    B, N, C, h, d, M, Co = shape
    x = torch.randn(B, N, C, dtype=dtype)
    # Keys/values as views of one fused (B, M, 2, h, d) projection: strided like a real kv split.
    kv = torch.randn(B, M, 2, h, d, dtype=dtype)
    k, v = kv[:, :, 0], kv[:, :, 1]
    wq = torch.randn(h * d, C, dtype=dtype) / math.sqrt(C)
    wp = torch.randn(Co, h * d, dtype=dtype) / math.sqrt(h * d)
    bq = torch.randn(h * d, dtype=dtype) if bias else None
    bp = torch.randn(Co, dtype=dtype) if bias else None
    return x, k, v, wq, bq, wp, bp


def _unfused(x, k, v, wq, bq, wp, bp):
    """proj(softmax(q·kᵀ/√d)·v) with q = x·Wqᵀ + bq, step by step (what the kernel replaces)."""
    B, N, _ = x.shape
    h, d = k.shape[2], k.shape[3]
    q = F.linear(x, wq, bq).view(B, N, h, d)
    s = torch.einsum("bnhd,bmhd->bhnm", q, k) / math.sqrt(d)
    o = torch.einsum("bhnm,bmhd->bnhd", s.softmax(-1), v).reshape(B, N, h * d)
    return F.linear(o, wp, bp)


def _run(x, k, v, wq, bq, wp, bp):
    return op(x, k, v, wq, bq, wp, bp, 1.0 / math.sqrt(k.shape[-1]))


def _double(args):
    return [None if t is None else t.double() for t in args]


@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("layout", ["contig", "strided", "nobias"])
def test_attention_proj_matches_unfused_float32(shape, layout):
    args = list(_inputs(shape, bias=layout != "nobias"))
    if layout == "contig":
        args[1], args[2] = args[1].contiguous(), args[2].contiguous()
    elif layout == "strided":
        args[0] = noncontiguous(args[0])
    with poisoned_outputs():
        out = _run(*args)
    exact = _unfused(*_double(args))
    assert out.shape == exact.shape and out.dtype == torch.float32 and out.is_contiguous()
    assert_close(out.double(), exact, rtol=1e-5, atol=1e-5, name="out")


@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_attention_proj_float64_exact(shape):
    args = _inputs(shape, dtype=torch.float64)
    out = _run(*args)
    assert out.dtype == torch.float64
    assert_close(out, _unfused(*args), rtol=1e-12, atol=1e-12, name="out")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_attention_proj_low_precision_within_flash_attention_rule(dtype):
    args = _inputs((2, 97, 24, 3, 8, 49, 24))
    exact = _unfused(*_double(args))
    low = [t.to(dtype) for t in args]
    out = _run(*low)
    assert out.dtype == dtype
    assert_low_precision_ok(out, _unfused(*low), exact, name="out")


def test_attention_proj_deterministic_across_thread_counts():
    args = _inputs((3, 150, 24, 3, 8, 20, 24))
    prev = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(_run(*args))
    finally:
        torch.set_num_threads(prev)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_attention_proj_softmax_of_an_all_minus_inf_row_is_nan_like_torch():
    x, k, v, wq, bq, wp, bp = _inputs((1, 3, 8, 1, 8, 4, 8))
    k = torch.full_like(k, -math.inf)
    x = x.abs() + 1
    wq, bq = wq.abs(), bq.abs()  # positive q: every score is -inf
    out = _run(x, k, v, wq, bq, wp, bp)
    assert torch.isnan(out).all() and torch.isnan(_unfused(x, k, v, wq, bq, wp, bp)).all()


def test_attention_proj_errors():
    x, k, v, wq, bq, wp, bp = _inputs((2, 6, 12, 2, 4, 5, 10))
    with pytest.raises(RuntimeError, match="\\(B, N, C\\)"):
        _run(x[0], k, v, wq, bq, wp, bp)
    with pytest.raises(RuntimeError, match="k to have 4 dimensions"):
        _run(x, k[0], v, wq, bq, wp, bp)
    with pytest.raises(RuntimeError, match="batch size B"):
        _run(x, k[:1], v[:1], wq, bq, wp, bp)
    with pytest.raises(RuntimeError, match="same shape"):
        _run(x, k, v[:, :4], wq, bq, wp, bp)
    with pytest.raises(RuntimeError, match="same dtype"):
        _run(x, k.double(), v, wq, bq, wp, bp)
    with pytest.raises(RuntimeError, match="M > 0"):
        _run(x, k[:, :0], v[:, :0], wq, bq, wp, bp)
    with pytest.raises(RuntimeError, match="q_weight of shape"):
        _run(x, k, v, wq[:, :11], bq, wp, bp)
    with pytest.raises(RuntimeError, match="q_bias of shape"):
        _run(x, k, v, wq, bq[:7], wp, bp)
    with pytest.raises(RuntimeError, match="proj_weight of shape \\(out, h\\*d\\)"):
        _run(x, k, v, wq, bq, wp[:, :7], bp)
    with pytest.raises(RuntimeError, match="proj_bias of shape"):
        _run(x, k, v, wq, bq, wp, bp[:3])
    with pytest.raises(RuntimeError, match="float64, float32, float16 or bfloat16"):
        _run(x.int(), k.int(), v.int(), wq, bq, wp, bp)
    with pytest.raises(RuntimeError, match="inference-only"):
        _run(x.clone().requires_grad_(), k, v, wq, bq, wp, bp).sum().backward()


def test_attention_proj_opcheck():
    args = _inputs((2, 9, 12, 2, 4, 5, 10))
    torch.library.opcheck(
        op.default, (*args, 0.5),
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"),
    )


def test_attention_proj_flops_equal_the_unfused_ops():
    args = _inputs((2, 20, 16, 2, 8, 7, 12))
    with FlopCounterMode(display=False) as fused:
        _run(*args)
    with FlopCounterMode(display=False) as unfused:
        _unfused(*args)
    assert fused.get_total_flops() == unfused.get_total_flops() > 0


def _layer(C=24, h=3, M=10) -> PaCaAttention:
    layer = PaCaAttention(C, h, M, clustering="conv", backend="cpu").eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return layer


def test_layer_uses_fused_query_side_only_where_nothing_could_tell(monkeypatch):
    calls = []
    real = attention_mod.p2c_attention_proj
    monkeypatch.setattr(attention_mod, "p2c_attention_proj", lambda *a: calls.append(1) or real(*a))
    layer = _layer()
    H, W = 5, 7
    x = torch.randn(2, H * W, 24)
    ref_layer = _layer()
    ref_layer.load_state_dict(layer.state_dict())
    ref_layer.backend = "reference"
    with torch.no_grad():
        expected = ref_layer(x, H, W)[0]
        # Inference: fused, same result as the reference backend's modules.
        assert_close(layer(x, H, W)[0], expected, rtol=1e-5, atol=1e-5, name="out")
        assert len(calls) == 1
        # Attention maps wanted: the modules run.
        layer(x, H, W, return_attn=True)
        assert len(calls) == 1
        # A hook on q or proj would be skipped by the kernel: the modules run.
        for mod in (layer.q, layer.proj):
            hook = mod.register_forward_hook(lambda *a: None)
            layer(x, H, W)
            hook.remove()
        assert len(calls) == 1
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


def test_layer_with_fused_query_side_compiles_fullgraph():
    layer = _layer()
    x = torch.randn(2, 4 * 6, 24)
    with torch.no_grad():
        eager = layer(x, 4, 6)[0]
        compiled = torch.compile(lambda t: layer(t, 4, 6)[0], fullgraph=True, backend="aot_eager")(x)
    assert_close(compiled, eager, rtol=1e-6, atol=1e-6)


_BASELINE = textwrap.dedent(
    """
    import math
    import torch
    import torch.nn.functional as F
    import paca_kernels  # noqa: F401  (loads the extension's ops)
    torch.manual_seed(0)
    for B, N, C, h, d, M in [(2, 70, 24, 3, 7, 49), (1, 5, 16, 2, 8, 3)]:
        x = torch.randn(B, N, C).double()
        k, v = torch.randn(2, B, M, h, d).double()
        wq, bq = torch.randn(h * d, C).double() / C ** 0.5, torch.randn(h * d).double()
        wp, bp = torch.randn(C, h * d).double() / (h * d) ** 0.5, torch.randn(C).double()
        out = torch.ops.paca_kernels.p2c_attention_proj(
            *(t.float() for t in (x, k, v, wq, bq, wp, bp)), 1 / math.sqrt(d)).double()
        q = F.linear(x, wq, bq).view(B, N, h, d)
        s = torch.einsum("bnhd,bmhd->bhnm", q, k) / math.sqrt(d)
        o = torch.einsum("bhnm,bmhd->bnhd", s.softmax(-1), v).reshape(B, N, h * d)
        err = (out - F.linear(o, wp, bp)).abs().max().item()
        assert err < 1e-5, err
    print("baseline ok")
    """
)


def test_attention_proj_baseline_isa():
    """The float32 kernel without AVX2 (PACA_KERNELS_CPU_ISA=baseline): plain products."""
    assert_passes_on_baseline_isa(_BASELINE)
