"""The fused MLP depthwise conv (``paca_kernels::mlp_dwconv``, csrc/cpu/fused/mlp_dwconv.cpp) against
the modules it replaces (fc1's bias, DWConv with its shortcut, GELU) run in float64, and the use of
the fused MLP kernels (this one and the whole-MLP ``mlp_fused``, tests/test_mlp_fused_kernel.py) by
Mlp / PaCaBlock / the models (inference only, the cpu backend, no hooks)."""

from __future__ import annotations

import inspect
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from paca_kernels import _ext, create_model
from paca_kernels.nn import block as block_mod
from paca_kernels.nn.block import DWConv, Mlp
from paca_kernels.ops.mlp_dwconv import fused_dwconv_applies, mlp_dwconv
from paca_kernels.testing import (
    assert_close,
    assert_low_precision_ok,
    assert_passes_on_cpu_isa,
    noncontiguous,
    poisoned_outputs,
)

pytestmark = pytest.mark.skipif(not _ext.load(), reason=f"C++ extension: {_ext.unavailable_reason()}")

# (B, H, W, C, k): odd grids, channel counts that leave masked vector tails (40, 37, 20), a kernel
# larger than the grid (halo wider than the image), a 1x1 grid, and a stage-like shape.
SHAPES = [
    (2, 7, 9, 40, 3),
    (1, 5, 3, 37, 3),
    (3, 4, 6, 20, 5),
    (2, 14, 14, 64, 3),
    (1, 1, 1, 16, 3),
    (2, 3, 2, 24, 7),
    (1, 6, 11, 45, 3),  # k = 3 sliding tiles with a masked channel tail and an overlapping last tile
]


def _dwconv(C: int, k: int = 3, *, shortcut: bool = True, bias: bool = True) -> DWConv:
    m = DWConv(C, kernel_size=k, bias=bias, with_shortcut=shortcut)
    with torch.no_grad():  # larger, sign-mixed values than the default init exercise the GELU
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return m


def _modules(m: DWConv, x: torch.Tensor, H: int, W: int, gelu: bool, in_bias: torch.Tensor | None):
    u = x if in_bias is None else x + in_bias
    y = m(u, H, W)
    return F.gelu(y) if gelu else y


def _ids(s: tuple) -> str:
    return "B{}-H{}-W{}-C{}-k{}".format(*s)


@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("contiguous", [True, False], ids=["contig", "strided"])
@pytest.mark.parametrize(
    "variant", ["gelu-shortcut-inbias", "gelu-noshortcut", "identity-nobias"], ids=lambda v: v
)
def test_fused_dwconv_matches_modules_float32(shape, contiguous, variant):
    B, H, W, C, k = shape
    gelu = variant.startswith("gelu")
    m = _dwconv(C, k, shortcut="noshortcut" not in variant, bias="nobias" not in variant)
    in_bias = torch.randn(C) if "inbias" in variant else None
    x = torch.randn(B, H * W, C)
    xin = x if contiguous else noncontiguous(x)
    with torch.no_grad(), poisoned_outputs():
        out = mlp_dwconv(m, xin, H, W, gelu=gelu, in_bias=in_bias)
    with torch.no_grad():
        exact = _modules(m.double(), x.double(), H, W, gelu, None if in_bias is None else in_bias.double())
    assert out.shape == x.shape and out.dtype == torch.float32 and out.is_contiguous()
    assert_close(out.double(), exact, rtol=1e-5, atol=2e-6, name="y")


@pytest.mark.parametrize("shape", SHAPES[:3], ids=_ids)
def test_fused_dwconv_float64_exact(shape):
    B, H, W, C, k = shape
    m = _dwconv(C, k).double()
    x = torch.randn(B, H * W, C, dtype=torch.float64)
    b1 = torch.randn(C, dtype=torch.float64)
    with torch.no_grad():
        out = mlp_dwconv(m, x, H, W, gelu=True, in_bias=b1)
        exact = _modules(m, x, H, W, True, b1)
    assert out.dtype == torch.float64
    assert_close(out, exact, rtol=1e-12, atol=1e-12, name="y")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_fused_dwconv_low_precision_within_flash_attention_rule(dtype):
    B, H, W, C, k = 2, 9, 7, 40, 3
    m = _dwconv(C, k)
    x = torch.randn(B, H * W, C)
    b1 = torch.randn(C)
    with torch.no_grad():
        exact = _modules(m.double(), x.double(), H, W, True, b1.double())
        low = m.to(dtype)
        out = mlp_dwconv(low, x.to(dtype), H, W, gelu=True, in_bias=b1.to(dtype))
        ref_low = _modules(low, x.to(dtype), H, W, True, b1.to(dtype))
    assert out.dtype == dtype
    assert_low_precision_ok(out, ref_low, exact, name="y")


def test_fused_dwconv_deterministic_across_thread_counts():
    m = _dwconv(48)
    x = torch.randn(3, 10 * 13, 48)
    prev = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            with torch.no_grad():
                outs.append(mlp_dwconv(m, x, 10, 13, gelu=True))
    finally:
        torch.set_num_threads(prev)
    assert torch.equal(outs[0], outs[1])


def test_fused_dwconv_errors():
    m = _dwconv(16)
    w, b = m.dwconv.weight, m.dwconv.bias
    op = torch.ops.paca_kernels.mlp_dwconv
    x = torch.randn(2, 12, 16)
    with pytest.raises(RuntimeError, match="H \\* W == N"):
        op(x, 3, 5, w, b, None, True, True)
    with pytest.raises(RuntimeError, match="k odd"):
        op(x, 3, 4, torch.randn(16, 1, 4, 4), None, None, True, True)
    with pytest.raises(RuntimeError, match="weight of shape"):
        op(x, 3, 4, torch.randn(8, 1, 3, 3), None, None, True, True)
    with pytest.raises(RuntimeError, match="in_bias of shape"):
        op(x, 3, 4, w, b, torch.randn(15), True, True)
    with pytest.raises(RuntimeError, match="\\(B, N, C\\)"):
        op(x[0], 3, 4, w, b, None, True, True)
    with pytest.raises(RuntimeError, match="inference-only"):
        xg = x.clone().requires_grad_()
        op(xg, 3, 4, w, b, None, True, True).sum().backward()


def test_fused_dwconv_opcheck():
    m = _dwconv(24)
    x = torch.randn(2, 6 * 5, 24)
    args = (x, 6, 5, m.dwconv.weight.detach(), m.dwconv.bias.detach(), torch.randn(24), True, True)
    torch.library.opcheck(
        torch.ops.paca_kernels.mlp_dwconv.default, args,
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"),
    )


def test_fused_dwconv_flops_equal_the_convolution():
    m = _dwconv(32)
    x = torch.randn(2, 8 * 6, 32)
    with torch.no_grad():
        with FlopCounterMode(display=False) as fused:
            mlp_dwconv(m, x, 8, 6, gelu=True)
        with FlopCounterMode(display=False) as unfused:
            m(x, 8, 6)
    assert fused.get_total_flops() == unfused.get_total_flops() > 0


# -- use by Mlp, PaCaBlock and the models --------------------------------------------------------


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the fused calls made by Mlp: ("dwconv", shape) for mlp_dwconv, ("mlp", shape) for the
    whole-MLP kernel."""
    calls = []
    real, real_mlp = block_mod.mlp_dwconv, block_mod.mlp_fused

    def spy(dwconv, x, H, W, gelu, in_bias=None):
        calls.append(("dwconv", tuple(x.shape)))
        return real(dwconv, x, H, W, gelu, in_bias=in_bias)

    def spy_mlp(mlp, x, H, W):
        calls.append(("mlp", tuple(x.shape)))
        return real_mlp(mlp, x, H, W)

    monkeypatch.setattr(block_mod, "mlp_dwconv", spy)
    monkeypatch.setattr(block_mod, "mlp_fused", spy_mlp)
    return calls


def _mlp_pair(C: int = 24, hidden: int = 40) -> tuple[Mlp, Mlp]:
    fused = Mlp(C, hidden, with_dwconv=True, with_shortcut=True, backend="cpu").eval()
    ref = Mlp(C, hidden, with_dwconv=True, with_shortcut=True, backend="reference").eval()
    with torch.no_grad():
        for p in fused.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    ref.load_state_dict(fused.state_dict())
    return fused, ref


def test_mlp_uses_fused_kernel_in_inference_only(fused_calls):
    fused, ref = _mlp_pair()
    x = torch.randn(2, 7 * 5, 24)
    with torch.no_grad():
        out = fused(x, 7, 5)
        assert len(fused_calls) == 1
        out_ref = ref(x, 7, 5)
    assert len(fused_calls) == 1  # the reference backend keeps the module path
    assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    # Gradients wanted: the modules run (the fused kernel has no backward).
    fused(x, 7, 5).sum().backward()
    assert len(fused_calls) == 1 and fused.dwconv.dwconv.weight.grad is not None
    assert fused.fc1.bias.grad is not None


def test_fused_dwconv_skipped_with_hooks_autocast_grad_or_other_activations(fused_calls):
    fused, _ = _mlp_pair()
    x = torch.randn(1, 4 * 4, 24)
    with torch.no_grad():
        assert fused._fused_applies(x)
        for mod in (fused.fc1, fused.dwconv, fused.act):
            handle = mod.register_forward_hook(lambda *a: None)
            assert not fused._fused_applies(x)
            handle.remove()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not fused._fused_applies(x)
        tanh = Mlp(24, 40, with_dwconv=True, act_cfg={"type": "GELU", "approximate": "tanh"}, backend="cpu")
        assert not tanh._fused_applies(x)
        assert not Mlp(24, 40, with_dwconv=False, backend="cpu")._fused_applies(x)
        assert fused_dwconv_applies(fused.dwconv, nn.Identity(), x)
    assert not fused._fused_applies(x)  # grad enabled and fc1 parameters require grad
    assert not fused_calls


def test_mlp_compiles_fullgraph_with_fused_kernel(fused_calls):
    fused, _ = _mlp_pair()
    x = torch.randn(2, 5 * 6, 24)
    with torch.no_grad():
        eager = fused(x, 5, 6)
        compiled = torch.compile(lambda t: fused(t, 5, 6), fullgraph=True, backend="aot_eager")(x)
    assert fused_calls  # traced through the fused op
    assert_close(compiled, eager, rtol=1e-6, atol=1e-6)


def test_model_on_cpu_backend_uses_fused_mlp_and_matches_reference(fused_calls):
    ref = create_model("pacavit_tiny_p2cconv_100_0", backend="reference").eval()
    cpu = create_model("pacavit_tiny_p2cconv_100_0", backend="cpu").eval()
    cpu.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = cpu(x)
        n_fused = len(fused_calls)
        out_ref = ref(x)
    assert n_fused == sum(1 for m in cpu.modules() if isinstance(m, Mlp) and m.dwconv is not None) > 0
    assert len(fused_calls) == n_fused
    # Small weights (stages 1-2): the whole-MLP kernel; larger ones: mlp_dwconv between the matmuls.
    assert {kind for kind, _ in fused_calls} == {"mlp", "dwconv"}
    assert_close(out, out_ref, rtol=1e-4, atol=1e-4)


_BASELINE = textwrap.dedent(
    """
    import torch
    import torch.nn.functional as F
    from paca_kernels.nn.block import DWConv
    from paca_kernels.ops.mlp_dwconv import mlp_dwconv
    torch.manual_seed(0)
    for B, H, W, C in [(2, 7, 9, 40), (1, 5, 6, 20)]:
        m = DWConv(C, with_shortcut=True)
        x, b1 = torch.randn(B, H * W, C), torch.randn(C)
        with torch.no_grad():
            out = mlp_dwconv(m, x, H, W, gelu=True, in_bias=b1).double()
            exact = F.gelu(m.double()(x.double() + b1.double(), H, W))
        err = (out - exact).abs().max().item()
        assert err < 1e-5, err
    print("isa ok")
    """
)


@pytest.mark.parametrize("isa", ["baseline", "avx2"])
def test_fused_dwconv_capped_isa(isa: str):
    """The float32 kernels with the build capped by PACA_KERNELS_CPU_ISA (read at first use): the
    portable one ("baseline"), and the AVX2 products where the CPU would use the AVX-512 ones."""
    assert_passes_on_cpu_isa(_BASELINE, isa)


# The kernels' GELU on its own: a depthwise conv whose taps are all zero, with the shortcut (folded
# into the centre tap as 1), passes x through exactly, so mlp_dwconv(gelu=True) returns gelu(x).
def _check_gelu() -> None:
    """Asserts on mlp_dwconv(gelu=True) through an identity depthwise conv (see above)."""
    torch.manual_seed(0)
    C = 37  # a masked vector tail as well
    sweep = torch.linspace(-12.0, 12.0, 40 * 37 * 37)  # dense over the fitted range and the tails
    extremes = torch.tensor([1e30, -1e30, 3e38, -3e38, 1e4, -1e4, 6.0, -6.0, 5.66, -5.66, 1e-30,
                             -1e-30, 0.0, -0.0] * 2 + [float("nan")] * 9)
    rand = torch.randn(37 * 37 * 3) * 3
    v = torch.cat([sweep, extremes, rand])
    v = torch.cat([v, torch.randn((-v.numel()) % C)])
    m = DWConv(C, kernel_size=3, bias=False, with_shortcut=True)
    with torch.no_grad():
        m.dwconv.weight.zero_()
        x = v.view(1, -1, C)
        out = mlp_dwconv(m, x, 1, x.shape[1], gelu=True).flatten()
    exact = F.gelu(v.double())
    # A NaN input also reaches its two neighbours along W (as 0 * NaN): leave those out.
    nan = v.isnan()
    near_nan = nan | torch.roll(nan, C) | torch.roll(nan, -C)
    fin = v.isfinite() & (v.abs() < 1e6) & ~near_nan
    # erf within 3.2e-7 (the fit's float32 evaluation), output rounding 6e-8 relative.
    err = (out[fin].double() - exact[fin]).abs()
    bound = 2.5e-7 * v[fin].double().abs() + 1e-37
    assert bool((err <= bound).all()), (err / bound).max().item()
    # Saturated tails: exactly v above, exactly 0 below (PyTorch gives the same).
    big = v.isfinite() & (v >= 6.0) & ~near_nan
    small = v.isfinite() & (v <= -6.0) & ~near_nan
    assert torch.equal(out[big], v[big]), (out[big] - v[big]).abs().max()
    assert bool((out[small] == 0).all()), out[small].abs().max()
    assert bool(out[nan].isnan().all())


def test_kernel_gelu_accuracy_tails_and_nan():
    """The kernels' rational-erf GELU (AVX2 where the CPU has it) against float64: tails, NaN."""
    _check_gelu()


def test_kernel_gelu_baseline_isa():
    """The same checks for the portable float32 build's GELU."""
    script = ("import torch\nimport torch.nn.functional as F\nfrom paca_kernels.nn.block import DWConv\n"
              "from paca_kernels.ops.mlp_dwconv import mlp_dwconv\n\n")
    assert_passes_on_cpu_isa(script + inspect.getsource(_check_gelu) + "\n_check_gelu()\nprint('isa ok')\n")
