"""cluster_pool on every backend (reference, cpu, triton, cuda) against the reference.

One test body per check, parametrized over the backends, with the tolerances each backend declares
(``ops.get_backend(name).tolerance(dtype, grad=...)``) and FlashAttention's rule for fp16/bf16
(``low_precision_factor``). A case its backend cannot run skips with that backend's own reason (not
built, no GPU, a dtype or a limit it does not serve). Triton runs on the GPU where there is one, else
in its CPU interpreter (conftest sets TRITON_INTERPRET=1), where each program instance costs ~1 ms:
the shapes every backend runs are small. Backend-only cases (Triton's split-N launcher, CUDA grid
strides, CPU thread counts and ISA builds) are in tests/backends/.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import pytest
import torch

from paca_kernels import ops, reference
from paca_kernels.testing import (
    BACKEND_NAMES,
    assert_close,
    backend_device,
    check_grads_repeat_bitwise,
    check_low_precision,
    check_matches_reference,
    check_refusal,
    clone_leaves,
    count_flops,
    dtype_id,
    grads,
    make_cluster_pool_inputs,
    poisoned_outputs,
    require_backend,
    shape_id,
)

OP = "cluster_pool"
GRAD_NAMES = ("dlogits", "dx", "dweight", "dbias")
#: The backends with kernels of their own (raw torch.ops with saved tensors); the reference is PyTorch.
KERNELS = ("cpu", "triton", "cuda")
FP32, FP64 = torch.float32, torch.float64
LOW = (torch.float16, torch.bfloat16)


def use(name: str) -> tuple[ops.Backend, str]:
    """The backend called ``name`` and the device its tests run on; skips where it cannot run."""
    backend = ops.get_backend(name)
    require_backend(backend)
    return backend, backend_device(name)


def run(name: str):
    """cluster_pool through the backend ``name`` (differentiable)."""
    return lambda logits, x, w=None, b=None, eps=1e-6: ops.cluster_pool(logits, x, w, b, eps, backend=name)


def raw_ops(name: str):
    """(forward, backward) raw ops of a backend: forward -> (out, pooled fp32, stats fp32)."""
    if name == "triton":
        return torch.ops.paca_kernels.cluster_pool_fwd_triton, torch.ops.paca_kernels.cluster_pool_bwd_triton
    return torch.ops.paca_kernels.cluster_pool_fwd, torch.ops.paca_kernels.cluster_pool_bwd


def tol(backend: ops.Backend, dtype: torch.dtype, *, grad: bool = False, slack: float = 1.0) -> dict[str, float]:
    t = backend.tolerance(dtype, grad=grad)
    return {k: v * slack for k, v in t.items()}


# -- forward and every gradient ---------------------------------------------------------------------


class Case(NamedTuple):
    backend: str
    shape: tuple[int, int, int, int]  # (B, M, N, C)
    affine: bool = True
    contiguous: bool = True
    dtype: torch.dtype = FP32
    #: Multiplier of the backend's tolerance where the case sums over thousands of patches (N) or
    #: B·M rows (dweight, dbias): the tolerances are set on the common shapes.
    slack: float = 1.0


def case_id(c: Case) -> str:
    b, m, n, ch = c.shape
    layout = ("" if c.affine else "-noaffine") + ("" if c.contiguous else "-strided")
    return f"{c.backend}-{shape_id(B=b, M=m, N=n, C=ch)}{layout}-{dtype_id(c.dtype)}"


# Every backend: N in {1, 7, 197}, M in {1, 3, 49, 100}, C in {8, 24, 40, 48, 64}, B in {1, 2, 3}, with
# and without the LayerNorm's affine parameters, contiguous and strided (logits strided, x transposed).
COMMON = [
    ((1, 1, 1, 8), True, True),
    ((2, 3, 7, 24), False, True),
    ((2, 49, 197, 24), True, False),
    ((3, 100, 7, 40), True, True),
    ((1, 100, 197, 48), False, False),
    ((2, 49, 1, 64), True, False),
]
# The cpu backend is cheap to run: more shapes (C = 5, 20, 96; N = 600, and 1100 for more than one
# forward split of kSplitRows = 1024 rows with a ragged last tile), each in every layout.
CPU_SHAPES = [(2, 3, 7, 5), (3, 100, 49, 40), (1, 49, 197, 40), (3, 100, 7, 48), (2, 100, 197, 64),
              (2, 3, 600, 96), (2, 3, 1100, 20)]
# The cuda backend: every tile configuration (C in {8, 24, 96, 320, 384, 512, 1000}); B = 1 splits N
# across CTAs (flash-decoding merge), B = 160 fills the GPU in one pass.
CUDA_SHAPES = [
    ((2, 3, 5, 8), True, True),
    ((1, 49, 197, 24), True, False),
    ((2, 49, 197, 96), False, True),
    ((1, 100, 3136, 96), True, True),
    ((160, 4, 300, 24), True, False),
    ((3, 17, 300, 320), True, True),
    ((1, 2, 784, 384), False, False),
    ((2, 100, 196, 512), True, True),
    ((1, 7, 1000, 1000), True, True),
]

CASES = (
    [Case(b, s, a, c, dt) for b in BACKEND_NAMES for dt in (FP32, FP64) for s, a, c in COMMON]
    + [Case("cpu", s, a, c) for s in CPU_SHAPES for a in (True, False) for c in (True, False)]
    + [Case("cuda", s, a, c, slack=4.0) for s, a, c in CUDA_SHAPES]
)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_pool_matches_reference(case: Case):
    """Forward and every gradient, with NaN-filled allocations (an unwritten output shows as NaN)."""
    backend, device = use(case.backend)
    B, M, N, C = case.shape
    inp = make_cluster_pool_inputs(B, M, N, C, dtype=case.dtype, device=device, affine=case.affine,
                                   contiguous=case.contiguous, requires_grad=True)
    args = (inp.logits, inp.x, inp.weight, inp.bias)
    require_backend(backend, OP, args[:2])
    grad_out = torch.randn(B, M, C, device=device, dtype=case.dtype)
    check_matches_reference(run(case.backend), reference.cluster_pool, args, grad_out, GRAD_NAMES,
                            tol(backend, case.dtype, slack=case.slack),
                            tol(backend, case.dtype, grad=True, slack=case.slack))


LOW_CASES = [
    pytest.param(name, shape, dtype, id=f"{name}-{shape_id(B=shape[0], M=shape[1], N=shape[2], C=shape[3])}-{dtype_id(dtype)}")
    # cpu bf16 multiplies bf16 (x packed as pair panels per tile): one odd tile (197), several tiles
    # with the online rescale and two splits with a masked channel panel (1100, C = 37), and the
    # 56 x 56 stage at B = 1 (four splits of 784).
    for name, shape in [*((b, (2, 10, 50, 40)) for b in BACKEND_NAMES), ("cpu", (2, 49, 197, 24)),
                        ("cpu", (2, 7, 1100, 37)), ("cpu", (1, 100, 3136, 96)),
                        ("cuda", (1, 49, 784, 96)), ("cuda", (2, 100, 196, 320))]
    for dtype in LOW
]


@pytest.mark.parametrize(("name", "shape", "dtype"), LOW_CASES)
def test_pool_low_precision_within_flash_attention_rule(name, shape, dtype):
    """fp16/bf16: error against float64 at most ``low_precision_factor`` times the error of the
    PyTorch reference run in the same dtype, for the output and every gradient."""
    backend, device = use(name)
    b, m, n, c = shape
    inp = make_cluster_pool_inputs(b, m, n, c, device=device, dtype=dtype, requires_grad=True)
    args = (inp.logits, inp.x, inp.weight, inp.bias)
    require_backend(backend, OP, args[:2])
    grad_out = torch.randn(b, m, c, device=device).to(dtype)
    # dweight/dbias sum B·M terms: a relative floor for the bf16 rounding of large sums.
    floors = dict.fromkeys(("dweight", "dbias"), lambda exact: 1e-2 * float(exact.abs().max()))
    check_low_precision(run(name), reference.cluster_pool, args, grad_out, GRAD_NAMES,
                        backend.low_precision_factor, floors)


@pytest.mark.parametrize("name", BACKEND_NAMES)
def test_pool_fp32_affine_parameters_with_half_inputs(name):
    """float32 LayerNorm parameters with bf16 activations (autocast's mix): dweight/dbias come back
    float32."""
    backend, device = use(name)
    inp = make_cluster_pool_inputs(2, 5, 60, 32, device=device, dtype=torch.bfloat16)
    require_backend(backend, OP, (inp.logits, inp.x))
    w = (1 + 0.5 * torch.randn(32, device=device)).requires_grad_(True)
    bias = (0.5 * torch.randn(32, device=device)).requires_grad_(True)
    out = run(name)(inp.logits, inp.x, w, bias)
    out.float().square().sum().backward()
    assert w.grad.dtype == bias.grad.dtype == torch.float32
    w2, b2 = w.detach().clone().requires_grad_(True), bias.detach().clone().requires_grad_(True)
    reference.cluster_pool(inp.logits.float(), inp.x.float(), w2, b2).square().sum().backward()
    assert_close(w.grad, w2.grad, rtol=5e-2, atol=5e-2, name="dweight")
    assert_close(bias.grad, b2.grad, rtol=5e-2, atol=5e-2, name="dbias")


STRIDE0_CASES = [
    pytest.param(name, shape, affine,
                 id=f"{name}-{shape_id(B=shape[0], M=shape[1], N=shape[2], C=shape[3])}"
                    f"{'' if affine else '-noaffine'}-fp32")
    for name, shape in [*((b, (2, 6, 40, 24)) for b in BACKEND_NAMES), ("cuda", (2, 6, 400, 24))]
    for affine in (True, False)
]


@pytest.mark.parametrize(("name", "shape", "affine"), STRIDE0_CASES)
def test_pool_stride0_grad_poisoned_outputs_and_bitwise_repeatable(name, shape, affine):
    """out.sum().backward() gives an expanded (stride-0) upstream gradient; NaN-filled allocations
    catch unwritten outputs; the backward has no atomics, so two runs give the same bits."""
    backend, device = use(name)
    inp = make_cluster_pool_inputs(*shape, device=device, affine=affine, requires_grad=True)
    args = [t for t in (inp.logits, inp.x, inp.weight, inp.bias) if t is not None]
    check_grads_repeat_bitwise(run(name), reference.cluster_pool, args, GRAD_NAMES, tol(backend, FP32, grad=True))


@pytest.mark.parametrize("name", BACKEND_NAMES)
def test_pool_backward_against_float64(name):
    """float64 gradcheck (contiguous and strided) where the backend runs float64; otherwise its
    float32 gradients against autograd of the float64 reference."""
    backend, device = use(name)
    fn = run(name)
    if FP64 in backend.dtypes:
        for shape, contiguous in (((2, 3, 5, 4), True), ((2, 3, 6, 5), False)):
            inp = make_cluster_pool_inputs(*shape, dtype=FP64, device=device, requires_grad=True,
                                           contiguous=contiguous)
            assert torch.autograd.gradcheck(fn, (inp.logits, inp.x, inp.weight, inp.bias))
        return
    inp = make_cluster_pool_inputs(2, 3, 5, 8, device=device, requires_grad=True)
    args = (inp.logits, inp.x, inp.weight, inp.bias)
    grad_out = torch.randn(2, 3, 8, device=device)
    _, got_g = grads(fn, args, grad_out)
    _, exact_g = grads(reference.cluster_pool, [t.detach().double().requires_grad_(True) for t in args],
                       grad_out.double())
    for gname, g, e in zip(GRAD_NAMES, got_g, exact_g, strict=True):
        assert_close(g.double(), e, rtol=1e-4, atol=2e-5, name=gname)


# -- extreme inputs ---------------------------------------------------------------------------------

EXTREME_CASES = [
    pytest.param(name, b, n, id=f"{name}-B{b}-M4-N{n}-C16-fp32")
    for name, b, n in [*((k, 1, 40) for k in KERNELS), ("cuda", 1, 900), ("cuda", 300, 900)]
]


@pytest.mark.parametrize(("name", "b", "n"), EXTREME_CASES)
def test_pool_extreme_logits_stay_finite(name, b, n):
    """Logits of ±1e4, and a cluster that is -inf on every patch but one (on the cuda backend with
    B = 1 the patches are split across CTAs, so whole splits are -inf)."""
    backend, device = use(name)
    fwd, _ = raw_ops(name)
    inp = make_cluster_pool_inputs(b, 4, n, 16, device=device, requires_grad=True)
    one = n - 3
    with torch.no_grad():
        inp.logits.copy_(torch.sign(inp.logits) * 1e4 + inp.logits)
        inp.logits[:, 1] = -math.inf
        inp.logits[:, 1, one] = 0.5
    args = (inp.logits, inp.x, inp.weight, inp.bias)
    out, pooled, stats = fwd(*args, 1e-6)
    assert torch.isfinite(out).all() and torch.isfinite(stats).all()
    assert_close(out, reference.cluster_pool(*args), rtol=1e-4, atol=1e-4)
    assert_close(pooled[:, 1], inp.x[:, one], name="pooled", **tol(backend, FP32))  # all the weight there
    ref = clone_leaves(args)
    run(name)(*args).square().sum().backward()
    reference.cluster_pool(*ref).square().sum().backward()
    # ±1e4 logits: the backward recomputes S = exp(logits − max) / sum from the saved stats (logits − max
    # exact), so the gradients hold the ordinary tolerance (test_pool_saturated_softmax_backward_as_accurate_as_torch).
    for gname, t, r in zip(GRAD_NAMES, args, ref, strict=True):
        assert torch.isfinite(t.grad).all(), gname
        assert_close(t.grad, r.grad, name=gname, **tol(backend, FP32, grad=True))


def saturated_logits(b: int, m: int, n: int, device: str) -> torch.Tensor:
    """(b, m, n) float32 logits of a small-temperature clustering head (soft k-means/GMM heads reach
    them): per batch element, a saturated row (randn·1e4: a one-hot softmax), a row with two tied
    maxima at 2e4, rows offset by ±1e4 and 3e3 with O(1) spread (ordinary softmaxes whose logsumexp
    is ~1e4, where a float32 ulp is 1e-3), and ordinary rows (randn)."""
    logits = torch.randn(b, m, n, device=device)
    logits[:, 0] *= 1e4
    logits[:, 1] *= 1e4
    logits[:, 1, 3] = logits[:, 1, n - 2] = 2e4
    for row, offset in zip(range(2, m - 1), (1e4, -1e4, 3e3), strict=False):
        logits[:, row] = offset + 2 * logits[:, row]
    return logits


def _rel_err(got: torch.Tensor, exact: torch.Tensor) -> float:
    """max |got − exact| / max |exact| (float64)."""
    return float((got.detach().double() - exact.detach()).abs().max() / exact.detach().abs().max().clamp_min(1e-300))


@pytest.mark.parametrize("name", BACKEND_NAMES)
def test_pool_saturated_softmax_backward_as_accurate_as_torch(name):
    """Logits of ~1e4 (saturated, tied, offset and ordinary rows; saturated_logits): the output and
    every gradient against float64 autograd within a small multiple of the error of fp32 PyTorch
    autograd on the same composition (the reference backend in fp32). Recomputing S from an fp32
    lse instead gave dlogits/dx 2e-4..5e-4 relative error (|lse|·2⁻²⁴) against PyTorch's ~1e-7."""
    _, device = use(name)
    b, m, n, c = 2, 6, 40, 16
    inp = make_cluster_pool_inputs(b, m, n, c, device=device, requires_grad=True)
    with torch.no_grad():
        inp.logits.copy_(saturated_logits(b, m, n, device))
    args = (inp.logits, inp.x, inp.weight, inp.bias)
    grad_out = torch.randn(b, m, c, device=device)
    out, got = grads(run(name), args, grad_out)
    ref_out, ref = grads(reference.cluster_pool, [t.detach().clone().requires_grad_(True) for t in args], grad_out)
    exact_out, exact = grads(reference.cluster_pool, [t.detach().double().requires_grad_(True) for t in args],
                             grad_out.double())
    for gname, g, r, e in zip(("out", *GRAD_NAMES), (out, *got), (ref_out, *ref), (exact_out, *exact), strict=True):
        err, torch_err = _rel_err(g, e), _rel_err(r, e)
        # 4× PyTorch's own fp32 error, and a floor of a few fp32 ulps for a tensor PyTorch happens to get exact.
        assert err <= 4 * torch_err + 5e-7, f"{gname}: relative error {err:.2e}, fp32 PyTorch's {torch_err:.2e}"


LN_RANGE_CASES = [
    # x ~ 1e20 and 1e35: the pooled rows' squares overflow float32 (var = inf made rstd = 0: the output was
    # exactly the bias, finite and wrong; F.layer_norm gives NaN). x ~ 1e-22 with a negligible eps (1e-60):
    # the squares fall into the subnormals (var lost ~10%). Each against float64.
    pytest.param(name, scale, eps, id=f"{name}-x{scale:.0e}-eps{eps:.0e}")
    for name in BACKEND_NAMES
    for scale, eps in ((1e20, 1e-6), (1e35, 1e-6), (1e-22, 1e-60), (1e-20, 1e-6))
]


@pytest.mark.parametrize(("name", "scale", "eps"), LN_RANGE_CASES)
def test_pool_layer_norm_of_huge_and_tiny_rows(name, scale, eps):
    """The LayerNorm of pooled rows far outside float32's squarable range: the true, finite LayerNorm
    and its gradients on every backend (each row is scaled by a power of two before its statistics,
    reference.layer_norm_stats), against F.layer_norm and autograd in float64."""
    _, device = use(name)
    b, m, n, c = 2, 3, 6, 8
    inp = make_cluster_pool_inputs(b, m, n, c, device=device, requires_grad=True)
    with torch.no_grad():
        inp.x.mul_(scale)
        inp.bias.mul_(0.1)  # a bias as large as the normalised values would hide a wrong x̂
    args = (inp.logits, inp.x, inp.weight, inp.bias)
    grad_out = torch.randn(b, m, c, device=device)

    def oracle(logits, x, w, bias):  # float64, independent of the library's LayerNorm
        return torch.nn.functional.layer_norm(torch.softmax(logits, -1) @ x, (c,), w, bias, eps)

    out, got = grads(lambda *a: run(name)(*a, eps), args, grad_out)
    exact_out, exact = grads(oracle, [t.detach().double().requires_grad_(True) for t in args], grad_out.double())
    assert torch.isfinite(out).all()
    for gname, g, e in zip(("out", *GRAD_NAMES), (out, *got), (exact_out, *exact), strict=True):
        err = _rel_err(g, e)
        assert err <= 2e-5, f"{gname}: relative error {err:.2e} at x ~ {scale:.0e}"


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # Triton's interpreter: NumPy's 0/0 and log(0)
@pytest.mark.parametrize("name", KERNELS)
def test_pool_all_masked_row_is_nan_like_softmax(name):
    use(name)
    fwd, _ = raw_ops(name)
    inp = make_cluster_pool_inputs(1, 3, 40, 8, device=backend_device(name), affine=False)
    inp.logits[0, 2] = -math.inf
    out, pooled, stats = fwd(inp.logits, inp.x, None, None, 1e-6)
    assert torch.isnan(pooled[0, 2]).all() and torch.isnan(out[0, 2]).all()
    assert stats[0, 2].tolist() == [-math.inf, 0.0]
    assert torch.isfinite(out[0, :2]).all()


@pytest.mark.parametrize("n", [600, 2100], ids=["N600", "N2100"])
@pytest.mark.parametrize("name", KERNELS)
def test_pool_masked_prefix_and_growing_max(name, n):
    """Online-softmax edge cases of the forward: a row whose first tiles (and, at N = 2100, whole
    first split of the cpu kernel) are -inf, so the first finite tile rescales an accumulator that
    is still unwritten; and a row whose max grows tile after tile, so every tile rescales the sums."""
    backend, device = use(name)
    inp = make_cluster_pool_inputs(2, 4, n, 24, device=device)
    logits = inp.logits.clone()
    logits[0, 1, : n - 300] = float("-inf")
    logits[1, 2] = torch.linspace(-20.0, 20.0, n, device=device) + 0.1 * torch.randn(n, device=device)
    with poisoned_outputs():
        got = run(name)(logits, inp.x, inp.weight, inp.bias)
    want = reference.cluster_pool(logits, inp.x, inp.weight, inp.bias)
    assert_close(got, want, **tol(backend, FP32))


SAVED_CASES = [
    pytest.param(name, b, n, id=f"{name}-B{b}-M5-N{n}-C12-fp32")
    # On the cuda backend B = 1 splits N across CTAs, B = 300 fills the GPU in one pass.
    for name, b, n in [*((k, 2, 30) for k in KERNELS), ("cuda", 1, 700), ("cuda", 300, 700)]
]


@pytest.mark.parametrize(("name", "b", "n"), SAVED_CASES)
def test_pool_saved_pooled_and_stats(name, b, n):
    """The forward's saved tensors: pooled = softmax(logits)·x and stats = (row max, Σ exp(logits − max)),
    fp32; the max exactly (the backward's logits − max must be exact)."""
    backend, device = use(name)
    fwd, _ = raw_ops(name)
    inp = make_cluster_pool_inputs(b, 5, n, 12, device=device)
    _, pooled, stats = fwd(inp.logits, inp.x, inp.weight, inp.bias, 1e-6)
    assert pooled.dtype == stats.dtype == torch.float32 and stats.shape == (b, 5, 2)
    assert_close(pooled, torch.softmax(inp.logits, -1) @ inp.x, name="pooled", **tol(backend, FP32))
    row_max = inp.logits.amax(-1)
    assert torch.equal(stats[..., 0], row_max)
    assert_close(stats[..., 1], torch.exp(inp.logits - row_max[..., None]).sum(-1), name="sum", **tol(backend, FP32))


# -- the cpu backward on patch-major logits (the clustering heads' layout) ----------------------------


PATCH_MAJOR_CASES = [
    pytest.param(shape, dtype, id=f"B{shape[0]}-M{shape[1]}-N{shape[2]}-C{shape[3]}-{'fp64' if dtype == torch.float64 else 'fp32'}")
    for shape in [(2, 49, 197, 40), (8, 100, 3136, 96), (1, 3, 7, 5), (2, 100, 300, 30), (3, 17, 600, 33)]
    for dtype in (torch.float32, torch.float64)
]


@pytest.mark.parametrize(("shape", "dtype"), PATCH_MAJOR_CASES)
def test_pool_cpu_patch_major_backward_gives_the_cluster_major_bits(shape, dtype):
    """Logits with unit stride over M (strides (N·M, 1, M)): the backward's patch-major pass returns
    dlogits in that layout, and every gradient has the bits of the cluster-major pass on the same
    values (N = 197, 300, 600, 3136: one and several patch tiles, ragged last tiles; M = 3, 17, 49:
    masked lanes of the per-column exp)."""
    backend = ops.get_backend("cpu")
    require_backend(backend)
    b, m, n, c = shape
    patch_major = (torch.randn(b, n, m, dtype=dtype) * 3).transpose(1, 2)
    cluster_major = patch_major.contiguous()
    x, w, bias = torch.randn(b, n, c, dtype=dtype), torch.randn(c, dtype=dtype), torch.randn(c, dtype=dtype)
    g = torch.randn(b, m, c, dtype=dtype)
    op = torch.ops.paca_kernels
    _, pooled, stats = op.cluster_pool_fwd(cluster_major, x, w, bias, 1e-5)
    with poisoned_outputs():
        got = op.cluster_pool_bwd(g, patch_major, x, w, pooled, stats, 1e-5)
    want = op.cluster_pool_bwd(g, cluster_major, x, w, pooled, stats, 1e-5)
    assert got[0].stride() == (n * m, 1, m) and want[0].is_contiguous()
    for name, a, e in zip(("dlogits", "dx", "dweight", "dbias"), got, want, strict=True):
        assert torch.equal(a, e), name
    # and through the op, against the reference backend
    leaves = [t.clone().requires_grad_() for t in (patch_major, x, w, bias)]
    ref = [t.clone().requires_grad_() for t in (patch_major, x, w, bias)]
    out = ops.cluster_pool(*leaves, backend="cpu")
    grads = torch.autograd.grad(out, leaves, g)
    want_grads = torch.autograd.grad(reference.cluster_pool(*ref), ref, g)
    t = backend.tolerance(dtype, grad=True)
    for name, a, e in zip(("dlogits", "dx", "dweight", "dbias"), grads, want_grads, strict=True):
        assert_close(a, e, name=name, **t)


def test_pool_cpu_patch_major_backward_opcheck():
    require_backend(ops.get_backend("cpu"))
    logits = (torch.randn(2, 13, 5) * 2).transpose(1, 2).requires_grad_()
    x = torch.randn(2, 13, 8, requires_grad=True)
    w, bias = torch.randn(8, requires_grad=True), torch.randn(8, requires_grad=True)
    op = torch.ops.paca_kernels
    torch.library.opcheck(op.cluster_pool_fwd, (logits, x, w, bias, 1e-5))
    _, pooled, stats = op.cluster_pool_fwd(logits.detach(), x.detach(), w.detach(), bias.detach(), 1e-5)
    torch.library.opcheck(op.cluster_pool_bwd, (torch.randn(2, 5, 8), logits.detach(), x.detach(), w.detach(),
                                                pooled, stats, 1e-5))


# -- as a torch.library op --------------------------------------------------------------------------


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("contiguous", [True, False], ids=["contig", "strided"])
@pytest.mark.parametrize("name", KERNELS)
def test_pool_opcheck(name, contiguous, affine):
    _, device = use(name)
    fwd, bwd = raw_ops(name)
    inp = make_cluster_pool_inputs(2, 3, 7, 8, device=device, affine=affine, contiguous=contiguous,
                                   requires_grad=True)
    torch.library.opcheck(fwd, (inp.logits, inp.x, inp.weight, inp.bias, 1e-6))
    out, pooled, stats = fwd(inp.logits, inp.x, inp.weight, inp.bias, 1e-6)
    g = torch.randn_like(out)
    w = inp.weight.detach() if affine else None
    torch.library.opcheck(bwd, (g, inp.logits.detach(), inp.x.detach(), w, pooled, stats, 1e-6))


@pytest.mark.parametrize("name", BACKEND_NAMES)
def test_pool_compiles_fullgraph_forward_and_backward(name):
    backend, device = use(name)
    torch._dynamo.reset()

    def f(logits, x, w, b):
        return ops.cluster_pool(logits, x, w, b, backend=name).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="inductor" if device == "cuda" else "aot_eager")
    a = make_cluster_pool_inputs(2, 4, 10, 16, device=device, requires_grad=True)
    args = (a.logits, a.x, a.weight, a.bias)
    b = clone_leaves(args)
    compiled(*args).backward()
    f(*b).backward()
    for gname, s, d in zip(GRAD_NAMES, args, b, strict=True):
        assert_close(s.grad, d.grad, name=gname, **tol(backend, FP32, grad=True))


EXPORTED = {"cpu": "paca_kernels.cluster_pool_fwd.default", "cuda": "paca_kernels.cluster_pool_fwd.default",
            "triton": "paca_kernels.cluster_pool_fwd_triton.default"}


@pytest.mark.parametrize("name", KERNELS)
def test_pool_export_keeps_the_op(name):
    backend, device = use(name)

    class Pool(torch.nn.Module):
        def forward(self, logits, x):
            return ops.cluster_pool(logits, x, backend=name)

    inp = make_cluster_pool_inputs(1, 3, 6, 32, affine=False, device=device)
    ep = torch.export.export(Pool(), (inp.logits, inp.x))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert EXPORTED[name] in targets
    assert_close(ep.module()(inp.logits, inp.x), Pool()(inp.logits, inp.x), **tol(backend, FP32))


@pytest.mark.parametrize("name", BACKEND_NAMES)
def test_pool_flops_equal_the_unfused_bmm(name):
    """FlopCounterMode counts the fused op as the unfused bmm: 2·BMNC forward, 4·BMNC backward."""
    _, device = use(name)

    def count(affine: bool) -> int:
        inp = make_cluster_pool_inputs(2, 5, 12, 8, device=device, affine=affine, requires_grad=True)
        return count_flops(lambda: run(name)(inp.logits, inp.x, inp.weight, inp.bias).sum().backward())

    logits = torch.randn(2, 5, 12, device=device, requires_grad=True)
    x = torch.randn(2, 12, 8, device=device, requires_grad=True)
    unfused = count_flops(lambda: torch.bmm(torch.softmax(logits, -1), x).sum().backward())
    assert count(True) == count(False) == unfused == 6 * 2 * 5 * 12 * 8


# -- empty inputs -----------------------------------------------------------------------------------

EMPTY_SHAPES = {"B0": (0, 3, 5, 8), "M0": (2, 0, 5, 8), "C0": (2, 3, 5, 0), "B0-C0": (0, 3, 5, 0)}


@pytest.mark.parametrize("shape", EMPTY_SHAPES.values(), ids=EMPTY_SHAPES.keys())
@pytest.mark.parametrize("name", [*BACKEND_NAMES, None], ids=[*BACKEND_NAMES, "auto"])
def test_pool_empty_inputs_agree_on_every_backend(name, shape):
    """B = 0, M = 0 or C = 0: every backend (and the automatic choice) returns what the reference does,
    forward and backward: an empty (B, M, C) output; dlogits 0 (with C = 0 nothing reaches the logits),
    dx 0 (with M = 0 no cluster reads x), dweight and dbias 0 (no row)."""
    device = backend_device(name) if name is not None else "cpu"
    if name is not None:
        use(name)
    b, m, n, c = shape
    inp = make_cluster_pool_inputs(b, m, n, c, device=device, requires_grad=True)
    args = (inp.logits, inp.x, inp.weight, inp.bias)
    grad_out = torch.randn(b, m, c, device=device)
    out, got = grads(lambda *a: ops.cluster_pool(*a, backend=name), args, grad_out)
    want, ref = grads(reference.cluster_pool, clone_leaves(args), grad_out)
    assert out.shape == want.shape == (b, m, c) and out.dtype == want.dtype
    for gname, g, r in zip(GRAD_NAMES, got, ref, strict=True):
        assert g.shape == r.shape and g.dtype == r.dtype, gname
        assert torch.equal(g, torch.zeros_like(r)) and torch.equal(r, torch.zeros_like(r)), gname


@pytest.mark.parametrize("name", [*BACKEND_NAMES, None], ids=[*BACKEND_NAMES, "auto"])
def test_pool_no_patches_is_a_value_error_on_every_backend(name):
    """N = 0: a softmax over no patches is undefined (0/0, like an all -inf row); every backend refuses
    it with the same ValueError, before dispatch (the C++ kernels refused it with a RuntimeError while
    the reference and Triton returned the bias)."""
    device = backend_device(name) if name is not None else "cpu"
    if name is not None:
        use(name)
    for b, m, c in ((2, 3, 8), (0, 3, 8), (2, 0, 8), (2, 3, 0)):
        logits, x = torch.randn(b, m, 0, device=device), torch.randn(b, 0, c, device=device)
        with pytest.raises(ValueError, match=r"at least one patch \(N >= 1\)"):
            ops.cluster_pool(logits, x, backend=name)


# -- dispatch ---------------------------------------------------------------------------------------

# Where each backend's declared limits (devices, dtypes, on-chip sizes) refuse a call, and the words
# its reason uses. Meta tensors: no memory, and the limits read metadata only.
REFUSALS = [
    ("cpu", "device", {"device": "meta"}, "does not run on meta"),
    ("triton", "dtype", {"dtype": FP64}, "does not support float64"),
    ("triton", "channels", {"C": 2048}, "C = 2048"),
    ("cuda", "dtype", {"dtype": FP64}, "does not support float64"),
    ("cuda", "channels", {"C": 2048}, "C = 2048"),
    ("cuda", "device", {"device": "cpu"}, "does not run on cpu"),
]


@pytest.mark.parametrize(("name", "what", "change", "words"), REFUSALS, ids=[f"{r[0]}-{r[1]}" for r in REFUSALS])
def test_pool_dispatch_errors_give_each_backends_reason(name, what, change, words):
    backend = ops.get_backend(name)
    dims = {"B": 1, "M": 2, "N": 3, "C": 8, "dtype": FP32, "device": "meta", **change}
    device = dims.pop("device")
    inp = make_cluster_pool_inputs(dims["B"], dims["M"], dims["N"], dims["C"], dtype=dims["dtype"],
                                   device=device, affine=False)
    check_refusal(backend, OP, ops.cluster_pool, (inp.logits, inp.x), words)


@pytest.mark.parametrize("name", BACKEND_NAMES)
def test_pool_named_backend_serves_the_call(name):
    backend, device = use(name)
    inp = make_cluster_pool_inputs(1, 3, 5, 8, device=device)
    require_backend(backend, OP, (inp.logits, inp.x))
    assert ops.select_backend(OP, (inp.logits, inp.x), name) is backend
    out = ops.cluster_pool(inp.logits, inp.x, inp.weight, inp.bias, backend=name)
    assert_close(out, reference.cluster_pool(inp.logits, inp.x, inp.weight, inp.bias), **tol(backend, FP32))


def _pool_inputs() -> dict[str, torch.Tensor | None]:
    return {"logits": torch.randn(2, 4, 12), "x": torch.randn(2, 12, 8),
            "weight": torch.randn(8), "bias": torch.randn(8)}


@pytest.mark.parametrize(("change", "exc", "match"), [
    pytest.param({"logits": torch.randn(4, 12)}, ValueError, r"logits must have shape \(B, M, N\)",
                 id="logits-2d"),
    pytest.param({"x": torch.randn(2, 12, 8, 1)}, ValueError, r"x must have shape \(B, N, C\)", id="x-4d"),
    pytest.param({"x": torch.randn(3, 12, 8)}, ValueError, r"disagree on B or N", id="B-mismatch"),
    pytest.param({"x": torch.randn(2, 11, 8)}, ValueError, r"disagree on B or N", id="N-mismatch"),
    pytest.param({"weight": torch.randn(7)}, ValueError, r"weight must have shape \(C,\) = \(8,\)",
                 id="weight-size"),
    pytest.param({"bias": torch.randn(8, 1)}, ValueError, r"bias must have shape \(C\)", id="bias-2d"),
    pytest.param({"logits": torch.randint(0, 3, (2, 4, 12))}, TypeError, r"logits must be a floating",
                 id="int-logits"),
    pytest.param({"x": torch.ones(2, 12, 8, dtype=torch.int64)}, TypeError, r"floating", id="int-x"),
    pytest.param({"logits": torch.randn(2, 4, 12, dtype=torch.float64)}, TypeError, r"same dtype",
                 id="mixed-dtypes"),
    pytest.param({"x": torch.randn(2, 12, 8, device="meta"), "weight": None, "bias": None}, ValueError,
                 r"same device, got logits on cpu, x on meta", id="x-on-meta"),
    pytest.param({"x": torch.randn(2, 12, 8, device="meta")}, ValueError, r"weight is on cpu but x is on meta",
                 id="x-on-meta-affine"),
    pytest.param({"weight": torch.randn(8, device="meta")}, ValueError, r"weight is on meta",
                 id="weight-on-meta"),
])
def test_pool_bad_input_is_refused_before_dispatch(change: dict, exc: type, match: str) -> None:
    args = _pool_inputs() | change
    with pytest.raises(exc, match=match):
        ops.cluster_pool(args["logits"], args["x"], args["weight"], args["bias"], 1e-6)


# -- past 2^31 elements (GPU only: ~9 GB of inputs) ---------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["triton", "cuda"])
def test_pool_index_arithmetic_past_2_pow_31(name):
    _backend, device = use(name)
    m, c = 8, 64
    n = 2**31 // c + 4099  # x and dx hold more than 2^31 elements
    x = torch.randn(1, n, c, device=device, dtype=torch.bfloat16).requires_grad_(True)
    logits = torch.full((1, m, n), float("-inf"), device=device, dtype=torch.bfloat16)
    logits[..., -5:] = torch.randn(1, m, 5, device=device, dtype=torch.bfloat16)  # mass only at the end
    logits.requires_grad_(True)
    out = run(name)(logits, x)
    xt = x.detach()[:, -5:].float().requires_grad_(True)
    lt = logits.detach()[..., -5:].float().requires_grad_(True)
    want = reference.cluster_pool(lt, xt)
    assert_close(out.float(), want, rtol=2e-2, atol=2e-2)
    if name == "cuda":  # the triton backward's index arithmetic past 2^31 is not claimed
        g = torch.randn_like(out)
        out.backward(g)
        want.backward(g.float())
        assert_close(x.grad[:, -5:].float(), xt.grad, rtol=3e-2, atol=3e-2)
        assert_close(logits.grad[..., -5:].float(), lt.grad, rtol=3e-2, atol=3e-2)
        assert not x.grad[:, :-5].any()  # zero weight elsewhere


# -- property test ----------------------------------------------------------------------------------

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies
MAX_EXAMPLES = int(os.environ.get("PACA_KERNELS_HYPOTHESIS_MAX", "10"))


@pytest.mark.parametrize("name", KERNELS)
@hypothesis.settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True)
@hypothesis.given(
    b=st.integers(1, 2), n=st.integers(1, 70), m=st.integers(1, 40), c=st.sampled_from([8, 16, 24, 40, 80]),
    contiguous=st.booleans(), seed=st.integers(0, 2**16),
)  # fmt: skip
def test_pool_property_matches_reference(name, b, n, m, c, contiguous, seed):
    backend, device = use(name)
    torch.manual_seed(seed)
    cp = make_cluster_pool_inputs(b, m, n, c, device=device, contiguous=contiguous, requires_grad=True)
    args = (cp.logits, cp.x, cp.weight, cp.bias)
    g = torch.randn(b, m, c, device=device)
    got, got_g = grads(run(name), args, g)
    want, want_g = grads(reference.cluster_pool, clone_leaves(args), g)
    assert_close(got, want, **tol(backend, FP32))
    for gname, a, e in zip(GRAD_NAMES, got_g, want_g, strict=True):
        assert_close(a, e, name=gname, **tol(backend, FP32, grad=True))
