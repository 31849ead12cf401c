"""The stem / stage-transition kernel (``paca_kernels::patch_embed``, csrc/cpu/fused/patch_embed.cpp: a
strided conv gathered tap by tap and multiplied by the packed weight, then a LayerNorm over the
output channels, channels last in and out) against conv2d + LayerNorm in float64, and how
DownsampleV1 chooses between it and its modules (plan_downsample)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import paca_kernels.ops.fused.patch_embed as embed_op
from paca_kernels import create_model, testing
from paca_kernels.nn import DownsampleV1
from paca_kernels.nn._fusion import plan_downsample

pytestmark = pytest.mark.extension

# (B, H, W, C, Co, k, stride, padding): odd grids, channel counts that leave masked vector tails
# (Co 13, 17, 70), the stem's 3 input channels, a patchify conv (k = stride = 4, no padding), a 1x1
# conv, a 7x7 conv of stride 3, a 1x1 image inside its padding, and B = 1 with Co >= 64 (the
# kernel splits the output columns between tasks there: 2 groups of 32+ columns).
SHAPES = [
    (2, 9, 7, 5, 13, 3, 2, 1),
    (1, 14, 14, 20, 70, 3, 2, 1),
    (3, 11, 10, 3, 48, 3, 2, 1),
    (1, 7, 7, 16, 40, 4, 4, 0),
    (1, 5, 6, 8, 100, 1, 1, 0),
    (2, 9, 9, 6, 70, 7, 3, 3),
    (1, 1, 1, 4, 17, 3, 2, 1),
]


def _ids(s: tuple) -> str:
    return "B{}-H{}-W{}-C{}-Co{}-k{}-s{}-p{}".format(*s)


def _params(C: int, Co: int, k: int, dtype=torch.float32, bias: bool = True, affine: bool = True):
    w = torch.randn(Co, C, k, k, dtype=dtype) / (C * k * k) ** 0.5
    b = torch.randn(Co, dtype=dtype) if bias else None
    nw = torch.randn(Co, dtype=dtype) if affine else None
    nb = torch.randn(Co, dtype=dtype) if affine else None
    return w, b, nw, nb


def _modules(x, w, b, stride, padding, norm, nw, nb, eps=1e-6):
    """What the op replaces: conv2d on the NCHW view, then LayerNorm over the channels."""
    y = F.conv2d(x.permute(0, 3, 1, 2), w, b, stride, padding).permute(0, 2, 3, 1)
    return F.layer_norm(y, (w.shape[0],), nw, nb, eps) if norm else y


def _cast(t, dtype):
    return None if t is None else t.to(dtype)


@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("layout", ["nhwc", "nchw", "strided", "batch-stride0"])
@pytest.mark.parametrize("variant", ["norm", "norm-noaffine-nobias", "nonorm"])
def test_patch_embed_matches_modules_float32(shape, layout, variant):
    B, H, W, C, Co, k, s, p = shape
    norm = variant != "nonorm"
    w, b, nw, nb = _params(C, Co, k, bias="nobias" not in variant, affine=variant == "norm")
    x = torch.randn(B, H, W, C)
    if layout == "batch-stride0":  # one image expanded over the batch (stride 0)
        x = x[:1].expand(B, H, W, C)
    if layout == "nchw":  # an image (B, C, H, W) viewed channels last: channels a plane apart
        xin = x.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)
    elif layout == "strided":
        xin = testing.noncontiguous(x)
    else:  # nhwc, batch-stride0
        xin = x
    with torch.no_grad(), testing.poisoned_outputs():
        out = embed_op.patch_embed(xin, w, b, s, p, norm, nw if norm else None, nb if norm else None)
    exact = _modules(x.double(), w.double(), _cast(b, torch.float64), s, p, norm,
                     _cast(nw, torch.float64), _cast(nb, torch.float64))
    assert out.shape == exact.shape and out.dtype == torch.float32 and out.is_contiguous()
    testing.assert_close(out.double(), exact, rtol=2e-5, atol=2e-5, name="out")


@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_patch_embed_float64_exact(shape):
    B, H, W, C, Co, k, s, p = shape
    w, b, nw, nb = _params(C, Co, k, torch.float64)
    x = torch.randn(B, H, W, C, dtype=torch.float64)
    for norm in (True, False):
        out = embed_op.patch_embed(x, w, b, s, p, norm, nw if norm else None, nb if norm else None)
        exact = _modules(x, w, b, s, p, norm, nw, nb)
        assert out.dtype == torch.float64
        testing.assert_close(out, exact, rtol=1e-12, atol=1e-12, name=f"out norm={norm}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[1], SHAPES[2]], ids=_ids)
def test_patch_embed_low_precision_within_flash_attention_rule(dtype, shape):
    B, H, W, C, Co, k, s, p = shape
    w, b, nw, nb = _params(C, Co, k)
    x = torch.randn(B, H, W, C)
    exact = _modules(x.double(), w.double(), b.double(), s, p, True, nw.double(), nb.double())
    with torch.no_grad():
        # float32 parameters with low-precision x (as autocast passes them), and the model cast.
        out = embed_op.patch_embed(x.to(dtype), w, b, s, p, True, nw, nb)
        out_low = embed_op.patch_embed(x.to(dtype), *(t.to(dtype) for t in (w, b)), s, p, True,
                                       nw.to(dtype), nb.to(dtype))
    ref_low = _modules(x.to(dtype), w.to(dtype), b.to(dtype), s, p, True, nw.to(dtype), nb.to(dtype))
    assert out.dtype == out_low.dtype == dtype
    testing.assert_low_precision_ok(out, ref_low, exact, name="out")
    testing.assert_low_precision_ok(out_low, ref_low, exact, name="out (low-precision parameters)")


def test_patch_embed_under_autocast_runs_in_bf16():
    """Under CPU autocast the op runs in bf16 and returns what the modules return there (the
    convolution's and the LayerNorm's dtype), within the rule."""
    w, b, nw, nb = _params(24, 40, 3)
    x = torch.randn(2, 9, 11, 24)
    exact = _modules(x.double(), w.double(), b.double(), 2, 1, True, nw.double(), nb.double())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = embed_op.patch_embed(x, w, b, 2, 1, True, nw, nb)
        ref = _modules(x, w, b, 2, 1, True, nw, nb)
    assert out.dtype == ref.dtype
    testing.assert_low_precision_ok(out, ref, exact, name="out")


@pytest.mark.parametrize("B", [1, 3])
def test_patch_embed_deterministic_across_thread_counts(B):
    """B = 1: the output columns are split between more tasks with more threads; every column's sum
    must keep its bits."""
    w, b, nw, nb = _params(32, 136, 3)
    x = torch.randn(B, 15, 13, 32)
    testing.assert_same_bits_across_thread_counts(lambda: embed_op.patch_embed(x, w, b, 2, 1, True, nw, nb))


def test_patch_embed_scratch_buffers_carry_nothing_between_calls():
    w, b, nw, nb = _params(16, 64, 3)
    with torch.no_grad():
        nan = embed_op.patch_embed(torch.full((2, 30, 30, 16), float("nan")), w.fill_(float("nan")),
                                   b, 2, 1, True, nw, nb)
        assert torch.isnan(nan).all()
        for B, H, W, C, Co, k, s, p in SHAPES[:3]:
            w, b, nw, nb = _params(C, Co, k)
            x = torch.randn(B, H, W, C)
            testing.assert_close(embed_op.patch_embed(x, w, b, s, p, True, nw, nb).double(),
                                 _modules(x.double(), w.double(), b.double(), s, p, True, nw.double(), nb.double()),
                                 rtol=2e-5, atol=2e-5, name="out after a NaN call")


def test_patch_embed_sees_a_weight_changed_in_place():
    """The packed weight is kept across calls in inference (PackCache, keyed by a view of the
    parameter): an in-place update between calls must be seen."""
    w, b, nw, nb = _params(24, 48, 3)
    x = torch.randn(1, 12, 12, 24)
    with torch.no_grad():
        for _ in range(3):  # the second call stores the packing, the third reads it
            embed_op.patch_embed(x, w, b, 2, 1, True, nw, nb)
        w.mul_(-0.5)
        out = embed_op.patch_embed(x, w, b, 2, 1, True, nw, nb)
    testing.assert_close(out.double(), _modules(x.double(), w.double(), b.double(), 2, 1, True, nw.double(),
                                                nb.double()), rtol=2e-5, atol=2e-5)


def test_patch_embed_errors():
    op = torch.ops.paca_kernels.patch_embed
    w, b, nw, nb = _params(8, 16, 3)
    x = torch.randn(2, 9, 9, 8)
    with pytest.raises(RuntimeError, match="\\(B, H, W, C\\)"):
        op(x[0], w, b, 2, 1, True, nw, nb, 1e-6)
    with pytest.raises(RuntimeError, match="weight of shape \\(Co, 8, k, k\\)"):
        op(x, torch.randn(16, 7, 3, 3), b, 2, 1, True, nw, nb, 1e-6)
    with pytest.raises(RuntimeError, match="weight of shape"):
        op(x, torch.randn(16, 8, 3, 2), b, 2, 1, True, nw, nb, 1e-6)
    with pytest.raises(RuntimeError, match="bias of shape"):
        op(x, w, torch.randn(15), 2, 1, True, nw, nb, 1e-6)
    with pytest.raises(RuntimeError, match="norm_weight of shape"):
        op(x, w, b, 2, 1, True, torch.randn(8), nb, 1e-6)
    with pytest.raises(RuntimeError, match="stride > 0"):
        op(x, w, b, 0, 1, True, nw, nb, 1e-6)
    with pytest.raises(RuntimeError, match="padding >= 0"):
        op(x, w, b, 2, -1, True, nw, nb, 1e-6)
    with pytest.raises(RuntimeError, match="does not fit"):
        op(torch.randn(1, 2, 9, 8), torch.randn(16, 8, 5, 5), b, 1, 0, True, nw, nb, 1e-6)
    with pytest.raises(RuntimeError, match="only taken with norm=True"):
        op(x, w, b, 2, 1, False, nw, nb, 1e-6)
    with pytest.raises(RuntimeError, match="float64, float32, float16 or bfloat16"):
        op(x.to(torch.int32), w, b, 2, 1, True, nw, nb, 1e-6)
    with pytest.raises(RuntimeError, match="inference-only"):
        op(x.clone().requires_grad_(), w, b, 2, 1, True, nw, nb, 1e-6).sum().backward()


def test_patch_embed_opcheck():
    w, b, nw, nb = _params(8, 24, 3)
    x = torch.randn(2, 9, 7, 8).permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)
    testing.opcheck_inference_only(torch.ops.paca_kernels.patch_embed.default,
                                   (x, w, b, 2, 1, True, nw, nb, 1e-6))


def test_patch_embed_flops_equal_the_modules():
    w, b, nw, nb = _params(16, 32, 3)
    x = torch.randn(2, 10, 12, 16)
    testing.assert_same_flops(lambda: embed_op.patch_embed(x, w, b, 2, 1, True, nw, nb),
                              lambda: _modules(x, w, b, 2, 1, True, nw, nb))


# ---- DownsampleV1: when it runs the fused op ---------------------------------------------------------

def _downsample(patch_size: int = 2, kernel_size: int = 3, **kw) -> DownsampleV1:
    m = DownsampleV1(8, 24, patch_size, kernel_size, img_size=16, **kw).eval()
    with torch.no_grad():  # sign-mixed, non-default norm parameters
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return m


@pytest.mark.parametrize("patch_size,kernel_size", [(2, 3), (4, 3), (4, 7)], ids=["transition", "stem", "k7"])
def test_downsample_runs_the_fused_op_in_cpu_inference(spy, patch_size, kernel_size):
    calls = spy(embed_op, "patch_embed")
    m = _downsample(patch_size, kernel_size, backend="cpu")
    x = torch.randn(2, 8, 16, 16)  # an NCHW image, as the stem gets it
    with torch.no_grad():
        out = m(x)
        md = m.double()
        exact = md.norm(md.proj(x.double()))
    n_convs = 2 if patch_size > kernel_size else 1
    assert len(calls) == n_convs
    assert out.shape == exact.shape and out.is_contiguous(memory_format=torch.channels_last)
    testing.assert_close(out.double(), exact, rtol=2e-5, atol=2e-5)


def test_downsample_chooses_its_modules(spy):
    calls = spy(embed_op, "patch_embed")
    x = torch.randn(1, 8, 16, 16)
    m = _downsample(backend="cpu")
    with torch.no_grad():
        assert plan_downsample(_downsample(backend="reference"), x) is None
        assert plan_downsample(m, x) is not None
        assert plan_downsample(_downsample(backend="cpu", norm_cfg={"type": "BN"}), x) is None
        ident = _downsample(backend="cpu", norm_cfg={})
        assert plan_downsample(ident, x)[1] is None  # no norm: the op without its LayerNorm
        testing.assert_close(ident(x), ident.proj(x), rtol=1e-5, atol=1e-5)
        h = m.proj.register_forward_hook(lambda *a: None)
        assert plan_downsample(m, x) is None
        h.remove()
        m.proj.padding_mode = "reflect"
        assert plan_downsample(m, x) is None
        m.proj.padding_mode = "zeros"
    # Gradients wanted: the modules (the op has no backward).
    xg = x.clone().requires_grad_()
    assert plan_downsample(m, xg) is None
    m(xg).sum().backward()
    assert xg.grad is not None and len(calls) == 1  # only ident's call above


def test_downsample_compiles_fullgraph():
    m = _downsample(4, 3, backend="cpu")
    x = torch.randn(2, 8, 16, 16)
    with torch.no_grad():
        eager = m(x)
        compiled = torch.compile(m, fullgraph=True, backend="aot_eager")(x)
    testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)


def test_model_runs_its_stem_and_transitions_fused(spy):
    """A PaCa-ViT on the cpu backend runs its stem and every transition as patch_embed in inference,
    with the reference backend's logits."""
    calls = spy(embed_op, "patch_embed")
    cpu = create_model("pacavit_tiny_p2cconv_100_0", backend="cpu", img_size=64).eval()
    ref = create_model("pacavit_tiny_p2cconv_100_0", backend="reference", img_size=64).eval()
    ref.load_state_dict(cpu.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        got, want = cpu(x), ref(x)
    assert len(calls) == 2 + 3  # the stem's two convs, three transitions
    testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
