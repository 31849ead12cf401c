"""The whole-layer inference op (``paca_kernels::conv_paca_layer``, csrc/cpu/fused/conv_paca_layer.cpp: conv
clustering head, pooling with LayerNorm, q/k/v projections, attention and output projection, and
the assignment probabilities z) against the unfused math in float64, and when PaCaAttention uses it."""

from __future__ import annotations

import math
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F

import paca_kernels.ops.fused.conv_paca_layer as layer_op
from paca_kernels import PaCaAttention, _ext, testing
from paca_kernels.nn._fusion import conv_head_tensors, linear_tensors

pytestmark = pytest.mark.extension

op = torch.ops.paca_kernels.conv_paca_layer if _ext.load() else None

# (B, H, W, C, h, M, k): N = 197 (a 1 x 197 grid) with M = 49, head dims that are not powers of two
# (10, 7), 100 clusters, one head and one cluster with a 1 x 1 "depthwise" kernel, grids smaller than
# the kernel.
SHAPES = [
    (2, 5, 7, 24, 3, 10, 7),
    (1, 1, 197, 20, 2, 49, 3),
    (2, 9, 7, 21, 3, 13, 5),
    (1, 14, 14, 40, 4, 100, 7),
    (3, 4, 4, 12, 1, 1, 1),
    (1, 2, 3, 16, 2, 5, 7),
]


def _ids(s: tuple) -> str:
    return "B{}-H{}-W{}-C{}-h{}-M{}-k{}".format(*s)


class Args(NamedTuple):
    x: torch.Tensor  # (B, N, C)
    H: int
    W: int
    dw: torch.Tensor  # (C, 1, k, k)
    dw_b: torch.Tensor | None
    w1: torch.Tensor  # (C, C, 1, 1)
    b1: torch.Tensor | None
    w2: torch.Tensor  # (M, C, 1, 1)
    b2: torch.Tensor | None
    ln_w: torch.Tensor | None
    ln_b: torch.Tensor | None
    eps: float
    wq: torch.Tensor
    bq: torch.Tensor | None
    wk: torch.Tensor
    bk: torch.Tensor | None
    wv: torch.Tensor
    bv: torch.Tensor | None
    wp: torch.Tensor
    bp: torch.Tensor | None
    heads: int
    scale: float
    probs: bool


def _inputs(shape, dtype=torch.float32, bias=True, probs=True) -> Args:
    B, H, W, C, h, M, k = shape
    d = C // h

    def r(*s, std=1.0):
        return torch.randn(*s, dtype=dtype) * std

    def b(n):
        return r(n, std=0.5) if bias else None

    return Args(
        r(B, H * W, C), H, W, r(C, 1, k, k, std=1 / k), b(C), r(C, C, 1, 1, std=C ** -0.5), b(C),
        r(M, C, 1, 1, std=C ** -0.5), b(M), 1 + r(C, std=0.1) if bias else None, b(C), 1e-6,
        r(C, C, std=C ** -0.5), b(C), r(C, C, std=C ** -0.5), b(C), r(C, C, std=C ** -0.5), b(C),
        r(C, C, std=C ** -0.5), b(C), h, 1 / math.sqrt(d), probs,
    )


def _run(a: Args) -> tuple[torch.Tensor, torch.Tensor]:
    return op(*a)


def _unfused(a: Args) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's math step by step with PyTorch ops (what the op replaces)."""
    B, N, C = a.x.shape
    k = a.dw.shape[-1]
    img = a.x.transpose(1, 2).reshape(B, C, a.H, a.W)
    t = F.gelu(F.conv2d(img, a.dw, a.dw_b, padding=(k - 1) // 2, groups=C))
    t = F.gelu(F.conv2d(t, a.w1, a.b1))
    logits = F.conv2d(t, a.w2, a.b2).flatten(2)  # (B, M, N)
    z = logits.softmax(-1)
    c = F.layer_norm(z @ a.x, (C,), a.ln_w, a.ln_b, a.eps)
    h, M = a.heads, logits.shape[1]
    q = F.linear(a.x, a.wq, a.bq).view(B, N, h, -1).transpose(1, 2)
    kk = F.linear(c, a.wk, a.bk).view(B, M, h, -1).transpose(1, 2)
    v = F.linear(c, a.wv, a.bv).view(B, M, h, -1).transpose(1, 2)
    o = ((q @ kk.transpose(-1, -2)) * a.scale).softmax(-1) @ v
    out = F.linear(o.transpose(1, 2).reshape(B, N, -1), a.wp, a.bp)
    return out, (z if a.probs else logits)


def _check(out, assign, exact, a: Args, rtol, atol):
    eout, eassign = exact
    assert out.shape == eout.shape and assign.shape == eassign.shape
    assert out.dtype == assign.dtype == a.x.dtype and out.is_contiguous() and assign.is_contiguous()
    testing.assert_close(out.to(eout.dtype), eout, rtol=rtol, atol=atol, name="out")
    testing.assert_close(assign.to(eout.dtype), eassign, rtol=rtol, atol=atol, name="z" if a.probs else "logits")


@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("layout", ["contig", "strided", "nobias", "logits"])
def test_layer_op_matches_unfused_float32(shape, layout):
    a = _inputs(shape, bias=layout != "nobias", probs=layout != "logits")
    if layout == "strided":
        a = a._replace(x=testing.noncontiguous(a.x), wq=testing.noncontiguous(a.wq), w1=testing.noncontiguous(a.w1))
    with testing.poisoned_outputs():
        out, assign = _run(a)
    _check(out, assign, _unfused(testing.cast_tensors(a, torch.float64)), a, rtol=2e-5, atol=2e-5)


def test_layer_op_probabilities_are_softmax_of_its_logits():
    # z from the op's own logits to fp32 rounding, independent of the head's error.
    a = _inputs((2, 9, 7, 21, 3, 13, 5))
    _, z = _run(a)
    _, logits = _run(a._replace(probs=False))
    testing.assert_close(z, logits.double().softmax(-1).float(), rtol=1e-6, atol=1e-7, name="z")


@pytest.mark.parametrize("shape", SHAPES[:4], ids=_ids)
def test_layer_op_float64_exact(shape):
    a = _inputs(shape, dtype=torch.float64)
    out, z = _run(a)
    _check(out, z, _unfused(a), a, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_layer_op_low_precision_within_flash_attention_rule(dtype):
    a = _inputs((2, 7, 9, 24, 3, 49, 7))
    exact = _unfused(testing.cast_tensors(a, torch.float64))
    low = testing.cast_tensors(a, dtype)
    out, z = _run(low)
    ref_out, ref_z = _unfused(low)
    assert out.dtype == z.dtype == dtype
    testing.assert_low_precision_ok(out, ref_out, exact[0], name="out")
    testing.assert_low_precision_ok(z, ref_z, exact[1], name="z")


def test_layer_op_deterministic_across_thread_counts():
    a = _inputs((3, 12, 10, 24, 3, 20, 7))
    testing.assert_same_bits_across_thread_counts(lambda: _run(a))


def test_layer_op_nan_tokens_give_nan_rows_like_torch():
    a = _inputs((1, 4, 4, 16, 2, 5, 3))
    x = a.x.clone()
    x[0, 5] = math.nan
    out, z = _run(a._replace(x=x))
    ref_out, ref_z = _unfused(testing.cast_tensors(a._replace(x=x), torch.float64))
    assert torch.equal(torch.isnan(z), torch.isnan(ref_z)) and torch.isnan(z).any()
    assert torch.equal(torch.isnan(out), torch.isnan(ref_out))


def test_layer_op_errors():
    a = _inputs((2, 3, 4, 12, 2, 5, 3))
    bad = [
        ("H \\* W == N", {"H": 4}),
        ("x to have 3 dimensions", {"x": a.x[0]}),
        ("w2 of shape", {"w2": a.w2[..., 0, 0]}),
        ("w1", {"w1": a.w1[:7]}),
        ("weight of shape \\(12,\\)", {"ln_w": a.ln_w[:5]}),
        ("q_weight of shape", {"wq": a.wq[:, :11]}),
        ("proj_bias of shape", {"bp": a.bp[:3]}),
        ("num_heads > 0 dividing", {"heads": 5}),
        ("float64, float32, float16 or bfloat16", {"x": a.x.int()}),
    ]
    for msg, change in bad:
        with pytest.raises(RuntimeError, match=msg):
            _run(a._replace(**change))
    with pytest.raises(RuntimeError, match="inference-only"):
        _run(a._replace(x=a.x.clone().requires_grad_()))[0].sum().backward()


def test_layer_op_opcheck():
    a = _inputs((2, 3, 4, 12, 2, 5, 3))
    testing.opcheck_inference_only(op.default, tuple(a))


def test_layer_op_flops_equal_the_unfused_layer():
    layer = _layer(C=24, h=3, M=10)
    x = torch.randn(2, 5 * 7, 24)
    ref = _layer(C=24, h=3, M=10, backend="reference")
    ref.load_state_dict(layer.state_dict())
    testing.assert_same_flops(lambda: _layer_op_on(layer, x, 5, 7, True), lambda: ref(x, 5, 7))


# -- use by PaCaAttention --------------------------------------------------------------------------


def _layer(C=24, h=3, M=10, **kw) -> PaCaAttention:
    layer = PaCaAttention(C, h, M, **{"clustering": "conv", "backend": "cpu", **kw}).eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return layer


def _layer_op_on(layer: PaCaAttention, x: torch.Tensor, H: int, W: int, probs: bool):
    """The whole-layer op on a PaCaAttention's tensors."""
    norm = layer.cluster_norm
    return layer_op.conv_paca_layer(
        x, H, W, conv_head_tensors(layer.clustering.clustering), (norm.weight, norm.bias, norm.eps),
        linear_tensors(layer.q, layer.k, layer.v, layer.proj), layer.num_heads,
        1 / math.sqrt(layer.head_dim), probs,
    )


@pytest.fixture
def layer_calls(spy):
    """Counts PaCaAttention's calls of the whole-layer op."""
    return spy(layer_op, "conv_paca_layer")


def test_layer_results_equal_the_reference_backend(layer_calls):
    layer = _layer()
    ref = _layer()
    ref.load_state_dict(layer.state_dict())
    ref.backend = "reference"
    x = torch.randn(2, 5 * 7, 24)
    with torch.no_grad():
        out, z = layer(x, 5, 7)
        out_l, logits = layer.forward_logits(x, 5, 7)
        assert len(layer_calls) == 2
        ref_out, ref_z = ref(x, 5, 7)
        _, ref_logits = ref.forward_logits(x, 5, 7)
    testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5, name="out")
    testing.assert_close(z, ref_z, rtol=1e-5, atol=1e-6, name="z")
    testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5, name="logits")
    assert torch.equal(out_l, out)


def test_layer_uses_the_op_only_where_nothing_could_tell(layer_calls):
    layer = _layer()
    x = torch.randn(2, 4 * 6, 24)

    def used(fn=lambda: layer(x, 4, 6), grad: bool = False) -> bool:
        before = len(layer_calls)
        with torch.set_grad_enabled(grad):
            fn()
        return len(layer_calls) > before

    assert used()
    assert not used(lambda: layer(x, 4, 6, return_attn=True))  # the maps are wanted
    # A hook anywhere in the layer would be skipped (one on attn_viz asks for the maps).
    for mod in (layer.clustering.clustering[0], layer.cluster_norm, layer.q, layer.proj_drop,
                layer.attn_viz, layer):
        for register in (mod.register_forward_hook, mod.register_forward_pre_hook):
            handle = register(lambda *a: None)
            assert not used(), mod
            handle.remove()
    for register in (torch.nn.modules.module.register_module_forward_hook,
                     torch.nn.modules.module.register_module_forward_pre_hook):
        handle = register(lambda *a: None)
        assert not used()
        handle.remove()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert used()  # in bf16, as the modules would run (tests/backends/test_cpu_bf16.py)
    layer.backend = "reference"
    assert not used()
    layer.backend = "cpu"
    layer.train()
    assert used()  # training, but no dropout and no gradient: nothing could tell
    layer.proj_drop.p = 0.5
    assert not used()
    layer.proj_drop.p = 0.0
    layer.eval()
    # Gradients wanted: the modules and autograd ops run, and gradients flow.
    assert not used(lambda: layer(x, 4, 6)[0].sum().backward(), grad=True)
    assert layer.q.weight.grad is not None and layer.clustering.clustering[0].weight.grad is not None
    layer.requires_grad_(False)
    assert used(grad=True)  # frozen parameters, x without grad: nothing could tell
    assert not used(lambda: layer(x.clone().requires_grad_(), 4, 6), grad=True)
    layer.requires_grad_(True)
    # Layers the op does not compute: their own paths.
    for kw in ({"cluster_pos_embed": True}, {"clustering": "mlp"}, {"cluster_norm": False},
               {"act_cfg": {"type": "GELU", "approximate": "tanh"}}):
        other = _layer(**kw)
        assert not used(lambda other=other: other(x, 4, 6)), kw
    shared = _layer(onsite_clustering=False)
    assert not used(lambda: shared(x, 4, 6, z=torch.rand(2, 10, 24).softmax(-1)))
    # A subclass of the modules could compute something else.
    layer.q = type("MyLinear", (torch.nn.Linear,), {})(24, 24)
    assert not used()
    layer.q = torch.nn.Linear(24, 24)
    assert used()


def test_layer_with_the_op_compiles_fullgraph(layer_calls):
    layer = _layer()
    x = torch.randn(2, 5 * 6, 24)
    with torch.no_grad():
        eager = layer(x, 5, 6)
        compiled = torch.compile(lambda t: layer(t, 5, 6), fullgraph=True, backend="aot_eager")(x)
    assert layer_calls  # traced through the op
    testing.assert_close(compiled[0], eager[0], rtol=1e-6, atol=1e-6, name="out")
    testing.assert_close(compiled[1], eager[1], rtol=1e-6, atol=1e-6, name="z")



@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("grad", [False, True], ids=["inference", "grad"])
def test_hook_on_cluster_norm_runs_the_norm_module(monkeypatch, backend, grad):
    """``ops.cluster_pool`` fuses the LayerNorm as its epilogue, so a forward hook on
    ``cluster_norm`` (which it would skip) sends the pooling through the norm module instead."""
    import paca_kernels.ops as ops_mod

    monkeypatch.setattr(layer_op, "REGISTERED", False)  # the per-part path, whose pooling this is
    pools = []
    real = ops_mod.cluster_pool
    monkeypatch.setattr(ops_mod, "cluster_pool", lambda *a, **kw: pools.append(1) or real(*a, **kw))
    layer = _layer(backend=backend)
    doubled = _layer(backend=backend)
    doubled.load_state_dict(layer.state_dict())
    with torch.no_grad():
        doubled.cluster_norm.weight.mul_(2)
        doubled.cluster_norm.bias.mul_(2)
    x = torch.randn(2, 5 * 7, 24)
    with torch.set_grad_enabled(grad):
        seen = []
        handle = layer.cluster_norm.register_forward_hook(lambda m, a, out: seen.append(1) or out * 2)
        hooked, z = layer(x, 5, 7)
        assert seen == [1] and not pools  # the hook ran, on the norm module's output
        handle.remove()
        want, want_z = doubled(x, 5, 7)  # LN(c)·2 is LN with doubled weight and bias
        assert pools  # no hook: the fused pooling serves the call
    testing.assert_close(hooked, want, rtol=1e-5, atol=1e-5, name="out")
    testing.assert_close(z, want_z, rtol=1e-6, atol=1e-7, name="z")


@pytest.mark.parametrize(("x_dtype", "res_dtype"), [(torch.float32, torch.float32),
                                                    (torch.bfloat16, torch.bfloat16),
                                                    (torch.bfloat16, torch.float32)])
def test_layer_op_residual_is_added_to_the_rounded_output(x_dtype, res_dtype):
    """As p2c_attention_proj's residual (tests/ops/test_p2c_attention_proj.py): the op's out plus
    the residual as PyTorch's add gives it, in the residual's dtype; the assignment unchanged."""
    a = _inputs((2, 7, 9, 24, 2, 13, 3), x_dtype)
    B, N = a.x.shape[:2]
    res = torch.randn(B, N, 24, dtype=res_dtype)
    with torch.no_grad(), testing.poisoned_outputs():
        out, assign = op(*a, residual=res)
    with torch.no_grad():
        plain, assign0 = op(*a)
    assert out.dtype == res_dtype
    assert torch.equal(out, (res + plain).to(res_dtype)) and torch.equal(assign, assign0)
