"""paca_kernels::cached_linear (csrc/cpu/cached_linear.cpp): F.linear's products written into the CPU
output cache, differentiable; the MLP's fc1 and fc2 in training on the cpu backend ("train" path of
plan_mlp)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from paca_kernels import _ext, create_model, testing
from paca_kernels.nn import Mlp
from paca_kernels.ops.fused import cached_linear as cl_op

pytestmark = pytest.mark.skipif(not cl_op.REGISTERED, reason="C++ extension not built")

cached_linear = cl_op.cached_linear


def _leaves(*ts: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().clone().requires_grad_() for t in ts]


# 2-D and 3-D x, a strided x (transposed view: rows not contiguous), a transposed weight (as the
# backward passes it), odd K and O, and PaCa-ViT-Tiny's stage-1 fc1 at B = 1 (3136 x 96 -> 384: an
# output from the cache).
CASES = [
    ((7, 13), (19, 13), True),
    ((2, 9, 37), (5, 37), False),
    ("strided", (21, 37), True),
    ("weight_t", (21, 37), False),
    ((1, 3136, 96), (384, 96), True),
]


def _inputs(xs, ws, with_bias, dtype):
    if xs == "strided":
        x = torch.randn(2, 37, 5, dtype=dtype).transpose(1, 2)
    elif xs == "weight_t":
        x = torch.randn(3, 8, 37, dtype=dtype)
    else:
        x = torch.randn(*xs, dtype=dtype)
    w = torch.randn(37, 21, dtype=dtype).t() if xs == "weight_t" else torch.randn(*ws, dtype=dtype) / ws[1] ** 0.5
    b = torch.randn(w.shape[0], dtype=dtype) if with_bias else None
    return x, w, b


@pytest.mark.parametrize(("xs", "ws", "with_bias"), CASES, ids=[f"case{i}" for i in range(len(CASES))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=testing.dtype_id)
def test_forward_and_gradients_are_f_linears(xs, ws, with_bias, dtype):
    """The forward is F.linear's bits (the same ATen products); the gradients F.linear autograd's to
    the summation order (float32: 1e-5 relative, measured up to 2e-7; float64: 1e-12)."""
    x, w, b = _inputs(xs, ws, with_bias, dtype)
    args = [t for t in (x, w, b) if t is not None]
    mine, ref = _leaves(*args), _leaves(*args)
    with testing.poisoned_outputs():
        out = cached_linear(mine[0], mine[1], mine[2] if with_bias else None)
    want = F.linear(ref[0], ref[1], ref[2] if with_bias else None)
    assert out.shape == want.shape and out.is_contiguous() and out.dtype == dtype
    assert torch.equal(out, want)
    g = torch.randn_like(want)
    got_g = torch.autograd.grad(out, mine, g)
    want_g = torch.autograd.grad(want, ref, g)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for name, a, e in zip(("grad_x", "grad_weight", "grad_bias"), got_g, want_g, strict=False):
        assert a.shape == e.shape, name
        testing.assert_close(a, e, rtol=tol, atol=tol, name=name)


def test_stride0_upstream_gradient_and_gradcheck():
    x, w, b = (torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True),
               torch.randn(4, 7, dtype=torch.float64, requires_grad=True),
               torch.randn(4, dtype=torch.float64, requires_grad=True))
    assert torch.autograd.gradcheck(cached_linear, (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w: cached_linear(x, w, None), (x, w))
    cached_linear(x, w, b).sum().backward()  # an expanded (stride-0) upstream gradient
    gx, gw, gb = x.grad, w.grad, b.grad
    x.grad = w.grad = b.grad = None
    F.linear(x, w, b).sum().backward()
    for a, e in ((gx, x.grad), (gw, w.grad), (gb, b.grad)):
        testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


def test_large_outputs_come_from_the_cache():
    """An output of 256 KiB or more reuses the block a freed one left in the cache."""
    if _ext.cpu_output_cache()[1] == 0:
        pytest.skip("the CPU output cache is off (PACA_KERNELS_CPU_OUTPUT_CACHE_MB=0)")
    x, w = torch.randn(1000, 96), torch.randn(384, 96)
    ptr = cached_linear(x, w, None).data_ptr()  # freed at once: its block goes to the cache
    again = cached_linear(x, w, None)
    assert again.data_ptr() == ptr
    assert torch.equal(again, F.linear(x, w))


def test_opcheck_flops_and_compile():
    x, w, b = torch.randn(2, 6, 8, requires_grad=True), torch.randn(5, 8, requires_grad=True), torch.randn(5)
    torch.library.opcheck(torch.ops.paca_kernels.cached_linear, (x, w, b))
    torch.library.opcheck(torch.ops.paca_kernels.cached_linear, (x, w, None))
    testing.assert_same_flops(lambda: cached_linear(x, w, b), lambda: F.linear(x, w, b))
    with FlopCounterMode(display=False) as counter:
        cached_linear(x, w, b).sum().backward()
    assert counter.get_total_flops() == 3 * 2 * 12 * 8 * 5
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, w, b: cached_linear(x, w, b).square().sum(), fullgraph=True,
                             backend="aot_eager")
    xa, wa = _leaves(x, w)
    compiled(xa, wa, b).backward()
    xb, wb = _leaves(x, w)
    F.linear(xb, wb, b).square().sum().backward()
    testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-5, name="grad_x")
    testing.assert_close(wa.grad, wb.grad, rtol=1e-5, atol=1e-5, name="grad_weight")


@pytest.mark.parametrize(("weight", "bias", "match"), [
    (torch.randn(5, 9), None, r"expected weight of shape \(O, K\) with K = x.size\(-1\) = 8"),
    (torch.randn(5, 8, dtype=torch.float64), None, r"weight.*dtype|dtype.*weight"),
    (torch.randn(5, 8), torch.randn(4), r"expected bias of shape \(O,\) = \(5,\)"),
    (torch.randn(5, 8), torch.randn(5, dtype=torch.float64), r"bias.*dtype|dtype.*bias"),
])
def test_bad_inputs_are_refused_naming_them(weight, bias, match):
    with pytest.raises(RuntimeError, match=match):
        cached_linear(torch.randn(3, 8), weight, bias)
    with pytest.raises(RuntimeError, match=r"expected x to be float64, float32, float16 or bfloat16, got Long"):
        cached_linear(torch.randint(0, 3, (3, 8)), torch.randint(0, 3, (5, 8)), None)


def test_mlp_trains_through_it_and_a_model_step_matches_the_reference(spy):
    """Mlp's "train" path calls cached_linear for fc1 and fc2; a PaCa-ViT training step on the cpu
    backend gives the reference backend's loss and gradients."""
    calls = spy(cl_op, "cached_linear")
    mlp = Mlp(24, 40, with_dwconv=True, with_shortcut=True, backend="cpu")
    x = torch.randn(2, 7 * 9, 24)
    assert mlp._plan(x) == "train"
    mlp(x, 7, 9).sum().backward()
    assert calls == [(2, 63, 24), (2, 63, 40)]
    torch.manual_seed(0)
    arch = {"embed_dims": [16, 32, 48, 64], "num_heads": [1, 2, 2, 4], "mlp_ratios": [2] * 4, "depths": [1, 1, 1, 1]}
    models = {}
    for backend in ("cpu", "reference"):
        torch.manual_seed(0)
        models[backend] = create_model("pacavit_tiny_p2cconv_100_0", pretrained=False, num_classes=10, img_size=64,
                                       arch_cfg=arch, paca_cfg={"clusters": [4, 5, 6, 0]}, backend=backend,
                                       drop_path_rate=0.0)
    models["reference"].load_state_dict(models["cpu"].state_dict())
    img, label = torch.randn(2, 3, 64, 64), torch.tensor([1, 7])
    grads = {}
    for backend, m in models.items():
        F.cross_entropy(m(img), label).backward()
        grads[backend] = {n: p.grad for n, p in m.named_parameters()}
    assert len(calls) > 2
    for name, g in grads["reference"].items():
        scale = max(g.abs().max().item(), 1e-6)
        testing.assert_close(grads["cpu"][name] / scale, g / scale, rtol=2e-4, atol=2e-4, name=name)
