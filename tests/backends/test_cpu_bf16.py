"""bfloat16 CPU inference through the fused kernels (issue #28): the bf16 products (AVX512-BF16
``vdpbf16ps`` on packed bf16 weights where the CPU has it, else float32 products of the bf16-rounded
weights) of mlp_fused, p2c_attention_proj, conv_cluster_logits and conv_paca_layer, served both ways
a user asks for bf16: a bf16 model, and a float32 model under ``torch.autocast("cpu", bf16)``.

Accuracy is FlashAttention's rule: the error against float64 at most twice the PyTorch reference's
in the same precision (the modules in bf16, or under the same autocast). The checks also run as a
script under every ``PACA_KERNELS_CPU_ISA`` cap (the build is chosen once per process)."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

import paca_kernels.ops.fused.conv_cluster_logits as head_op
import paca_kernels.ops.fused.conv_paca_layer as layer_op
import paca_kernels.ops.fused.linear as linear_op
import paca_kernels.ops.fused.mlp_fused as mlp_op
import paca_kernels.ops.fused.p2c_attention_proj as attention_op
from paca_kernels import PaCaAttention, _ext, testing
from paca_kernels.nn.block import Mlp

pytestmark = pytest.mark.extension

BF16 = torch.bfloat16

# Mlp shapes (B, H, W, C, hidden): odd reduction lengths (C = 13 and hidden 37 / 301: a bf16 pair
# with a zero), ragged column panels (37, 301, out 13), a hidden width over one 256-step block
# (301: 256 + 45), and steps of 120 tokens (W = 20: three blocks of rows, 48 + 48 + 24, with 12-row
# tiles and a remainder; the AMX kernel's 32-row blocks: 32 + 32 + 32 + 24), and fc2 over more than
# one block of the AMX kernel's steps (hidden 1100: 1024 + 76, the partial sums kept in the output).
MLP_SHAPES = [(2, 5, 7, 13, 37), (1, 12, 20, 24, 301), (1, 1, 1, 8, 16), (3, 6, 6, 32, 128),
              (1, 3, 4, 16, 1100)]
# Layer shapes (B, H, W, C, heads, M): odd widths (C = 21 with 3 heads of 7, 33 with 3 of 11), one
# cluster, N = 130 over two query blocks, and 40 clusters (the bf16 attention's key panels: 16 + 16
# + 8 columns; its value panels: 40 steps, 20 pairs padded to 32).
LAYER_SHAPES = [(2, 4, 6, 24, 2, 5), (1, 7, 5, 21, 3, 7), (1, 10, 13, 33, 3, 1), (2, 3, 3, 16, 1, 9),
                (1, 10, 13, 48, 2, 40)]


def _mlp(C: int, hidden: int, out: int | None = None) -> Mlp:
    torch.manual_seed(C + hidden)
    m = Mlp(C, hidden, out_features=out, with_dwconv=True, with_shortcut=True, backend="cpu").eval()
    with torch.no_grad():  # sign-mixed values of unit size exercise the GELU and the roundings
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.4)
    return m


def _layer(C: int, heads: int, M: int, backend: str = "cpu") -> PaCaAttention:
    torch.manual_seed(C * 7 + M)
    layer = PaCaAttention(C, heads, M, clustering="conv", backend=backend).eval()
    with torch.no_grad():  # LayerNorm affine and biases away from their 1 / 0 initialisation
        for name, p in layer.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.2)
    return layer


def _copy(module: torch.nn.Module, backend: str) -> torch.nn.Module:
    """A copy of ``module`` on another backend (the reference: the modules and PyTorch ops)."""
    other = copy.deepcopy(module)
    other.backend = backend
    return other


# -- the checks (also run as a script under each ISA cap) ---------------------------------------------


def check_mlp(shape: tuple, mode: str) -> None:
    """Mlp in CPU inference ("whole" path: mlp_fused) on a bf16 model ("model") or a float32 one
    under CPU autocast ("autocast"), against float64 by the 2x rule of the modules' bf16 run."""
    B, H, W, C, hidden = shape
    m = _mlp(C, hidden, out=13 if hidden == 37 else None)
    x = torch.randn(B, H * W, C)
    ref = _copy(m, "reference")
    with torch.no_grad():
        if mode == "model":
            m, ref = m.to(BF16), ref.to(BF16)
            assert m._plan(x.to(BF16)) == "whole"
            out, low = m(x.to(BF16), H, W), ref(x.to(BF16), H, W)
            exact = ref.double()(x.to(BF16).double(), H, W)  # the bf16 model's own weights, exactly
        else:
            with torch.autocast("cpu", dtype=BF16):
                assert m._plan(x) == "whole"
                out, low = m(x, H, W), ref(x, H, W)
            exact = ref.double()(x.double(), H, W)
    assert out.dtype == BF16 and low.dtype == BF16
    testing.assert_low_precision_ok(out, low, exact, name=f"mlp {shape} {mode}")


def check_layer(shape: tuple, mode: str) -> None:
    """PaCaAttention in CPU inference (the whole layer as conv_paca_layer) in bf16, as check_mlp:
    the output and the returned assignment z."""
    B, H, W, C, heads, M = shape
    layer = _layer(C, heads, M)
    ref = _copy(layer, "reference")
    x = torch.randn(B, H * W, C)
    with torch.no_grad():
        if mode == "model":
            layer, ref = layer.to(BF16), ref.to(BF16)
            xb = x.to(BF16)
            assert layer._plan(xb, None, False).layer
            (out, z), (low, zl) = layer(xb, H, W), ref(xb, H, W)
            exact, zx = ref.double()(xb.double(), H, W)
        else:
            with torch.autocast("cpu", dtype=BF16):
                assert layer._plan(x, None, False).layer
                (out, z), (low, zl) = layer(x, H, W), ref(x, H, W)
            exact, zx = ref.double()(x.double(), H, W)
    assert out.dtype == low.dtype == BF16, (out.dtype, low.dtype)
    testing.assert_low_precision_ok(out, low, exact, name=f"layer {shape} {mode}: out")
    testing.assert_low_precision_ok(z, zl, zx, name=f"layer {shape} {mode}: z")


def check_parts(shape: tuple) -> None:
    """The fused parts alone (conv_cluster_logits, then p2c_attention_proj) under autocast, as the
    layer runs them when a hook on the norm keeps the whole-layer op out."""
    B, H, W, C, heads, M = shape
    layer = _layer(C, heads, M)
    ref = _copy(layer, "reference")
    handle = layer.cluster_norm.register_forward_hook(lambda *a: None)
    x = torch.randn(B, H * W, C)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=BF16):
            plan = layer._plan(x, None, False)
            assert not plan.layer and plan.head is not None and plan.attention is not None
            (out, z), (low, zl) = layer(x, H, W), ref(x, H, W)
        exact, zx = ref.double()(x.double(), H, W)
    handle.remove()
    testing.assert_low_precision_ok(out, low, exact, name=f"parts {shape}: out")
    testing.assert_low_precision_ok(z, zl, zx, name=f"parts {shape}: z")


# linear shapes (rows, K, O): PaCa-ViT-Tiny's head at B = 1 (split by columns), an odd K (a bf16
# pair with a zero) and ragged column panels, 40 rows (split by row blocks).
LINEAR_SHAPES = [(1, 384, 1000), (3, 37, 19), (40, 13, 301)]


def check_linear(shape: tuple, mode: str) -> None:
    """ops.fused.linear (the classifier head) on bf16 x: a bf16 model's weights, or float32 weights
    under autocast, against F.linear in the same precision by FlashAttention's rule."""
    R, K, O = shape
    x = torch.randn(R, K)
    w, b = torch.randn(O, K) / K**0.5, torch.randn(O)
    with torch.no_grad():
        if mode == "model":
            xb, wb, bb = x.to(BF16), w.to(BF16), b.to(BF16)
            out, low = linear_op.linear(xb, wb, bb), torch.nn.functional.linear(xb, wb, bb)
            exact = torch.nn.functional.linear(xb.double(), wb.double(), bb.double())
        else:
            with torch.autocast("cpu", dtype=BF16):
                out, low = linear_op.linear(x, w, b), torch.nn.functional.linear(x, w, b)
            exact = torch.nn.functional.linear(x.double(), w.double(), b.double())
    assert out.dtype == low.dtype == BF16, (out.dtype, low.dtype)
    testing.assert_low_precision_ok(out, low, exact, name=f"linear {shape} {mode}")


def check_all() -> None:
    for s in LINEAR_SHAPES:
        for mode in ("model", "autocast"):
            check_linear(s, mode)
    for s in MLP_SHAPES:
        for mode in ("model", "autocast"):
            check_mlp(s, mode)
    for s in LAYER_SHAPES:
        for mode in ("model", "autocast"):
            check_layer(s, mode)
    check_parts(LAYER_SHAPES[1])


# -- the tests ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["model", "autocast"])
@pytest.mark.parametrize("shape", MLP_SHAPES, ids=lambda s: "B{}-H{}-W{}-C{}-hid{}".format(*s))
def test_mlp_bf16_within_flash_attention_rule(shape, mode):
    check_mlp(shape, mode)


@pytest.mark.parametrize("mode", ["model", "autocast"])
@pytest.mark.parametrize("shape", LAYER_SHAPES, ids=lambda s: "B{}-H{}-W{}-C{}-h{}-M{}".format(*s))
def test_layer_bf16_within_flash_attention_rule(shape, mode):
    check_layer(shape, mode)


@pytest.mark.parametrize("mode", ["model", "autocast"])
@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=lambda s: "R{}-K{}-O{}".format(*s))
def test_linear_bf16_within_flash_attention_rule(shape, mode):
    check_linear(shape, mode)


def test_fused_parts_bf16_under_autocast():
    check_parts(LAYER_SHAPES[1])


@pytest.mark.parametrize("isa", ["avx512bf16", "avx512", "avx2", "baseline"])
def test_capped_isa_builds_pass_the_bf16_checks(isa):
    """The vdpbf16ps products where the CPU would use AMX ("avx512bf16"), and without AVX512-BF16
    ("avx512" keeps the AVX-512 float32 build) the bf16 inputs multiplied in float32 by the
    bf16-rounded weights: the same rule holds on every build."""
    me = str(Path(__file__).resolve())
    script = f"import runpy, sys\nsys.argv = [{me!r}]\nrunpy.run_path({me!r}, run_name='__main__')\n"
    testing.assert_passes_on_cpu_isa(script, isa, timeout=300)


def test_bf16_products_deterministic_across_thread_counts():
    m = _mlp(24, 301).to(BF16)
    x = torch.randn(1, 12 * 20, 24, dtype=BF16)
    testing.assert_same_bits_across_thread_counts(lambda: m(x, 12, 20))
    layer = _layer(21, 3, 7).to(BF16)
    xl = torch.randn(2, 7 * 5, 21, dtype=BF16)
    testing.assert_same_bits_across_thread_counts(lambda: layer(xl, 7, 5))


def test_bf16_build_rounds_the_activations_like_the_bf16_matmul():
    """Where the CPU has AVX512-BF16 the products round both operands to bf16 and sum in float32,
    as a bf16 matmul does: fc1 alone (no GELU, a 1x1 depthwise conv of weight 0 plus the shortcut,
    identity fc2) against float64 products of the rounded operands, to float32 summation error."""
    if _ext.cpu_isa()[0] not in ("avx512bf16", "amx"):
        pytest.skip("no AVX512-BF16 build here")
    C, hidden = 37, 53
    x = torch.randn(2, 6 * 5, C).to(BF16)
    w1 = torch.randn(hidden, C).to(BF16)
    dw = torch.zeros(hidden, 1, 1, 1)
    eye = torch.eye(hidden)
    out = mlp_op.mlp_fused(x, 6, 5, w1, None, dw, None, True, False, eye, None)
    # fc2 = I rounds fc1's float32 sums to bf16 once more (exact operands): compare in bf16.
    exact = (x.double() @ w1.double().t()).to(BF16)
    testing.assert_close(out.double(), exact.double(), rtol=2 ** -7, atol=1e-6, name="fc1")


# -- which path runs ---------------------------------------------------------------------------------------


def _spy_dtypes(monkeypatch) -> list:
    """Record (op, dtype it ran in: its output's) of every fused op call the layers make."""
    calls: list = []
    for mod, name in ((layer_op, "conv_paca_layer"), (attention_op, "p2c_attention_proj"),
                      (head_op, "conv_cluster_logits"), (mlp_op, "mlp_fused")):
        real = getattr(mod, name)

        def wrapper(*args, _real=real, _name=name, **kwargs):
            out = _real(*args, **kwargs)
            calls.append((_name, (out[0] if isinstance(out, tuple) else out).dtype))
            return out

        monkeypatch.setattr(mod, name, wrapper)
    return calls


# (model dtype, autocast dtype or None, grad enabled) -> the dtype the fused ops run in, or None when
# the modules run.
DISPATCH = [
    (torch.float32, None, False, torch.float32),
    (torch.float32, BF16, False, BF16),
    (torch.float32, torch.float16, False, torch.float16),
    (BF16, None, False, BF16),
    (BF16, BF16, False, BF16),
    (torch.float16, None, False, torch.float16),
    (torch.float64, BF16, False, torch.float64),  # autocast leaves float64 alone
    (torch.float32, BF16, True, None),  # gradients wanted: the modules (and autograd ops)
    (BF16, None, True, None),
]


@pytest.mark.parametrize(("dtype", "autocast", "grad", "runs"), DISPATCH,
                         ids=lambda v: str(v).replace("torch.", ""))
def test_which_path_runs(monkeypatch, dtype, autocast, grad, runs):
    calls = _spy_dtypes(monkeypatch)
    layer = _layer(16, 2, 4).to(dtype)
    mlp = _mlp(16, 64).to(dtype)
    x = torch.randn(2, 4 * 5, 16, dtype=dtype)
    with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=autocast or BF16,
                                                      enabled=autocast is not None):
        out = layer(x, 4, 5)[0]
        out2 = mlp(x, 4, 5)
    if runs is None:
        assert calls == []
    else:
        assert calls == [("conv_paca_layer", runs), ("mlp_fused", runs)]
    want = autocast if autocast is not None and dtype == torch.float32 else dtype
    assert out.dtype == out2.dtype == want


@pytest.mark.parametrize(("dtype", "autocast", "whole"), [
    (torch.float32, False, False), (BF16, False, True), (torch.float32, True, True)],
    ids=["fp32", "bf16-model", "autocast"])
def test_bigger_mlps_run_whole_in_bf16_on_amx(monkeypatch, dtype, autocast, whole):
    """An MLP whose fc1 weight is over the float32 bound (C = 160, hidden 1100: 176 000 entries)
    runs the whole-MLP kernel when it runs in bf16 on the AMX build (mlp_fused.max_fused_weight),
    and in float32 under the AVX-512 bound: the bf16 runs within the 2x rule of the modules' bf16
    run, the float32 one close to float64."""
    if _ext.cpu_isa()[0] != "amx":
        pytest.skip("the larger bound is for the AMX build")
    assert mlp_op.FUSED_MLP_MAX_WEIGHT < 160 * 1100 <= mlp_op.FUSED_MLP_MAX_WEIGHT_BF16_AMX
    calls = _spy_dtypes(monkeypatch)
    m = _mlp(160, 1100)
    ref = _copy(m, "reference")
    m, ref = m.to(dtype), ref.to(dtype)
    x = torch.randn(2, 5 * 7, 160, dtype=dtype)
    with torch.no_grad():
        exact = copy.deepcopy(ref).double()(x.double(), 5, 7)  # the model's own weights, exactly
        with torch.autocast("cpu", dtype=BF16, enabled=autocast):
            out, low = m(x, 5, 7), ref(x, 5, 7)
    # float32 on this (AMX, hence AVX-512) build: the whole-MLP kernel too, under its own bound.
    assert calls == ([("mlp_fused", BF16)] if whole else [("mlp_fused", torch.float32)])
    if whole:
        testing.assert_low_precision_ok(out, low, exact, name="mlp C=160 hidden=1100")
    else:
        testing.assert_close(out.double(), exact, rtol=1e-4, atol=1e-4, name="mlp C=160 fp32")

def bf16_conversion_outputs() -> list[torch.Tensor]:
    """bf16 runs whose inputs and outputs pass the kernels' bf16 <-> float32 conversions (the
    AVX-512 build's vector ones, the others' element loops), as int16 bit patterns: a bf16 MLP with
    a NaN and an inf in x, a bf16 layer whose clustering logits span about a hundred (probabilities z
    down to the float32 underflow, a denormal at this seed, and zeros), and x with strided channels
    (the element loops)."""
    torch.manual_seed(0)
    outs = []
    with torch.no_grad():
        m = _mlp(24, 101).to(BF16)
        x = torch.randn(2, 35, 24).to(BF16)
        x[0, 3, 5], x[1, 20, 7] = float("nan"), float("inf")
        outs.append(m(x, 5, 7))
        layer = _layer(33, 3, 7)
        for name, p in layer.named_parameters():
            if name.startswith("clustering."):
                p.mul_(9.0)
        layer = layer.to(BF16)
        xl = torch.randn(2, 35, 33).to(BF16)
        out, z = layer(xl, 7, 5)
        zf = z.float()
        assert (zf == 0).any() and ((zf > 0) & (zf < 1e-37)).any(), "no probability near underflow"
        outs += [out, z]
        xs = torch.randn(2, 33, 35).to(BF16).transpose(1, 2)  # channel stride 35
        outs += list(layer(xs, 7, 5))
    outs.append(_rounding_probe())
    return [o.contiguous().view(torch.int16) for o in outs]


def _rounding_probe() -> torch.Tensor:
    """mlp_fused made to output chosen float32 values t exactly, so that its output is bf16(t), the
    kernel's rounding: every low-half pattern that matters (ties to even from below and above, just
    under and over a tie, zero, 0xFFFF carrying into the exponent, values rounding to inf), signs.
    x = (1, 1, 1) and fc1 rows (hi, mid, lo), the three bf16-exact parts of t (its sums are exact),
    a 1x1 depthwise conv of weight 0 plus the shortcut, no GELU, fc2 = I. Only without bf16 products
    (where fc2's input is not rounded to bf16 first: PACA_KERNELS_CPU_ISA=avx512 or below); checked
    against torch's own rounding (c10::BFloat16) here, returned for the cross-build comparison."""
    if _ext.cpu_isa()[0] in ("amx", "avx512bf16"):
        return torch.zeros(0, dtype=BF16)
    g = torch.Generator().manual_seed(5)
    tops = torch.randint(0x3C00, 0x4400, (64,), generator=g, dtype=torch.int32)  # |t| ~ 2^-7 .. 2^9
    lows = torch.tensor([0x8000, 0x7FFF, 0x8001, 0x0000, 0xFFFF, 0x0001, 0x4000, 0xC000],
                        dtype=torch.int32).repeat(8)
    bits = (tops << 16) | lows
    bits[::3] |= torch.tensor(-0x80000000, dtype=torch.int32)  # some negative
    bits[-2:] = torch.tensor([0x7F7FFFFF, 0x7F7F8000], dtype=torch.int32)  # to inf / to even (max)
    t = bits.view(torch.float32)
    hi = (t.view(torch.int32) & -0x10000).view(torch.float32)
    rem = t - hi
    mid = (rem.view(torch.int32) & -0x10000).view(torch.float32)
    lo = rem - mid
    w1 = torch.stack([hi, mid, lo], 1).to(BF16)
    assert torch.equal(w1.float(), torch.stack([hi, mid, lo], 1)), "parts not bf16-exact"
    hidden = t.numel()
    x = torch.ones(1, 1, 3, dtype=BF16)
    out = mlp_op.mlp_fused(x, 1, 1, w1, None, torch.zeros(hidden, 1, 1, 1, dtype=BF16), None, True,
                           False, torch.eye(hidden, dtype=BF16), None)
    want = t.to(BF16)
    assert torch.equal(out.reshape(-1).view(torch.int16), want.view(torch.int16)), (
        (out.reshape(-1).view(torch.int16) != want.view(torch.int16)).nonzero().reshape(-1).tolist())
    return out


def test_bf16_conversions_give_the_element_loops_bits(tmp_path):
    """The AVX-512 build's vector bf16 <-> float32 conversions against the AVX2 build's element
    loops (c10::BFloat16, round to nearest even, NaN to 0x7FC0): with the bf16 products off
    (PACA_KERNELS_CPU_ISA=avx512 vs avx2, whose float32 products give the same bits), the same bits;
    and each build's rounding of chosen values (ties, carries, overflow) is torch's (_rounding_probe)."""
    here = str(Path(__file__).resolve().parent)
    script = ("import sys, torch\nsys.path.insert(0, {here!r})\n"
              "from test_cpu_bf16 import bf16_conversion_outputs\n"
              "torch.save(bf16_conversion_outputs(), {path!r})\nprint('isa ok')\n")
    got = {}
    for isa in ("avx512", "avx2"):
        path = str(tmp_path / f"{isa}.pt")
        testing.assert_passes_on_cpu_isa(script.format(here=here, path=path), isa, timeout=300)
        got[isa] = torch.load(path)
    assert len(got["avx512"]) == len(got["avx2"]) == 6
    for i, (a, b) in enumerate(zip(got["avx512"], got["avx2"], strict=True)):
        assert torch.equal(a, b), f"output {i}: {(a != b).sum().item()} values differ"


def _strided_copy(t: torch.Tensor) -> torch.Tensor:
    """t's values in a tensor of the same shape whose last dimension has stride 2 (a view into a
    buffer twice as long, the other half NaN: a read through the wrong stride shows)."""
    buf = torch.full((*t.shape[:-1], 2 * t.shape[-1]), float("nan"), dtype=t.dtype)
    view = buf[..., ::2]
    view.copy_(t)
    return view


@pytest.mark.parametrize("dtype", [BF16, torch.float32, torch.float64])
def test_parameters_read_through_any_strides_and_dtype(dtype):
    """The kernels read their small parameters (biases, LayerNorm affines, depthwise taps) element
    by element from any strides and floating dtype (cpu/math/tensor_access.h: no ATen conversion
    per call): strided views give the bits of contiguous copies, and float32 parameters with bf16
    activations the bits of the same values given as float32 contiguous tensors."""
    torch.manual_seed(0)
    B, H, W, C, hid = 2, 5, 6, 24, 40
    x = torch.randn(B, H * W, C, dtype=dtype)
    w1, b1 = torch.randn(hid, C, dtype=dtype) / 5, torch.randn(hid, dtype=dtype)
    dw, db = torch.randn(hid, 1, 3, 3, dtype=dtype), torch.randn(hid, dtype=dtype)
    w2, b2 = torch.randn(C, hid, dtype=dtype) / 7, torch.randn(C, dtype=dtype)
    mlp = torch.ops.paca_kernels.mlp_fused
    dw_strided = _strided_copy(dw.reshape(hid, 9)).reshape(hid, 1, 3, 3)
    assert not dw_strided.is_contiguous()
    with torch.no_grad():
        want = mlp(x, H, W, w1, b1, dw, db, True, True, w2, b2)
        got = mlp(x, H, W, w1, _strided_copy(b1), dw_strided, _strided_copy(db), True, True, w2,
                  _strided_copy(b2))
        assert torch.equal(got, want)
        logits = torch.randn(B, 7, H * W, dtype=dtype)
        lw, lb = torch.randn(C, dtype=dtype), torch.randn(C, dtype=dtype)
        pool = torch.ops.paca_kernels.cluster_pool_fwd
        want_pool = pool(logits, x, lw, lb, 1e-6)
        got_pool = pool(logits, x, _strided_copy(lw), _strided_copy(lb), 1e-6)
        for a, b in zip(got_pool, want_pool, strict=True):
            assert torch.equal(a, b)
        if dtype == BF16:  # float32 parameters with bf16 activations: converted exactly
            got32 = mlp(x, H, W, w1, b1.float(), dw.float(), _strided_copy(db.float()), True, True,
                        w2, b2.float())
            assert torch.equal(got32, want)
            got_pool32 = pool(logits, x, _strided_copy(lw.float()), lb.float(), 1e-6)
            for a, b in zip(got_pool32, want_pool, strict=True):
                assert torch.equal(a, b)


if __name__ == "__main__":
    check_all()
    print("isa ok")
    sys.exit(0)
