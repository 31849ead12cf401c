"""The whole-MLP kernel (``paca_kernels::mlp_fused``, csrc/cpu/fused/mlp_fused.cpp: fc1, DWConv with
its shortcut, GELU, fc2 with the hidden rows kept in cache) against the PaCa-ViT Mlp modules run in
float64, and how Mlp chooses between it and ``mlp_dwconv`` (tests/ops/test_mlp_dwconv.py covers
the shared gating: inference only, cpu backend, no hooks; bf16 and autocast in
tests/backends/test_cpu_bf16.py)."""

from __future__ import annotations

import copy

import pytest
import torch

import paca_kernels.ops.fused.mlp_dwconv as dwconv_op
import paca_kernels.ops.fused.mlp_fused as mlp_op
from paca_kernels import testing
from paca_kernels.nn.block import Mlp
from paca_kernels.ops.fused.mlp_fused import FUSED_MLP_MAX_WEIGHT

pytestmark = pytest.mark.extension

# (B, H, W, C, hidden, k): odd grids and widths that leave masked vector tails (hidden 37, 20, 44;
# out 13), a kernel wider than the grid, a 1x1 grid, a grid taller than one step of rows (H = 40,
# W = 3: 42 rows per step, so several steps with kept rows), and B = 1 (split into row chunks).
# Images of at most 32 rows at B < 4 are split into channel groups (mlp_groups in
# csrc/cpu/fused/mlp_fused.cpp: 4 at B = 1, 2 at B = 2 or 3, each at least 16 channels) whose
# partial fc2 products are summed: 2 groups for the first two shapes, 4 (of 16, 16, 16 and 24
# channels: an uneven last group) for the one with hidden 72, 2 for hidden 50 and for (1, 17, 11).
SHAPES = [
    (2, 7, 9, 24, 40, 3),
    (1, 5, 3, 13, 37, 3),
    (3, 4, 6, 16, 20, 5),
    (1, 1, 1, 8, 16, 3),
    (2, 3, 2, 12, 24, 7),
    (1, 40, 3, 16, 44, 3),
    (1, 17, 11, 20, 32, 3),
    (1, 7, 9, 24, 72, 3),
    (2, 6, 5, 20, 50, 5),
]


def _mlp(C: int, hidden: int, k: int = 3, *, shortcut: bool = True, gelu: bool = True,
         bias: bool = True, out: int | None = None) -> Mlp:
    m = Mlp(C, hidden, out_features=out, with_dwconv=True, with_shortcut=shortcut,
            act_cfg="gelu" if gelu else {"type": "Identity"}, backend="cpu").eval()
    if k != 3:
        m.dwconv.dwconv = torch.nn.Conv2d(hidden, hidden, k, 1, k // 2, groups=hidden, bias=bias)
    if not bias:
        m.fc1.bias = m.fc2.bias = m.dwconv.dwconv.bias = None
    with torch.no_grad():  # larger, sign-mixed values than the default init exercise the GELU
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.4)
    return m


def mlp_fused(m: Mlp, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """The fused op on an Mlp's tensors."""
    conv = m.dwconv.dwconv
    return mlp_op.mlp_fused(x, H, W, m.fc1.weight, m.fc1.bias, conv.weight, conv.bias,
                            bool(m.dwconv.with_shortcut), type(m.act) is torch.nn.GELU,
                            m.fc2.weight, m.fc2.bias)


def _modules(m: Mlp, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """The module path (what the kernel replaces)."""
    h = m.dwconv(m.fc1(x), H, W)
    return m.fc2(m.act(h))


def _ids(s: tuple) -> str:
    return "B{}-H{}-W{}-C{}-hid{}-k{}".format(*s)


@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("contiguous", [True, False], ids=["contig", "strided"])
@pytest.mark.parametrize("variant", ["gelu-shortcut", "gelu-noshortcut-out13", "identity-nobias"])
def test_mlp_fused_matches_modules_float32(shape, contiguous, variant):
    B, H, W, C, hidden, k = shape
    m = _mlp(C, hidden, k, shortcut="noshortcut" not in variant, gelu=variant.startswith("gelu"),
             bias="nobias" not in variant, out=13 if "out13" in variant else None)
    x = torch.randn(B, H * W, C)
    xin = x if contiguous else testing.noncontiguous(x)
    with torch.no_grad(), testing.poisoned_outputs():
        out = mlp_fused(m, xin, H, W)
    with torch.no_grad():
        exact = _modules(m.double(), x.double(), H, W)
    assert out.shape == exact.shape and out.dtype == torch.float32 and out.is_contiguous()
    testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-5, name="out")


@pytest.mark.parametrize("shape", SHAPES[:3] + SHAPES[5:], ids=_ids)
def test_mlp_fused_float64_exact(shape):
    B, H, W, C, hidden, k = shape
    m = _mlp(C, hidden, k).double()
    x = torch.randn(B, H * W, C, dtype=torch.float64)
    with torch.no_grad():
        out = mlp_fused(m, x, H, W)
        exact = _modules(m, x, H, W)
    assert out.dtype == torch.float64
    testing.assert_close(out, exact, rtol=1e-12, atol=1e-12, name="out")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_mlp_fused_low_precision_within_flash_attention_rule(dtype):
    B, H, W, C, hidden = 2, 9, 7, 24, 40
    m = _mlp(C, hidden)
    x = torch.randn(B, H * W, C)
    with torch.no_grad():
        exact = _modules(m.double(), x.double(), H, W)
        low = m.to(dtype)
        out = mlp_fused(low, x.to(dtype), H, W)
        ref_low = _modules(low, x.to(dtype), H, W)
    assert out.dtype == dtype
    testing.assert_low_precision_ok(out, ref_low, exact, name="out")


@pytest.mark.parametrize("B,H", [(1, 40), (3, 40), (1, 12), (2, 12)])
def test_mlp_fused_deterministic_across_thread_counts(B, H):
    """With B = 1 the images are split into row chunks, more of them with more threads: the kept
    and recomputed hidden rows must give the same bits. A 12-row image at B < 4 is split into
    channel groups (their number fixed by the shapes, their partial sums added in group order)."""
    m = _mlp(16, 80)
    x = torch.randn(B, H * 5, 16)
    testing.assert_same_bits_across_thread_counts(lambda: mlp_fused(m, x, H, 5))


def test_mlp_fused_scratch_buffers_carry_nothing_between_calls():
    # Per-thread scratch buffers are reused across calls (csrc/cpu/math/scratch.h): after a call that
    # fills them with NaN (NaN input and weights, a bigger grid), results are still exact.
    big = _mlp(24, 48)
    with torch.no_grad():
        for p in big.parameters():
            p.fill_(float("nan"))
        assert torch.isnan(mlp_fused(big, torch.full((2, 20 * 20, 24), float("nan")), 20, 20)).all()
        for B, H, W, C, hidden, k in SHAPES[:3]:
            m = _mlp(C, hidden, k)
            x = torch.randn(B, H * W, C)
            testing.assert_close(mlp_fused(m, x, H, W).double(), _modules(m.double(), x.double(), H, W),
                                 rtol=1e-5, atol=1e-5, name=f"out after a NaN call, {_ids((B, H, W, C, hidden, k))}")


def test_mlp_fused_errors():
    m = _mlp(16, 24)
    w1, b1, w2, b2 = m.fc1.weight, m.fc1.bias, m.fc2.weight, m.fc2.bias
    dw, db = m.dwconv.dwconv.weight, m.dwconv.dwconv.bias
    op = torch.ops.paca_kernels.mlp_fused
    x = torch.randn(2, 12, 16)
    with pytest.raises(RuntimeError, match="H \\* W == N"):
        op(x, 3, 5, w1, b1, dw, db, True, True, w2, b2)
    with pytest.raises(RuntimeError, match="fc1_weight of shape \\(hidden, C\\)"):
        op(x, 3, 4, torch.randn(24, 15), b1, dw, db, True, True, w2, b2)
    with pytest.raises(RuntimeError, match="fc2_weight of shape \\(out, hidden\\)"):
        op(x, 3, 4, w1, b1, dw, db, True, True, torch.randn(16, 23), b2)
    with pytest.raises(RuntimeError, match="dw_weight of shape \\(24, 1, k, k\\)"):
        op(x, 3, 4, w1, b1, torch.randn(24, 1, 4, 4), db, True, True, w2, b2)
    with pytest.raises(RuntimeError, match="dw_weight of shape"):
        op(x, 3, 4, w1, b1, torch.randn(16, 1, 3, 3), db, True, True, w2, b2)
    with pytest.raises(RuntimeError, match="fc1_bias of shape"):
        op(x, 3, 4, w1, torch.randn(23), dw, db, True, True, w2, b2)
    with pytest.raises(RuntimeError, match="fc2_bias of shape"):
        op(x, 3, 4, w1, b1, dw, db, True, True, w2, torch.randn(17))
    with pytest.raises(RuntimeError, match="\\(B, N, C\\)"):
        op(x[0], 3, 4, w1, b1, dw, db, True, True, w2, b2)
    with pytest.raises(RuntimeError, match="inference-only"):
        xg = x.clone().requires_grad_()
        op(xg, 3, 4, w1, b1, dw, db, True, True, w2, b2).sum().backward()


def test_mlp_fused_opcheck():
    m = _mlp(16, 24)
    x = torch.randn(2, 6 * 5, 16)
    args = (x, 6, 5, *(t.detach() for t in (m.fc1.weight, m.fc1.bias, m.dwconv.dwconv.weight,
                                            m.dwconv.dwconv.bias)), True, True,
            m.fc2.weight.detach(), m.fc2.bias.detach())
    testing.opcheck_inference_only(torch.ops.paca_kernels.mlp_fused.default, args)


def test_mlp_fused_flops_equal_the_modules():
    m = _mlp(32, 64)
    x = torch.randn(2, 8 * 6, 32)
    testing.assert_same_flops(lambda: mlp_fused(m, x, 8, 6), lambda: _modules(m, x, 8, 6))


def test_float32_bound_follows_the_build(monkeypatch):
    """max_fused_weight in float32: the AVX-512 bound on the AVX-512 builds, the small one on the
    AVX2 and portable builds (whose products were measured slower than MKL's at C >= 320)."""
    x = torch.randn(1, 4, 8)
    for isa, want in [("avx512", mlp_op.FUSED_MLP_MAX_WEIGHT_AVX512), ("amx", mlp_op.FUSED_MLP_MAX_WEIGHT_AVX512),
                      ("avx2", FUSED_MLP_MAX_WEIGHT), ("baseline", FUSED_MLP_MAX_WEIGHT)]:
        monkeypatch.setattr(mlp_op, "_ISA", [isa])
        assert mlp_op.max_fused_weight(x) == want, isa
    assert FUSED_MLP_MAX_WEIGHT < 384 * 1536 <= mlp_op.FUSED_MLP_MAX_WEIGHT_AVX512  # PaCa-ViT stage 3-4


def test_mlp_chooses_whole_mlp_kernel_by_weight_size(monkeypatch, spy):
    calls = spy(mlp_op, "mlp_fused", tag="mlp")
    spy(dwconv_op, "mlp_dwconv", calls, tag="dwconv")
    small = _mlp(16, 64)
    x = torch.randn(1, 4 * 4, 16)
    with torch.no_grad():
        ref = _modules(small, x, 4, 4)
        testing.assert_close(small(x, 4, 4), ref, rtol=1e-5, atol=1e-5)
        assert [kind for kind, _ in calls] == ["mlp"]
        bound = mlp_op.max_fused_weight
        monkeypatch.setattr(mlp_op, "max_fused_weight", lambda t: 16 * 64 - 1)
        testing.assert_close(small(x, 4, 4), ref, rtol=1e-5, atol=1e-5)
        assert [kind for kind, _ in calls] == ["mlp", "dwconv"]
        monkeypatch.setattr(mlp_op, "max_fused_weight", bound)
        # Dropout active (train mode, no grad): the modules run, the dropout applies.
        drop = _mlp(16, 64)
        drop.drop.p = 0.5
        drop.train()
        drop(x, 4, 4)
        assert [kind for kind, _ in calls] == ["mlp", "dwconv", "dwconv"]
        # A hook on fc2: the whole-MLP kernel would skip it.
        h = small.fc2.register_forward_hook(lambda *a: None)
        small(x, 4, 4)
        h.remove()
        assert calls[-1][0] == "dwconv"


def test_mlp_fused_compiles_fullgraph():
    m = _mlp(16, 40)
    x = torch.randn(2, 5 * 6, 16)
    with torch.no_grad():
        eager = m(x, 5, 6)
        compiled = torch.compile(lambda t: m(t, 5, 6), fullgraph=True, backend="aot_eager")(x)
    testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)


# -- the block's ends: LayerNorm prologue, residual epilogue (x + mlp(LayerNorm(x))) ---------------


def _ln_params(C: int, affine: str, dtype=torch.float32):
    w = (1 + 0.3 * torch.randn(C)).to(dtype) if affine in ("both", "weight") else None
    b = (0.3 * torch.randn(C)).to(dtype) if affine in ("both", "bias") else None
    return w, b


def _ends_modules(m: Mlp, x: torch.Tensor, H: int, W: int, w, b, eps: float, norm: bool,
                  residual: bool) -> torch.Tensor:
    """PaCaBlock's second half with modules: x + mlp(LayerNorm(x))."""
    u = torch.nn.functional.layer_norm(x, (x.shape[-1],), w, b, eps) if norm else x
    out = _modules(m, u, H, W)
    return x + out if residual else out


def _ends_fused(m: Mlp, x, H, W, w, b, eps, norm, residual):
    conv = m.dwconv.dwconv
    return mlp_op.mlp_fused(x, H, W, m.fc1.weight, m.fc1.bias, conv.weight, conv.bias,
                            bool(m.dwconv.with_shortcut), type(m.act) is torch.nn.GELU,
                            m.fc2.weight, m.fc2.bias, norm=(w, b, eps) if norm else None,
                            residual=residual)


# The G = 1 path (B = 2, 7 x 9; B = 1 with 40 rows), channel groups (B = 1, 7 x 9, hidden 72:
# 4 groups; B = 2, 6 x 5: 2), masked tails (C = 13, 24, 20: the 8-lane LayerNorm's tail).
ENDS_SHAPES = [SHAPES[0], SHAPES[1], SHAPES[5], SHAPES[7], SHAPES[8]]


@pytest.mark.parametrize("shape", ENDS_SHAPES, ids=_ids)
@pytest.mark.parametrize(("ends", "affine"), [("norm+residual", "both"), ("norm+residual", "weight"),
                                             ("norm+residual", "none"), ("norm", "both"),
                                             ("norm", "bias"), ("residual", "none")])
@pytest.mark.parametrize("contiguous", [True, False], ids=["contig", "strided"])
def test_mlp_fused_ends_match_modules_float32(shape, ends, affine, contiguous):
    B, H, W, C, hidden, k = shape
    m = _mlp(C, hidden, k)
    w, b = _ln_params(C, affine)
    x = torch.randn(B, H * W, C) * 3 + 1  # off-centre rows: the mean matters
    xin = x if contiguous else testing.noncontiguous(x)
    norm, residual = "norm" in ends, "residual" in ends
    with torch.no_grad(), testing.poisoned_outputs():
        out = _ends_fused(m, xin, H, W, w, b, 1e-6, norm, residual)
    with torch.no_grad():
        d = None if w is None else w.double()
        exact = _ends_modules(m.double(), x.double(), H, W, d, None if b is None else b.double(), 1e-6,
                              norm, residual)
    assert out.shape == exact.shape and out.dtype == torch.float32 and out.is_contiguous()
    testing.assert_close(out.double(), exact, rtol=2e-5, atol=2e-5, name=f"out ({ends}, {affine})")


def test_mlp_fused_ends_float64_exact():
    B, H, W, C, hidden, k = SHAPES[0]
    m = _mlp(C, hidden, k).double()
    w, b = (t.double() for t in _ln_params(C, "both"))
    x = torch.randn(B, H * W, C, dtype=torch.float64) * 3
    with torch.no_grad():
        out = _ends_fused(m, x, H, W, w, b, 1e-5, True, True)
        exact = _ends_modules(m, x, H, W, w, b, 1e-5, True, True)
    testing.assert_close(out, exact, rtol=1e-12, atol=1e-12, name="out")


def test_mlp_fused_norm_rows_of_any_magnitude():
    """The LayerNorm prologue's statistics do not overflow or underflow (rows of 1e30 and 1e-30), a
    constant row normalises to the bias, and a row holding inf or NaN gives NaN, as torch's."""
    B, H, W, C, hidden, k = 1, 3, 4, 20, 32, 3
    m = _mlp(C, hidden, k)
    w, b = _ln_params(C, "both")
    x = torch.randn(B, H * W, C)
    x[0, 0] *= 1e30
    x[0, 1] *= 1e-30
    x[0, 2] = 7.0
    x[0, 3, 5] = float("inf")
    x[0, 4, 6] = float("nan")
    with torch.no_grad():
        u = _ends_fused(m, x, H, W, w, b, 1e-6, True, False)
        xd = x.double()
        want = _ends_modules(m.double(), xd, H, W, w.double(), b.double(), 1e-6, True, False)
    bad = torch.zeros(H * W, dtype=torch.bool)
    bad[3:5] = True
    # The NaN row spreads through the 3x3 conv to its neighbours; elsewhere the values agree.
    assert want[0, bad].isnan().all() and u[0, bad].isnan().all()
    ok = ~want[0].isnan().any(-1)
    testing.assert_close(u[0, ok].double(), want[0, ok], rtol=2e-5, atol=2e-5, name="finite rows")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_mlp_fused_ends_low_precision_within_flash_attention_rule(dtype):
    """A bf16 / fp16 model's block half: the MLP's output rounded to the model's dtype before the
    residual add, as the modules compute it."""
    B, H, W, C, hidden = 2, 9, 7, 24, 40
    m = _mlp(C, hidden)
    w, b = _ln_params(C, "both")
    x = torch.randn(B, H * W, C) * 2
    with torch.no_grad():
        exact = _ends_modules(m.double(), x.double(), H, W, w.double(), b.double(), 1e-6, True, True)
        low = m.to(dtype)
        lw, lb = w.to(dtype), b.to(dtype)
        out = _ends_fused(low, x.to(dtype), H, W, lw, lb, 1e-6, True, True)
        ref_low = _ends_modules(low, x.to(dtype), H, W, lw, lb, 1e-6, True, True)
    assert out.dtype == dtype
    testing.assert_low_precision_ok(out, ref_low, exact, name="out")


def test_mlp_fused_ends_under_autocast_keep_the_float32_stream():
    """Under CPU autocast to bf16, float32 x: bf16 products (fc1's input and the MLP's output
    rounded to bf16, as autocast's linears give them), the LayerNorm and the residual sum in float32,
    a float32 result; within FlashAttention's rule of the modules under the same autocast."""
    B, H, W, C, hidden = 2, 9, 7, 24, 40
    m = _mlp(C, hidden)
    w, b = _ln_params(C, "both")
    x = torch.randn(B, H * W, C) * 2
    with torch.no_grad():
        exact = _ends_modules(copy.deepcopy(m).double(), x.double(), H, W, w.double(), b.double(), 1e-6,
                              True, True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = _ends_fused(m, x, H, W, w, b, 1e-6, True, True)
            ref = _ends_modules(m, x, H, W, w, b, 1e-6, True, True)
    assert out.dtype == torch.float32 and ref.dtype == torch.float32
    testing.assert_low_precision_ok(out, ref, exact, name="out")
    # Not the float32 kernel's values: the products did run in bf16.
    with torch.no_grad():
        f32 = _ends_fused(m, x, H, W, w, b, 1e-6, True, True)
    assert (out - f32).abs().max() > 1e-4


def test_mlp_fused_ends_deterministic_across_thread_counts():
    for B, H in [(1, 40), (1, 12), (3, 12)]:
        m = _mlp(16, 80)
        w, b = _ln_params(16, "both")
        x = torch.randn(B, H * 5, 16)
        testing.assert_same_bits_across_thread_counts(
            lambda m=m, x=x, w=w, b=b, H=H: _ends_fused(m, x, H, 5, w, b, 1e-6, True, True))


def test_mlp_fused_ends_errors():
    m = _mlp(16, 24, out=13)
    conv = m.dwconv.dwconv
    op = torch.ops.paca_kernels.mlp_fused
    x = torch.randn(2, 12, 16)
    args = (x, 3, 4, m.fc1.weight, m.fc1.bias, conv.weight, conv.bias, True, True, m.fc2.weight,
            m.fc2.bias)
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="residual=True needs out width == C"):
            op(*args, residual=True)
        with pytest.raises(RuntimeError, match="norm_weight of shape"):
            op(*args, norm=True, norm_weight=torch.ones(15))
        with pytest.raises(RuntimeError, match="are the LayerNorm's \\(norm=True\\)"):
            op(*args, norm_weight=torch.ones(16))
        with pytest.raises(RuntimeError, match="bf16_products=True takes float32 or bfloat16 x"):
            op(x.double(), *args[1:], bf16_products=True)
        m2 = _mlp(16, 24)
        with torch.autocast("cpu", dtype=torch.float16), pytest.raises(ValueError, match="residual stream"):
            _ends_fused(m2, x, 3, 4, None, None, 1e-6, True, True)


def _block_pair(C: int = 24, heads: int = 2, **kw):
    from paca_kernels.nn import PaCaBlock

    torch.manual_seed(0)
    fused = PaCaBlock(C, heads, backend="cpu", **kw).eval()
    ref = PaCaBlock(C, heads, backend="reference", **kw).eval()
    with torch.no_grad():
        for p in fused.parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.dim() == 1 and p.shape[0] == C else 0.0))
    ref.load_state_dict(fused.state_dict())
    return fused, ref


def test_block_runs_its_mlp_half_as_one_call_with_the_ends(monkeypatch):
    """PaCaBlock in CPU inference: x + mlp(norm2(x)) as one mlp_fused call (norm and residual
    passed), the block's output as the reference backend's modules give it; in every other case
    the modules (norm2, the MLP, the add) run."""
    calls = []
    real = mlp_op.mlp_fused

    def record(*args, **kwargs):
        calls.append((kwargs.get("norm") is not None, kwargs.get("residual", False)))
        return real(*args, **kwargs)

    monkeypatch.setattr(mlp_op, "mlp_fused", record)
    fused, ref = _block_pair()
    x = torch.randn(2, 6 * 5, 24)
    with torch.no_grad():
        out = fused(x, 6, 5)[0]
        want = ref(x, 6, 5)[0]
        assert calls == [(True, True)]
        testing.assert_close(out, want, rtol=2e-5, atol=2e-5, name="block")
        # A hook on the norm, on the Mlp or on the drop path: the modules (the hook fires).
        for mod in (fused.norm2_before, fused.mlp, fused.drop_path2):
            fired = []
            h = mod.register_forward_hook(lambda *a, fired=fired: fired.append(1))
            calls.clear()
            testing.assert_close(fused(x, 6, 5)[0], want, rtol=2e-5, atol=2e-5, name="hooked")
            assert fired and (True, True) not in calls
            h.remove()
        # fp16 autocast: the modules (the kernel would cast the residual stream).
        calls.clear()
        with torch.autocast("cpu", dtype=torch.float16):
            fused(x, 6, 5)
        assert (True, True) not in calls
        # bf16 autocast: the ends with bf16 products, float32 out.
        calls.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert fused(x, 6, 5)[0].dtype == torch.float32
        assert (True, True) in calls
    # Gradients wanted: the modules.
    calls.clear()
    fused(x, 6, 5)[0].sum().backward()
    assert (True, True) not in calls


def test_block_with_layer_scale_or_post_norm_runs_the_modules_half():
    from paca_kernels.nn._fusion import plan_mlp_residual

    x = torch.randn(1, 4 * 4, 24)
    with torch.no_grad():
        fused, _ = _block_pair()
        assert plan_mlp_residual(fused, x)
        fused.train()  # an active DropPath is no identity (the block here has drop_path 0: one)
        assert plan_mlp_residual(fused, x)
        scaled, ref = _block_pair(layer_scale=1e-2)
        assert not plan_mlp_residual(scaled, x)
        testing.assert_close(scaled(x, 4, 4)[0], ref(x, 4, 4)[0], rtol=2e-5, atol=2e-5)
        post, ref = _block_pair(post_norm=True)
        assert not plan_mlp_residual(post, x)
        dp, _ = _block_pair(drop_path=0.1)
        assert plan_mlp_residual(dp, x)  # eval: DropPath is an identity
        dp.train()
        assert not plan_mlp_residual(dp, x)
