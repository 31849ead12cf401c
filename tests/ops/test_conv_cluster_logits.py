"""The fused convolutional clustering head (``paca_kernels::conv_cluster_logits``, csrc/cpu/fused/conv_cluster_logits.cpp)
against the module path it replaces (depthwise conv, GELU, 1×1 conv, GELU, 1×1 conv) run in float64,
and its use by PaCaAttention (inference only, the cpu backend, no hooks)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import paca_kernels.ops.fused.conv_cluster_logits as head_op
import paca_kernels.ops.fused.conv_paca_layer as layer_op
from paca_kernels import PaCaAttention, testing
from paca_kernels.nn._fusion import conv_head_tensors
from paca_kernels.nn.clustering import P2CConv2d

pytestmark = pytest.mark.extension

# (B, H, W, C, M, k): odd grids, channel counts that leave masked vector tails (24, 20, 33, 37), k = 3/5/7
# larger than the grid (halo wider than the image), one cluster, and a stage-like shape.
SHAPES = [
    (2, 7, 9, 40, 49, 7),
    (1, 5, 3, 24, 7, 7),
    (3, 11, 6, 20, 1, 3),
    (2, 14, 14, 64, 100, 7),
    (1, 1, 1, 16, 5, 5),
    (2, 9, 12, 33, 10, 5),
    (1, 8, 10, 37, 9, 7),  # k = 7 sliding tiles with a masked channel tail and an overlapping last tile
    (1, 4, 5, 264, 12, 3),  # C > 256: the 1x1 convs' reduction in two chunks (bias first, GELU last)
]


def _head(C: int, M: int, k: int, *, bias2: bool = False) -> P2CConv2d:
    head = P2CConv2d(C, M, kernel_size=k)
    if bias2:  # the official head has no bias on the last conv; the kernel supports one anyway
        head.clustering[4] = nn.Conv2d(C, M, 1, bias=True)
    with torch.no_grad():
        for p in head.parameters():  # not the default init: larger, sign-mixed values exercise GELU
            p.copy_(torch.randn_like(p) * (1.5 / p[0].numel() ** 0.5))
    return head


def conv_cluster_logits(head: P2CConv2d, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """The fused op on a P2CConv2d's tensors."""
    tensors = conv_head_tensors(head.clustering)
    assert tensors is not None
    return head_op.conv_cluster_logits(x, H, W, *tensors)


def _head_fused(layer: PaCaAttention, x: torch.Tensor) -> bool:
    """Whether the layer's plan runs its conv head as the fused op on x."""
    return layer._plan(x, None, False).head is not None


def _ids(s: tuple) -> str:
    return "B{}-H{}-W{}-C{}-M{}-k{}".format(*s)


@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("contiguous", [True, False], ids=["contig", "strided"])
def test_fused_head_matches_modules_float32(shape, contiguous):
    B, H, W, C, M, k = shape
    head = _head(C, M, k, bias2=(M % 2 == 1))
    x = torch.randn(B, H * W, C)
    xin = x if contiguous else testing.noncontiguous(x)
    with torch.no_grad(), testing.poisoned_outputs():
        out = conv_cluster_logits(head, xin, H, W)
    exact = head.double()(x.double(), H, W)
    assert out.shape == (B, M, H * W) and out.dtype == torch.float32 and out.is_contiguous()
    testing.assert_close(out.double(), exact, rtol=1e-5, atol=2e-6, name="logits")


def test_fused_head_scratch_buffers_carry_nothing_between_calls():
    # Per-thread scratch buffers are reused across calls (csrc/cpu/math/scratch.h): a call that fills
    # them with NaN (NaN input and weights, a bigger grid) must not change the next results by a bit.
    heads = [(_head(C, M, k, bias2=(M % 2 == 1)), torch.randn(B, H * W, C), H, W)
             for B, H, W, C, M, k in SHAPES[:4]]
    big = _head(48, 60, 7)
    with torch.no_grad():
        before = [conv_cluster_logits(h, x, H, W) for h, x, H, W in heads]
        for p in big.parameters():
            p.fill_(float("nan"))
        assert torch.isnan(conv_cluster_logits(big, torch.full((3, 16 * 16, 48), float("nan")), 16, 16)).all()
        for (h, x, H, W), want in zip(heads, before, strict=True):
            got = conv_cluster_logits(h, x, H, W)
            assert not torch.isnan(want).any() and torch.equal(got, want)


@pytest.mark.parametrize("shape", SHAPES[:3], ids=_ids)
def test_fused_head_float64_exact(shape):
    B, H, W, C, M, k = shape
    head = _head(C, M, k).double()
    x = torch.randn(B, H * W, C, dtype=torch.float64)
    with torch.no_grad():
        out = conv_cluster_logits(head, x, H, W)
        exact = head(x, H, W)
    assert out.dtype == torch.float64
    testing.assert_close(out, exact, rtol=1e-12, atol=1e-12, name="logits")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_fused_head_low_precision_within_flash_attention_rule(dtype):
    B, H, W, C, M, k = 2, 9, 7, 40, 49, 7
    head = _head(C, M, k)
    x = torch.randn(B, H * W, C)
    with torch.no_grad():
        exact = head.double()(x.double(), H, W)
        low = head.to(dtype)
        out = conv_cluster_logits(low, x.to(dtype), H, W)
        ref_low = low(x.to(dtype), H, W)
    assert out.dtype == dtype
    testing.assert_low_precision_ok(out, ref_low, exact, name="logits")


def test_fused_head_deterministic_across_thread_counts():
    head = _head(48, 30, 7)
    x = torch.randn(3, 10 * 13, 48)
    testing.assert_same_bits_across_thread_counts(lambda: conv_cluster_logits(head, x, 10, 13), (1, 2))


def test_fused_head_errors():
    head = _head(16, 4, 7)
    s = head.clustering
    op = torch.ops.paca_kernels.conv_cluster_logits
    x = torch.randn(2, 12, 16)
    with pytest.raises(RuntimeError, match="H \\* W == N"):
        op(x, 3, 5, s[0].weight, s[0].bias, s[2].weight, s[2].bias, s[4].weight, None)
    with pytest.raises(RuntimeError, match="w1 of shape"):
        op(x, 3, 4, s[0].weight, s[0].bias, s[4].weight, s[2].bias, s[4].weight, None)
    with pytest.raises(RuntimeError, match="k odd"):
        op(x, 3, 4, torch.randn(16, 1, 4, 4), None, s[2].weight, None, s[4].weight, None)
    with pytest.raises(RuntimeError, match="inference-only"):
        xg = x.clone().requires_grad_()
        op(xg, 3, 4, s[0].weight, s[0].bias, s[2].weight, s[2].bias, s[4].weight, None).sum().backward()


def test_fused_head_opcheck():
    head = _head(24, 7, 5)
    s = head.clustering
    x = torch.randn(2, 6 * 5, 24)
    args = (x, 6, 5, *(t.detach() for t in (s[0].weight, s[0].bias, s[2].weight, s[2].bias, s[4].weight)), None)
    testing.opcheck_inference_only(torch.ops.paca_kernels.conv_cluster_logits.default, args)


def test_fused_head_flops_equal_the_convolutions():
    head = _head(32, 10, 7)
    x = torch.randn(2, 8 * 6, 32)
    testing.assert_same_flops(lambda: conv_cluster_logits(head, x, 8, 6), lambda: head(x, 8, 6))


# -- use by PaCaAttention --------------------------------------------------------------------------


@pytest.fixture
def fused_calls(monkeypatch, spy):
    """Counts the fused-head calls made by PaCaAttention on its per-part path (the whole-layer op,
    tested in test_conv_paca_layer, is switched off: the layer falls back to this path e.g. with a
    cluster position embedding)."""
    monkeypatch.setattr(layer_op, "REGISTERED", False)
    return spy(head_op, "conv_cluster_logits")


def test_attention_uses_fused_head_in_inference_and_training(fused_calls):
    layer = PaCaAttention(40, 2, 13, backend="cpu").eval()
    x = torch.randn(2, 9 * 7, 40)
    with torch.no_grad():
        out, z = layer(x, 9, 7)
    assert len(fused_calls) == 1
    ref = PaCaAttention(40, 2, 13, backend="reference").eval()
    ref.load_state_dict(layer.state_dict())
    with torch.no_grad():
        out_ref, z_ref = ref(x, 9, 7)
    assert len(fused_calls) == 1  # the reference backend keeps the module path
    testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    testing.assert_close(z, z_ref, rtol=1e-5, atol=1e-6)
    # Gradients wanted: the head's differentiable composition (conv_cluster_logits_train, through
    # mlp_dwconv's backward), the same gradients as the reference backend's modules.
    layer(x, 9, 7)[0].sum().backward()
    assert len(fused_calls) == 2
    ref(x, 9, 7)[0].sum().backward()
    for (name, p), p_ref in zip(layer.named_parameters(), ref.parameters(), strict=True):
        if p.grad is None:
            assert p_ref.grad is None, name
            continue
        testing.assert_close(p.grad, p_ref.grad, rtol=1e-4, atol=1e-5, name=name)


def test_fused_head_skipped_with_hooks_or_other_heads():
    layer = PaCaAttention(32, 2, 8, backend="cpu").eval()
    x = torch.randn(1, 16, 32)
    with torch.no_grad():
        assert _head_fused(layer, x)
        handle = layer.clustering.clustering[1].register_forward_hook(lambda *a: None)
        assert not _head_fused(layer, x)
        handle.remove()
        # Global hooks fire for every module call, so they would miss the fused head's modules too.
        for register in (torch.nn.modules.module.register_module_forward_hook,
                         torch.nn.modules.module.register_module_forward_pre_hook):
            handle = register(lambda *a: None)
            assert not _head_fused(layer, x)
            handle.remove()
        assert _head_fused(layer, x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert _head_fused(layer, x)  # in bf16 (tests/backends/test_cpu_bf16.py)
        tanh = PaCaAttention(32, 2, 8, act_cfg={"type": "GELU", "approximate": "tanh"}, backend="cpu").eval()
        assert not _head_fused(tanh, x)
        assert not _head_fused(PaCaAttention(32, 2, 8, clustering="mlp", backend="cpu").eval(), x)
        # A hook elsewhere in the layer (here on q) keeps the head fused: only its own modules count.
        handle = layer.q.register_forward_hook(lambda *a: None)
        assert _head_fused(layer, x)
        handle.remove()
    # Gradients wanted: the differentiable head (float32/float64, no autocast, no hooks).
    assert _head_fused(layer, x.requires_grad_())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not _head_fused(layer, x)
    handle = layer.clustering.clustering[1].register_forward_hook(lambda *a: None)
    assert not _head_fused(layer, x)
    handle.remove()


def test_attention_compiles_fullgraph_with_fused_head(fused_calls):
    layer = PaCaAttention(24, 2, 7, backend="cpu").eval()
    x = torch.randn(2, 5 * 6, 24)
    with torch.no_grad():
        eager = layer(x, 5, 6)[0]
        compiled = torch.compile(lambda t: layer(t, 5, 6)[0], fullgraph=True, backend="aot_eager")(x)
    assert fused_calls  # traced through the fused op
    testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)
