"""The whole-MLP kernel (``paca_kernels::mlp_fused``, csrc/cpu/fused/mlp_fused.cpp: fc1, DWConv with
its shortcut, GELU, fc2 with the hidden rows kept in cache) against the PaCa-ViT Mlp modules run in
float64, and how Mlp chooses between it and ``mlp_dwconv`` (tests/ops/test_mlp_dwconv.py covers
the shared gating: inference only, cpu backend, no hooks; bf16 and autocast in
tests/backends/test_cpu_bf16.py)."""

from __future__ import annotations

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
