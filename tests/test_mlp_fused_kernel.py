"""The whole-MLP kernel (``paca_kernels::mlp_fused``, csrc/cpu/fused/mlp_fused.cpp: fc1, DWConv with
its shortcut, GELU, fc2 with the hidden rows kept in cache) against the PaCa-ViT Mlp modules run in
float64, and how Mlp chooses between it and ``mlp_dwconv`` (tests/test_mlp_dwconv_kernel.py covers
the shared gating: inference only, cpu backend, no hooks, no autocast)."""

from __future__ import annotations

import textwrap

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from paca_kernels import _ext
from paca_kernels.nn import block as block_mod
from paca_kernels.nn.block import Mlp
from paca_kernels.ops.mlp_dwconv import FUSED_MLP_MAX_WEIGHT, mlp_fused
from paca_kernels.testing import (
    assert_close,
    assert_low_precision_ok,
    assert_passes_on_cpu_isa,
    noncontiguous,
    poisoned_outputs,
)

pytestmark = pytest.mark.skipif(not _ext.load(), reason=f"C++ extension: {_ext.unavailable_reason()}")

# (B, H, W, C, hidden, k): odd grids and widths that leave masked vector tails (hidden 37, 20, 44;
# out 13), a kernel wider than the grid, a 1x1 grid, a grid taller than one step of rows (H = 40,
# W = 3: 42 rows per step, so several steps with kept rows), and B = 1 (split into row chunks).
SHAPES = [
    (2, 7, 9, 24, 40, 3),
    (1, 5, 3, 13, 37, 3),
    (3, 4, 6, 16, 20, 5),
    (1, 1, 1, 8, 16, 3),
    (2, 3, 2, 12, 24, 7),
    (1, 40, 3, 16, 44, 3),
    (1, 17, 11, 20, 32, 3),
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
    xin = x if contiguous else noncontiguous(x)
    with torch.no_grad(), poisoned_outputs():
        out = mlp_fused(m, xin, H, W)
    with torch.no_grad():
        exact = _modules(m.double(), x.double(), H, W)
    assert out.shape == exact.shape and out.dtype == torch.float32 and out.is_contiguous()
    assert_close(out.double(), exact, rtol=1e-5, atol=1e-5, name="out")


@pytest.mark.parametrize("shape", SHAPES[:3] + SHAPES[5:], ids=_ids)
def test_mlp_fused_float64_exact(shape):
    B, H, W, C, hidden, k = shape
    m = _mlp(C, hidden, k).double()
    x = torch.randn(B, H * W, C, dtype=torch.float64)
    with torch.no_grad():
        out = mlp_fused(m, x, H, W)
        exact = _modules(m, x, H, W)
    assert out.dtype == torch.float64
    assert_close(out, exact, rtol=1e-12, atol=1e-12, name="out")


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
    assert_low_precision_ok(out, ref_low, exact, name="out")


@pytest.mark.parametrize("B", [1, 3])
def test_mlp_fused_deterministic_across_thread_counts(B):
    """With B = 1 the images are split into row chunks, more of them with more threads: the kept
    and recomputed hidden rows must give the same bits."""
    m = _mlp(16, 48)
    x = torch.randn(B, 24 * 5, 16)
    prev = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            with torch.no_grad():
                outs.append(mlp_fused(m, x, 24, 5))
    finally:
        torch.set_num_threads(prev)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


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
            assert_close(mlp_fused(m, x, H, W).double(), _modules(m.double(), x.double(), H, W),
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
    torch.library.opcheck(
        torch.ops.paca_kernels.mlp_fused.default, args,
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"),
    )


def test_mlp_fused_flops_equal_the_modules():
    m = _mlp(32, 64)
    x = torch.randn(2, 8 * 6, 32)
    with torch.no_grad():
        with FlopCounterMode(display=False) as fused:
            mlp_fused(m, x, 8, 6)
        with FlopCounterMode(display=False) as unfused:
            _modules(m, x, 8, 6)
    assert fused.get_total_flops() == unfused.get_total_flops() > 0


def test_mlp_chooses_whole_mlp_kernel_by_weight_size(monkeypatch):
    calls = []
    real_mlp, real_dw = block_mod.mlp_fused, block_mod.mlp_dwconv
    monkeypatch.setattr(block_mod, "mlp_fused", lambda *a: calls.append("mlp") or real_mlp(*a))
    monkeypatch.setattr(block_mod, "mlp_dwconv",
                        lambda *a, **kw: calls.append("dwconv") or real_dw(*a, **kw))
    small = _mlp(16, 64)
    x = torch.randn(1, 4 * 4, 16)
    with torch.no_grad():
        ref = _modules(small, x, 4, 4)
        assert_close(small(x, 4, 4), ref, rtol=1e-5, atol=1e-5)
        assert calls == ["mlp"]
        monkeypatch.setattr(block_mod, "FUSED_MLP_MAX_WEIGHT", 16 * 64 - 1)
        assert_close(small(x, 4, 4), ref, rtol=1e-5, atol=1e-5)
        assert calls == ["mlp", "dwconv"]
        monkeypatch.setattr(block_mod, "FUSED_MLP_MAX_WEIGHT", FUSED_MLP_MAX_WEIGHT)
        # Dropout active (train mode, no grad): the modules run, the dropout applies.
        drop = _mlp(16, 64)
        drop.drop.p = 0.5
        drop.train()
        drop(x, 4, 4)
        assert calls == ["mlp", "dwconv", "dwconv"]
        # A hook on fc2: the whole-MLP kernel would skip it.
        h = small.fc2.register_forward_hook(lambda *a: None)
        small(x, 4, 4)
        h.remove()
        assert calls[-1] == "dwconv"


def test_mlp_fused_compiles_fullgraph():
    m = _mlp(16, 40)
    x = torch.randn(2, 5 * 6, 16)
    with torch.no_grad():
        eager = m(x, 5, 6)
        compiled = torch.compile(lambda t: m(t, 5, 6), fullgraph=True, backend="aot_eager")(x)
    assert_close(compiled, eager, rtol=1e-6, atol=1e-6)


_BASELINE = textwrap.dedent(
    """
    import torch
    from paca_kernels.nn.block import Mlp
    from paca_kernels.ops.mlp_dwconv import mlp_fused
    torch.manual_seed(0)
    for B, H, W, C in [(2, 7, 9, 24), (1, 40, 3, 12)]:
        m = Mlp(C, 3 * C + 1, with_dwconv=True, with_shortcut=True, backend="cpu").eval()
        x = torch.randn(B, H * W, C)
        with torch.no_grad():
            out = mlp_fused(m, x, H, W).double()
            md = m.double()
            exact = md.fc2(md.act(md.dwconv(md.fc1(x.double()), H, W)))
        err = (out - exact).abs().max().item()
        assert err < 1e-5, err
    print("isa ok")
    """
)


@pytest.mark.parametrize("isa", ["baseline", "avx2"])
def test_mlp_fused_capped_isa(isa: str):
    """The float32 kernels with the build capped by PACA_KERNELS_CPU_ISA (read at first use): the
    portable one ("baseline"), and the AVX2 products where the CPU would use the AVX-512 ones."""
    assert_passes_on_cpu_isa(_BASELINE, isa)
