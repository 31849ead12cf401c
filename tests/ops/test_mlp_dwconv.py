"""The fused MLP depthwise conv (``paca_kernels::mlp_dwconv``, csrc/cpu/fused/mlp_dwconv.cpp) against
the modules it replaces (fc1's bias, DWConv with its shortcut, GELU) run in float64, and the use of
the fused MLP kernels (this one and the whole-MLP ``mlp_fused``, tests/ops/test_mlp_fused.py) by
Mlp / PaCaBlock / the models (inference only, the cpu backend, no hooks)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import paca_kernels.ops.fused.mlp_dwconv as dwconv_op
import paca_kernels.ops.fused.mlp_fused as mlp_op
from paca_kernels import create_model, testing
from paca_kernels.nn.block import DWConv, Mlp

pytestmark = pytest.mark.extension

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


def mlp_dwconv(m: DWConv, x: torch.Tensor, H: int, W: int, gelu: bool,
               in_bias: torch.Tensor | None = None) -> torch.Tensor:
    """The fused op on a DWConv's tensors."""
    conv = m.dwconv
    return dwconv_op.mlp_dwconv(x, H, W, conv.weight, conv.bias, in_bias, bool(m.with_shortcut), gelu)


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
    xin = x if contiguous else testing.noncontiguous(x)
    with torch.no_grad(), testing.poisoned_outputs():
        out = mlp_dwconv(m, xin, H, W, gelu=gelu, in_bias=in_bias)
    with torch.no_grad():
        exact = _modules(m.double(), x.double(), H, W, gelu, None if in_bias is None else in_bias.double())
    assert out.shape == x.shape and out.dtype == torch.float32 and out.is_contiguous()
    testing.assert_close(out.double(), exact, rtol=1e-5, atol=2e-6, name="y")


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
    testing.assert_close(out, exact, rtol=1e-12, atol=1e-12, name="y")


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
    testing.assert_low_precision_ok(out, ref_low, exact, name="y")


def test_fused_dwconv_deterministic_across_thread_counts():
    m = _dwconv(48)
    x = torch.randn(3, 10 * 13, 48)
    testing.assert_same_bits_across_thread_counts(lambda: mlp_dwconv(m, x, 10, 13, gelu=True), (1, 2))


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
    # The backward has float32/float64 kernels only (tests/ops/test_mlp_dwconv_bwd.py).
    with pytest.raises(RuntimeError, match="float32 and float64 only"):
        xg = x.to(torch.bfloat16).requires_grad_()
        op(xg, 3, 4, w, b, None, True, True).sum().backward()


def test_fused_dwconv_opcheck():
    m = _dwconv(24)
    x = torch.randn(2, 6 * 5, 24)
    args = (x, 6, 5, m.dwconv.weight.detach(), m.dwconv.bias.detach(), torch.randn(24), True, True)
    testing.opcheck_inference_only(torch.ops.paca_kernels.mlp_dwconv.default, args)


def test_fused_dwconv_flops_equal_the_convolution():
    m = _dwconv(32)
    x = torch.randn(2, 8 * 6, 32)
    testing.assert_same_flops(lambda: mlp_dwconv(m, x, 8, 6, gelu=True), lambda: m(x, 8, 6))


# -- use by Mlp, PaCaBlock and the models --------------------------------------------------------


@pytest.fixture
def fused_calls(spy):
    """Counts the fused calls made by Mlp: ("dwconv", shape) for mlp_dwconv, ("mlp", shape) for the
    whole-MLP kernel."""
    calls = spy(dwconv_op, "mlp_dwconv", tag="dwconv")
    return spy(mlp_op, "mlp_fused", calls, tag="mlp")


def _mlp_pair(C: int = 24, hidden: int = 40) -> tuple[Mlp, Mlp]:
    fused = Mlp(C, hidden, with_dwconv=True, with_shortcut=True, backend="cpu").eval()
    ref = Mlp(C, hidden, with_dwconv=True, with_shortcut=True, backend="reference").eval()
    with torch.no_grad():
        for p in fused.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    ref.load_state_dict(fused.state_dict())
    return fused, ref


def test_mlp_uses_fused_kernel_in_inference_and_training(fused_calls):
    fused, ref = _mlp_pair()
    x = torch.randn(2, 7 * 5, 24)
    with torch.no_grad():
        out = fused(x, 7, 5)
        assert len(fused_calls) == 1
        out_ref = ref(x, 7, 5)
    assert len(fused_calls) == 1  # the reference backend keeps the module path
    testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    # Gradients wanted: mlp_dwconv with its backward (tests/ops/test_mlp_dwconv_bwd.py), the
    # reference backend's modules give the same gradients.
    fused(x, 7, 5).sum().backward()
    assert fused_calls[1:] == [("dwconv", (2, 35, 40))]
    ref(x, 7, 5).sum().backward()
    assert len(fused_calls) == 2
    for (name, p), p_ref in zip(fused.named_parameters(), ref.parameters(), strict=True):
        testing.assert_close(p.grad, p_ref.grad, rtol=1e-5, atol=1e-5, name=name)


def test_fused_dwconv_skipped_with_hooks_grad_or_other_activations(fused_calls):
    fused, _ = _mlp_pair()
    x = torch.randn(1, 4 * 4, 24)
    with torch.no_grad():
        assert fused._plan(x) != "modules"
        for mod in (fused.fc1, fused.dwconv, fused.act):
            handle = mod.register_forward_hook(lambda *a: None)
            assert fused._plan(x) == "modules"
            handle.remove()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert fused._plan(x) != "modules"  # in bf16 (tests/backends/test_cpu_bf16.py)
        tanh = Mlp(24, 40, with_dwconv=True, act_cfg={"type": "GELU", "approximate": "tanh"}, backend="cpu")
        assert tanh._plan(x) == "modules"
        identity = Mlp(24, 40, with_dwconv=True, with_shortcut=True, act_cfg={"type": "Identity"},
                       backend="cpu").eval()
        assert identity._plan(x) != "modules"
    assert fused._plan(x) == "train"  # grad enabled: the differentiable fused op (fc1, fc2 cached_linear)
    assert not fused_calls


def test_mlp_without_dwconv_runs_its_modules(fused_calls):
    """Mlp(with_dwconv=False) (the constructor's default) has no fusable stage: its modules run, in
    inference and in training (its plan once read a _modules entry that such an Mlp has not got)."""
    m = Mlp(24, 40, with_dwconv=False, backend="cpu").eval()
    x = torch.randn(1, 4 * 4, 24)
    with torch.no_grad():
        assert m._plan(x) == "modules"
        testing.assert_close(m(x, 4, 4), m.fc2(m.act(m.fc1(x))), rtol=0, atol=0)
    m.train()(x, 4, 4).sum().backward()
    assert m.fc1.weight.grad is not None
    assert not fused_calls


def test_mlp_compiles_fullgraph_with_fused_kernel(fused_calls):
    fused, _ = _mlp_pair()
    x = torch.randn(2, 5 * 6, 24)
    with torch.no_grad():
        eager = fused(x, 5, 6)
        compiled = torch.compile(lambda t: fused(t, 5, 6), fullgraph=True, backend="aot_eager")(x)
    assert fused_calls  # traced through the fused op
    testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)


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
    # Weights within mlp_fused.max_fused_weight (stages 1-2, and every stage on an AVX-512 build):
    # the whole-MLP kernel; larger ones: mlp_dwconv between the matmuls.
    bound = mlp_op.max_fused_weight(x)
    sizes = [m.fc1.weight.numel() for m in cpu.modules() if isinstance(m, Mlp) and m.dwconv is not None]
    want = {"mlp" if n <= bound else "dwconv" for n in sizes}
    assert {kind for kind, _ in fused_calls} == want
    testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-4)
