"""The backward of the fused MLP depthwise conv (``paca_kernels::mlp_dwconv_bwd``,
csrc/cpu/mlp_dwconv_bwd.cpp, the autograd formula of ``mlp_dwconv``) against the modules it replaces
in float64, and the training paths that use it: Mlp (``plan_mlp`` → "dwconv" with gradients wanted)
and the conv clustering head (``conv_cluster_logits_train`` through ``plan_attention``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import paca_kernels.ops.fused.conv_cluster_logits as head_op
import paca_kernels.ops.fused.conv_paca_layer as layer_op
import paca_kernels.ops.fused.mlp_dwconv as dwconv_op
from paca_kernels import testing
from paca_kernels.nn import PaCaAttention
from paca_kernels.nn._fusion import conv_head_tensors
from paca_kernels.nn.block import DWConv, Mlp, PaCaBlock
from paca_kernels.nn.clustering import P2CConv2d

pytestmark = [
    pytest.mark.extension,
    pytest.mark.skipif(not dwconv_op.DIFFERENTIABLE, reason="extension built without mlp_dwconv_bwd"),
]

# (B, H, W, C, k): odd grids (7x9: N = 63), channel counts that leave vector tails (40, 37, 20, 45,
# 13), a kernel larger than the grid, a 1x1 grid, k = 5, 7, and grids of more than one band of the
# backward (over 2048 patches: the halo rows between bands, g's rolling buffer over several chunks,
# chunks of k - 1 rows at W = 31, 44 and 300).
SHAPES = [
    (2, 7, 9, 40, 3),
    (1, 5, 3, 37, 3),
    (3, 4, 6, 20, 5),
    (1, 1, 1, 16, 3),
    (2, 3, 2, 24, 7),
    (1, 40, 20, 17, 7),
    (1, 70, 31, 13, 3),
    (1, 50, 44, 9, 7),
    (1, 9, 300, 5, 3),
]
# (shortcut, gelu, bias, in_bias)
VARIANTS = {
    "all": (True, True, True, True),
    "noshortcut": (False, True, True, False),
    "identity-nobias": (True, False, False, True),
    "gelu-nobiases": (False, True, False, False),
}


def _ids(s: tuple) -> str:
    return "B{}-H{}-W{}-C{}-k{}".format(*s)


def _inputs(shape, variant: str, dtype=torch.float64):
    B, H, W, C, k = shape
    shortcut, gelu, has_bias, has_in_bias = VARIANTS[variant]
    x = torch.randn(B, H * W, C, dtype=dtype)
    w = torch.randn(C, 1, k, k, dtype=dtype) * 0.5  # sign-mixed values that exercise the GELU
    b = torch.randn(C, dtype=dtype) if has_bias else None
    ib = torch.randn(C, dtype=dtype) if has_in_bias else None
    return x, w, b, ib, shortcut, gelu


def _reference(x, H, W, w, b, ib, shortcut, gelu):
    """The modules' composition (DWConv's transposes, Conv2d, the shortcut add, GELU) in autograd."""
    u = x if ib is None else x + ib
    img = u.transpose(1, 2).reshape(u.shape[0], u.shape[2], H, W)
    y = F.conv2d(img, w, b, padding=w.shape[-1] // 2, groups=u.shape[2]).flatten(2).transpose(1, 2)
    if shortcut:
        y = y + u
    return F.gelu(y) if gelu else y


def _grads(fn, tensors, gy):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]
    out = fn(*leaves)
    wanted = [t for t in leaves if t is not None]
    return out, torch.autograd.grad(out, wanted, gy)


@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_backward_float64_matches_modules(shape, variant):
    _, H, W, _, _ = shape
    x, w, b, ib, shortcut, gelu = _inputs(shape, variant)
    gy = torch.randn_like(x)
    with testing.poisoned_outputs():
        _, got = _grads(lambda *t: dwconv_op.mlp_dwconv(t[0], H, W, t[1], t[2], t[3], shortcut, gelu),
                          (x, w, b, ib), gy)
    _, want = _grads(lambda *t: _reference(t[0], H, W, t[1], t[2], t[3], shortcut, gelu), (x, w, b, ib), gy)
    for name, g, e in zip(("x", "weight", "bias", "in_bias"), got, want, strict=False):
        testing.assert_close(g, e, rtol=1e-10, atol=1e-10, name=name)


@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("contiguous", [True, False], ids=["contig", "strided"])
def test_backward_float32_matches_float64_modules(shape, contiguous):
    _, H, W, _, _ = shape
    x, w, b, ib, shortcut, gelu = _inputs(shape, "all", torch.float32)
    gy = torch.randn_like(x)
    xin = x if contiguous else testing.noncontiguous(x)
    with testing.poisoned_outputs():
        _, got = _grads(lambda *t: dwconv_op.mlp_dwconv(t[0], H, W, t[1], t[2], t[3], shortcut, gelu),
                        (xin, w, b, ib), gy)
    _, want = _grads(lambda *t: _reference(t[0], H, W, t[1], t[2], t[3], shortcut, gelu),
                     (x.double(), w.double(), b.double(), ib.double()), gy.double())
    for name, g, e in zip(("x", "weight", "bias", "in_bias"), got, want, strict=True):
        assert g.dtype == torch.float32
        # The weight and bias gradients are sums over B·N terms: tolerance relative to their scale.
        testing.assert_close(g.double(), e, rtol=1e-4, atol=1e-4 * (1 + e.abs().max().item()), name=name)


def test_gradcheck():
    B, H, W, C, k = 2, 7, 9, 13, 3
    x, w, b, ib, shortcut, gelu = _inputs((B, H, W, C, k), "all")
    args = [t.requires_grad_() for t in (x, w, b, ib)]
    assert torch.autograd.gradcheck(
        lambda *t: dwconv_op.mlp_dwconv(t[0], H, W, t[1], t[2], t[3], shortcut, gelu), args
    )
    x5, w5, _, _, _, _ = _inputs((1, 5, 4, 6, 5), "gelu-nobiases")
    assert torch.autograd.gradcheck(
        lambda a, c: dwconv_op.mlp_dwconv(a, 5, 4, c, None, None, False, True),
        (x5.requires_grad_(), w5.requires_grad_()),
    )


def test_stride0_grad_and_partial_requires_grad():
    """out.sum().backward() hands the kernel an expanded (stride-0) gradient; only x requires grad."""
    B, H, W, C, k = 2, 7, 9, 24, 3
    x, w, b, ib, shortcut, gelu = _inputs((B, H, W, C, k), "all", torch.float32)
    xg = x.clone().requires_grad_()
    dwconv_op.mlp_dwconv(xg, H, W, w, b, ib, shortcut, gelu).sum().backward()
    xr = x.double().requires_grad_()
    _reference(xr, H, W, w.double(), b.double(), ib.double(), shortcut, gelu).sum().backward()
    testing.assert_close(xg.grad.double(), xr.grad, rtol=1e-4, atol=1e-5, name="x")


def test_raw_op_outputs_and_dtypes():
    B, H, W, C, k = 2, 7, 9, 20, 3
    x, w, b, ib, _, _ = _inputs((B, H, W, C, k), "all", torch.float32)
    gy = torch.randn_like(x)
    with testing.poisoned_outputs():
        gx, gw, gb, gib = torch.ops.paca_kernels.mlp_dwconv_bwd(gy, x, H, W, w, b, ib, True, True)
    assert gx.shape == x.shape and gx.is_contiguous() and gw.shape == w.shape
    assert gb.shape == gib.shape == (C,)
    assert all(t.dtype == torch.float32 and not t.isnan().any() for t in (gx, gw, gb, gib))
    # float32 parameters with float64 tokens: gradients in each parameter's dtype.
    gx, gw, gb, gib = torch.ops.paca_kernels.mlp_dwconv_bwd(gy.double(), x.double(), H, W, w, b, ib, True, True)
    assert gx.dtype == torch.float64 and gw.dtype == gb.dtype == gib.dtype == torch.float32


def test_errors():
    x = torch.randn(2, 12, 16)
    w = torch.randn(16, 1, 3, 3)
    op = torch.ops.paca_kernels.mlp_dwconv_bwd
    with pytest.raises(RuntimeError, match="float32 or float64"):
        op(x.half(), x.half(), 3, 4, w, None, None, True, True)
    with pytest.raises(RuntimeError, match="grad_y of the shape"):
        op(x[:, :6], x, 3, 4, w, None, None, True, True)
    with pytest.raises(RuntimeError, match="H \\* W == N"):
        op(x, x, 3, 5, w, None, None, True, True)
    with pytest.raises(RuntimeError, match="in_bias of shape"):
        op(x, x, 3, 4, w, None, torch.randn(15), True, True)


def test_gelu_derivative_accuracy_tails_and_nan():
    """The backward's GELU' (rational erf, Cephes exp) in the default build; the capped builds run
    the same check in tests/backends/test_cpu_isa.py (cpu_isa_checks.check_gelu_grad)."""
    C = 37
    v = torch.cat([torch.linspace(-12.0, 12.0, 20 * 37 * 37), torch.randn(37 * 37) * 3,
                   torch.tensor([1e30, -1e30, 1e4, -1e4, 6.0, -6.0, 0.0, -0.0, float("nan")])])
    v = torch.cat([v, torch.randn((-v.numel()) % C)])
    x = v.view(1, -1, C)
    gx = torch.ops.paca_kernels.mlp_dwconv_bwd(
        torch.ones_like(x), x, 1, x.shape[1], torch.zeros(C, 1, 3, 3), None, None, True, True
    )[0].flatten()
    vd = v.double().requires_grad_()
    exact = torch.autograd.grad(F.gelu(vd).sum(), vd)[0]
    nan = v.isnan()
    # 0 · NaN from the zero taps: z is NaN one pixel from a NaN input, g too, grad_x two pixels.
    near_nan = nan | torch.roll(nan, C) | torch.roll(nan, -C) | torch.roll(nan, 2 * C) | torch.roll(nan, -2 * C)
    fin = v.isfinite() & ~near_nan
    assert (gx[fin].double() - exact[fin]).abs().max().item() < 1e-6
    assert bool((gx[fin & (v >= 6.0)] == 1).all()) and bool((gx[fin & (v <= -6.0)].abs() < 1e-7).all())
    assert bool(gx[nan].isnan().all())


def test_opcheck():
    B, H, W, C, k = 2, 6, 5, 24, 3
    x, w, b, ib, _, _ = _inputs((B, H, W, C, k), "all", torch.float32)
    args = (x.requires_grad_(), H, W, w.requires_grad_(), b.requires_grad_(), ib.requires_grad_(), True, True)
    torch.library.opcheck(torch.ops.paca_kernels.mlp_dwconv.default, args)
    gy = torch.randn_like(x)
    bwd_args = (gy, x.detach(), H, W, w.detach(), b.detach(), ib.detach(), True, True)
    testing.opcheck_inference_only(torch.ops.paca_kernels.mlp_dwconv_bwd.default, bwd_args)


@pytest.mark.parametrize("shape", [(3, 10, 13, 48, 3), (2, 70, 31, 24, 3)], ids=_ids)
def test_deterministic_across_thread_counts(shape):
    _, H, W, _, _ = shape
    x, w, b, ib, shortcut, gelu = _inputs(shape, "all", torch.float32)
    gy = torch.randn_like(x)

    def run():
        return torch.ops.paca_kernels.mlp_dwconv_bwd(gy, x, H, W, w, b, ib, shortcut, gelu)

    testing.assert_same_bits_across_thread_counts(run, (1, 2, 3))
    first = run()
    for again in (run(), run()):
        for a, c in zip(first, again, strict=True):
            assert torch.equal(a, c)


def test_flops_of_forward_and_backward():
    """Forward: what FlopCounterMode counts for the depthwise conv. Backward: two convolutions' worth
    (the input's and the weight's gradient). Not compared with the modules' backward: torch's
    formula for convolution_backward counts a grouped conv's weight gradient as if the conv were
    dense (C times too much here: 1 + 32 convolutions' worth at C = 32, torch 2.x)."""
    B, H, W, C, k = 2, 8, 6, 32, 3
    m = DWConv(C, with_shortcut=True)
    x = torch.randn(B, H * W, C, requires_grad=True)
    conv = m.dwconv
    xd = x.detach()
    testing.assert_same_flops(
        lambda: dwconv_op.mlp_dwconv(xd, H, W, conv.weight, conv.bias, None, True, True), lambda: m(xd, H, W)
    )
    fwd = 2 * B * H * W * C * k * k
    with FlopCounterMode(display=False) as counter:
        dwconv_op.mlp_dwconv(x, H, W, conv.weight, conv.bias, None, True, True).sum().backward()
    assert counter.get_total_flops() == 3 * fwd


# -- Mlp and PaCaBlock training through it -------------------------------------------------------


@pytest.fixture
def dwconv_calls(spy):
    return spy(dwconv_op, "mlp_dwconv")


def _mlp_pair(C: int = 24, hidden: int = 40, drop: float = 0.0) -> tuple[Mlp, Mlp]:
    fused = Mlp(C, hidden, drop=drop, with_dwconv=True, with_shortcut=True, backend="cpu")
    ref = Mlp(C, hidden, drop=drop, with_dwconv=True, with_shortcut=True, backend="reference")
    with torch.no_grad():
        for p in fused.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    ref.load_state_dict(fused.state_dict())
    return fused, ref


def test_plan_mlp_training_conditions():
    fused, ref = _mlp_pair()
    x = torch.randn(2, 7 * 9, 24)
    assert fused._plan(x) == "train"  # parameters require grad
    assert fused._plan(x.requires_grad_()) == "train"
    assert ref._plan(x) == "modules"  # the reference backend
    with torch.no_grad():
        assert fused._plan(x) in ("whole", "dwconv")  # the inference paths (test_mlp_dwconv.py)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fused._plan(x) == "modules"  # no bf16 backward
    assert fused._plan(x.detach().double().requires_grad_()) == "modules"  # params are float32
    assert fused._plan(x.detach().bfloat16()) == "modules"
    for mod in (fused.fc1, fused.dwconv, fused.dwconv.dwconv, fused.act):
        handle = mod.register_forward_hook(lambda *a: None)
        assert fused._plan(x) == "modules"
        handle.remove()
    for mod in (fused.fc1, fused.dwconv.dwconv, fused.act):
        handle = mod.register_full_backward_hook(lambda *a: None)
        assert fused._plan(x) == "modules"
        handle.remove()
        handle = mod.register_full_backward_pre_hook(lambda *a: None)
        assert fused._plan(x) == "modules"
        handle.remove()
    for register in (torch.nn.modules.module.register_module_forward_hook,
                     torch.nn.modules.module.register_module_forward_pre_hook,
                     torch.nn.modules.module.register_module_full_backward_hook,
                     torch.nn.modules.module.register_module_full_backward_pre_hook):
        handle = register(lambda *a: None)
        assert fused._plan(x) == "modules"
        handle.remove()
    assert fused._plan(x) == "train"
    # A hook on fc2 (which "train" runs as cached_linear) keeps fc2 a module: "dwconv". Hooks on the
    # dropout, which both keep as a module, do not matter; nor does the dropout's rate.
    for register in (fused.fc2.register_forward_hook, fused.fc2.register_forward_pre_hook,
                     fused.fc2.register_full_backward_hook):
        handle = register(lambda *a: None)
        assert fused._plan(x) == "dwconv"
        handle.remove()
    handle = fused.drop.register_forward_hook(lambda *a: None)
    assert fused._plan(x) == "train"
    handle.remove()
    assert _mlp_pair(drop=0.2)[0]._plan(x) == "train"
    tanh = Mlp(24, 40, with_dwconv=True, act_cfg={"type": "GELU", "approximate": "tanh"}, backend="cpu")
    assert tanh._plan(x) == "modules"
    frozen, _ = _mlp_pair()
    frozen.requires_grad_(False)
    assert frozen._plan(x.detach()) in ("whole", "dwconv")  # nothing wants a gradient: inference
    assert frozen._plan(x.detach().requires_grad_()) == "train"  # only x: still differentiable


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=testing.dtype_id)
def test_mlp_training_matches_reference_backend(dwconv_calls, dtype):
    fused, ref = _mlp_pair()
    fused.to(dtype)
    ref.to(dtype)
    x = torch.randn(2, 7 * 9, 24, dtype=dtype)
    xf, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    gy = torch.randn(2, 63, 24, dtype=dtype)
    out = fused(xf, 7, 9)
    out.backward(gy)
    assert len(dwconv_calls) == 1
    out_ref = ref(xr, 7, 9)
    out_ref.backward(gy)
    assert len(dwconv_calls) == 1
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-11, "atol": 1e-11}
    testing.assert_close(out, out_ref, **tol, name="out")
    testing.assert_close(xf.grad, xr.grad, **tol, name="x.grad")
    for (name, p), p_ref in zip(fused.named_parameters(), ref.parameters(), strict=True):
        testing.assert_close(p.grad, p_ref.grad, **tol, name=name)


def test_block_sgd_step_matches_reference_backend(dwconv_calls, spy):
    head_calls = spy(head_op, "conv_cluster_logits")
    torch.manual_seed(0)
    cfg = {"clusters": 13, "onsite_clustering": True, "clustering_kernel_size": 7}
    cpu = PaCaBlock(40, 2, paca_cfg=cfg, backend="cpu").train()
    ref = PaCaBlock(40, 2, paca_cfg=cfg, backend="reference").train()
    ref.load_state_dict(cpu.state_dict())
    H, W = 7, 9
    x = torch.randn(2, H * W, 40)
    target = torch.randn(2, H * W, 40)
    for block in (cpu, ref):
        opt = torch.optim.SGD(block.parameters(), lr=0.1)
        out = block(x.clone().requires_grad_(), H, W)[0]
        F.mse_loss(out, target).backward()
        opt.step()
    assert len(dwconv_calls) == 2 and len(head_calls) == 1  # the MLP and the head's dwconv; cpu only
    for (name, p), p_ref in zip(cpu.named_parameters(), ref.parameters(), strict=True):
        testing.assert_close(p, p_ref, rtol=1e-5, atol=1e-6, name=name)
    with torch.no_grad():
        testing.assert_close(cpu(x, H, W)[0], ref(x, H, W)[0], rtol=1e-5, atol=1e-5, name="out after step")


def test_mlp_training_compiles(dwconv_calls):
    fused, ref = _mlp_pair()
    x = torch.randn(2, 5 * 6, 24, requires_grad=True)
    compiled = torch.compile(lambda t: fused(t, 5, 6), fullgraph=True, backend="aot_eager")
    compiled(x).sum().backward()
    assert dwconv_calls
    xr = x.detach().clone().requires_grad_()
    ref(xr, 5, 6).sum().backward()
    testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-5)


# -- the conv clustering head ----------------------------------------------------------------------


def _head(C: int, M: int, k: int, dtype=torch.float64) -> P2CConv2d:
    head = P2CConv2d(C, M, kernel_size=k).to(dtype)
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(torch.randn_like(p) * 0.4)
    return head


@pytest.mark.parametrize("shape", [(2, 7, 9, 20, 13, 7), (1, 5, 3, 37, 49, 3), (1, 1, 1, 8, 5, 7)],
                         ids=lambda s: "B{}-H{}-W{}-C{}-M{}-k{}".format(*s))
def test_head_train_float64_matches_modules(shape):
    B, H, W, C, M, k = shape
    head = _head(C, M, k)
    tensors = conv_head_tensors(head.clustering)
    x = torch.randn(B, H * W, C, dtype=torch.float64)
    gy = torch.randn(B, M, H * W, dtype=torch.float64)
    xf, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    with testing.poisoned_outputs():
        out = head_op.conv_cluster_logits(xf, H, W, *tensors)  # gradients wanted: the composition
    # Patch-major (a view of a contiguous (B, N, M)), the layout cluster_pool differentiates in place.
    assert out.shape == (B, M, H * W) and out.transpose(1, 2).is_contiguous()
    params = [t for t in tensors if t is not None]
    got = torch.autograd.grad(out, [xf, *params], gy)
    ref = head(xr, H, W)
    want = torch.autograd.grad(ref, [xr, *params], gy)
    testing.assert_close(out, ref, rtol=1e-11, atol=1e-11, name="logits")
    for i, (g, e) in enumerate(zip(got, want, strict=True)):
        testing.assert_close(g, e, rtol=1e-10, atol=1e-10, name=f"grad {i}")


def test_head_train_gradcheck():
    head = _head(6, 5, 3)
    H, W = 4, 3
    x = torch.randn(1, H * W, 6, dtype=torch.float64, requires_grad=True)
    dw, dwb, w1, b1, w2, _ = conv_head_tensors(head.clustering)
    assert torch.autograd.gradcheck(
        lambda *t: head_op.conv_cluster_logits_train(t[0], H, W, t[1], t[2], t[3], t[4], t[5], None),
        (x, dw, dwb, w1, b1, w2),
    )


def test_plan_attention_training_head_conditions():
    layer = PaCaAttention(32, 2, 8, backend="cpu").train()
    x = torch.randn(1, 16, 32)

    def head(t):
        return layer._plan(t, None, False).head is not None

    assert head(x) and head(x.requires_grad_())
    assert not PaCaAttention(32, 2, 8, backend="reference")._plan(x, None, False).head
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not head(x)
    assert not head(x.detach().double().requires_grad_())
    for mod in (layer.clustering, layer.clustering.clustering[2]):
        for register in (mod.register_forward_hook, mod.register_full_backward_hook):
            handle = register(lambda *a: None)
            assert not head(x)
            handle.remove()
    handle = torch.nn.modules.module.register_module_full_backward_hook(lambda *a: None)
    assert not head(x)
    handle.remove()
    assert head(x)
    assert not PaCaAttention(32, 2, 8, clustering="mlp", backend="cpu")._plan(x, None, False).head


def test_attention_training_uses_head_and_matches_reference(monkeypatch, spy):
    monkeypatch.setattr(layer_op, "REGISTERED", False)
    calls = spy(head_op, "conv_cluster_logits_train")
    layer = PaCaAttention(40, 2, 13, backend="cpu").train()
    ref = PaCaAttention(40, 2, 13, backend="reference").train()
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(2, 9 * 7, 40)
    xf, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, z = layer(xf, 9, 7)
    (out.sum() + z.square().sum()).backward()
    assert len(calls) == 1
    out_ref, z_ref = ref(xr, 9, 7)
    (out_ref.sum() + z_ref.square().sum()).backward()
    assert len(calls) == 1
    testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    testing.assert_close(xf.grad, xr.grad, rtol=1e-4, atol=1e-5, name="x.grad")
    for (name, p), p_ref in zip(layer.named_parameters(), ref.parameters(), strict=True):
        if p.grad is None:
            assert p_ref.grad is None, name
            continue
        testing.assert_close(p.grad, p_ref.grad, rtol=1e-4, atol=1e-5, name=name)


def test_attention_training_compiles_with_head(monkeypatch, spy):
    monkeypatch.setattr(layer_op, "REGISTERED", False)
    calls = spy(head_op, "conv_cluster_logits_train")
    layer = PaCaAttention(24, 2, 7, backend="cpu").train()
    ref = PaCaAttention(24, 2, 7, backend="reference").train()
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(2, 5 * 6, 24, requires_grad=True)
    compiled = torch.compile(lambda t: layer(t, 5, 6)[0], fullgraph=True, backend="aot_eager")
    compiled(x).sum().backward()
    assert calls  # traced through the differentiable head
    xr = x.detach().clone().requires_grad_()
    ref(xr, 5, 6)[0].sum().backward()
    testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-5)
    w = layer.clustering.clustering[0].weight
    testing.assert_close(w.grad, ref.clustering.clustering[0].weight.grad, rtol=1e-4, atol=1e-5)
