"""p2c_attention on every backend (reference, cpu, triton, cuda) against the reference.

One test body per check, parametrized over the backends, with the tolerances each backend declares
(``ops.get_backend(name).tolerance(dtype, grad=...)``) and FlashAttention's rule for fp16/bf16
(``low_precision_factor``). A case its backend cannot run skips with that backend's own reason. Triton
runs on the GPU where there is one, else in its CPU interpreter (conftest sets TRITON_INTERPRET=1).
Backend-only cases (CUDA grid strides, CPU thread counts and ISA builds, the Triton compiler) are in
tests/backends/.
"""

from __future__ import annotations

import importlib
import os
from typing import NamedTuple

import pytest
import torch
from torch import Tensor

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
    make_p2c_inputs,
    max_error,
    poisoned_outputs,
    require_backend,
    shape_id,
)

OP = "p2c_attention"
GRAD_NAMES = ("dq", "dk", "dv")
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
    """p2c_attention through the backend ``name`` (differentiable)."""
    return lambda q, k, v, scale=None: ops.p2c_attention(q, k, v, scale, backend=name)


def raw_ops(name: str):
    """(forward, backward) raw ops of a backend: forward (q, k, v, scale) -> (out, lse fp32); backward
    (grad_out, q, k, v, scale, deterministic) -> (dq, dk, dv), ``deterministic``: fixed-order dk/dv
    reduction."""
    if name == "triton":
        return torch.ops.paca_kernels.p2c_attention_fwd_triton, torch.ops.paca_kernels.p2c_attention_bwd_triton
    return torch.ops.paca_kernels.p2c_attention_fwd, torch.ops.paca_kernels.p2c_attention_bwd


def tol(backend: ops.Backend, dtype: torch.dtype, *, grad: bool = False) -> dict[str, float]:
    return backend.tolerance(dtype, grad=grad)


def p2c_id(name: str, shape, dtype=FP32, contiguous: bool = True) -> str:
    b, n, m, h, d = shape
    return f"{name}-{shape_id(B=b, N=n, M=m, H=h, D=d)}{'' if contiguous else '-strided'}-{dtype_id(dtype)}"


# -- forward and every gradient ---------------------------------------------------------------------


class Case(NamedTuple):
    backend: str
    shape: tuple[int, int, int, int, int]  # (B, N, M, h, d)
    contiguous: bool = True
    dtype: torch.dtype = FP32


# Every backend: N in {1, 7, 33, 197}, M in {1, 3, 17, 49, 100}, d in {8, 24, 40, 48, 64}, B in
# {1, 2, 3}, the limits M = 256 and d = 128, and non-power-of-two N/M around one tile; contiguous, and
# strided (q a view of a wider layout, k and v interleaved as from one linear).
COMMON = [
    ((1, 1, 1, 1, 8), True),
    ((2, 7, 3, 2, 24), True),
    ((2, 197, 49, 3, 24), False),
    ((3, 7, 100, 1, 40), True),
    ((1, 197, 100, 2, 48), False),
    ((2, 1, 49, 2, 64), False),
    ((3, 197, 3, 1, 64), True),
    ((1, 7, 256, 1, 128), False),
    ((1, 33, 17, 2, 8), True),
    ((2, 7, 1, 1, 40), False),
]
# The cpu backend is cheap to run: more shapes, each contiguous and strided (N = 300 and 600: several
# query blocks; M = 49 and 100 with d = 40/48/64; odd d = 33 and 47 with M = 29 and 16: the AVX-512
# 3-vector tiles with 1 and 15 lanes of their last vector, a softmax row whose last 16 lanes are
# partly past M (29) and one with none (16)).
CPU_SHAPES = [(1, 1, 1, 1, 8), (2, 7, 3, 2, 24), (1, 7, 49, 3, 40), (3, 197, 3, 2, 48), (2, 197, 49, 3, 24),
              (2, 197, 100, 2, 48), (1, 197, 100, 1, 64), (3, 1, 100, 2, 8), (2, 300, 1, 1, 40),
              (1, 600, 49, 2, 64), (2, 61, 29, 3, 33), (1, 50, 16, 2, 47)]
# The cuda backend: padding of M and d (to 16 / 4), one partial query tile, several key chunks.
CUDA_SHAPES = [((2, 197, 49, 2, 40), True), ((1, 300, 256, 2, 128), True)]

CASES = (
    [Case(b, s, c, dt) for b in BACKEND_NAMES for dt in (FP32, FP64) for s, c in COMMON]
    + [Case("cpu", s, c) for s in CPU_SHAPES for c in (True, False)]
    + [Case("cuda", s, c) for s, c in CUDA_SHAPES]
)


@pytest.mark.parametrize("case", CASES, ids=lambda c: p2c_id(c.backend, c.shape, c.dtype, c.contiguous))
def test_p2c_matches_reference(case: Case):
    """Forward and every gradient, with NaN-filled allocations (an unwritten output shows as NaN)."""
    backend, device = use(case.backend)
    b, n, m, h, d = case.shape
    inp = make_p2c_inputs(b, n, m, h, d, dtype=case.dtype, device=device, contiguous=case.contiguous,
                          requires_grad=True)
    args = (inp.q, inp.k, inp.v)
    require_backend(backend, OP, args)
    scale = d**-0.5
    grad_out = torch.randn(b, n, h, d, device=device, dtype=case.dtype)
    check_matches_reference(lambda *t: run(case.backend)(*t, scale), lambda *t: reference.p2c_attention(*t, scale),
                            args, grad_out, GRAD_NAMES, tol(backend, case.dtype), tol(backend, case.dtype, grad=True))


LOW_CASES = [
    pytest.param(name, shape, dtype, id=p2c_id(name, shape, dtype))
    for name, shape in [*((b, (2, 37, 20, 2, 40)) for b in BACKEND_NAMES), ("cpu", (2, 197, 49, 2, 48)),
                        ("cpu", (1, 50, 7, 2, 24)), ("cuda", (2, 197, 49, 3, 24)),
                        ("cuda", (1, 197, 100, 2, 48)), ("cuda", (1, 70, 256, 1, 128))]
    for dtype in LOW
]


@pytest.mark.parametrize(("name", "shape", "dtype"), LOW_CASES)
def test_p2c_low_precision_within_flash_attention_rule(name, shape, dtype):
    """fp16/bf16 (the cuda backend: tensor cores): error against float64 at most
    ``low_precision_factor`` times the PyTorch reference's own error in that dtype, output and every
    gradient."""
    backend, device = use(name)
    b, n, m, h, d = shape
    inp = make_p2c_inputs(b, n, m, h, d, device=device, dtype=dtype, requires_grad=True)
    args = (inp.q, inp.k, inp.v)
    require_backend(backend, OP, args)
    grad_out = torch.randn(b, n, h, d, device=device).to(dtype)
    check_low_precision(run(name), reference.p2c_attention, args, grad_out, GRAD_NAMES, backend.low_precision_factor)


STRIDE0_CASES = [
    pytest.param(name, shape, id=p2c_id(name, shape))
    for name, shape in [*((b, (2, 40, 20, 2, 24)) for b in BACKEND_NAMES), ("cpu", (2, 13, 5, 2, 8)),
                        ("cuda", (2, 200, 20, 2, 24))]
]


@pytest.mark.parametrize(("name", "shape"), STRIDE0_CASES)
def test_p2c_stride0_grad_poisoned_outputs_and_bitwise_deterministic(name, shape):
    """out.sum().backward() gives an expanded (stride-0) upstream gradient; NaN-filled allocations
    catch unwritten outputs; with deterministic algorithms on (poisoned_outputs turns them on), dk/dv
    go through the fixed-order reduction and repeat bitwise."""
    backend, device = use(name)
    inp = make_p2c_inputs(*shape, device=device, requires_grad=True)
    check_grads_repeat_bitwise(run(name), reference.p2c_attention, (inp.q, inp.k, inp.v), GRAD_NAMES,
                               tol(backend, FP32, grad=True))


DETERMINISTIC_CASES = [
    pytest.param(name, shape, dtype, id=p2c_id(name, shape, dtype))
    for name, shape, dtype in [
        ("cpu", (2, 1000, 49, 2, 24), FP32),
        ("triton", (1, 197, 7, 2, 16), FP32),
        # (B, h) of 1, a few and many query tiles per deterministic group.
        *(("cuda", (b, 1000, 49, h, 40), dt) for b, h in ((1, 1), (2, 3), (64, 4))
          for dt in (FP32, torch.bfloat16)),
    ]
]


@pytest.mark.parametrize(("name", "shape", "dtype"), DETERMINISTIC_CASES)
def test_p2c_deterministic_backward_matches_atomics_and_repeats_bitwise(name, shape, dtype):
    """The raw backward with ``deterministic=True`` (group partials summed in a fixed order) against
    ``deterministic=False`` (fp32 atomics where the backend uses them), and bitwise across runs."""
    backend, device = use(name)
    _, bwd = raw_ops(name)
    inp = make_p2c_inputs(*shape, device=device, dtype=dtype)
    g = torch.randn_like(inp.q)
    atomic = bwd(g, inp.q, inp.k, inp.v, 0.25, False)
    det = [bwd(g, inp.q, inp.k, inp.v, 0.25, True) for _ in range(3)]
    t = tol(backend, FP32) if dtype == FP32 else {"rtol": 2e-2, "atol": 2e-2}
    for gname, a, d0, d1, d2 in zip(GRAD_NAMES, atomic, *det, strict=True):
        assert_close(d0, a, name=gname, **t)
        assert torch.equal(d0, d1) and torch.equal(d0, d2)


@pytest.mark.parametrize("name", BACKEND_NAMES)
def test_p2c_backward_against_float64(name):
    """float64 gradcheck (contiguous and strided) where the backend runs float64; otherwise its
    float32 gradients against autograd of the float64 reference."""
    backend, device = use(name)
    if FP64 in backend.dtypes:
        for shape, contiguous in (((2, 5, 3, 2, 4), True), ((1, 4, 2, 1, 3), False)):
            p = make_p2c_inputs(*shape, dtype=FP64, device=device, requires_grad=True, contiguous=contiguous)
            assert torch.autograd.gradcheck(lambda q, k, v: run(name)(q, k, v, 0.7), (p.q, p.k, p.v))
        return
    inp = make_p2c_inputs(2, 5, 3, 2, 8, device=device, requires_grad=True)
    args = (inp.q, inp.k, inp.v)
    grad_out = torch.randn(2, 5, 2, 8, device=device)
    _, got_g = grads(run(name), args, grad_out)
    _, exact_g = grads(reference.p2c_attention, [t.detach().double().requires_grad_(True) for t in args],
                       grad_out.double())
    for gname, g, e in zip(GRAD_NAMES, got_g, exact_g, strict=True):
        assert_close(g.double(), e, rtol=1e-5, atol=1e-6, name=gname)


@pytest.mark.parametrize("name", BACKEND_NAMES)
def test_p2c_large_scores_stay_finite(name):
    """Scaled scores q·kᵀ of order ±1e4: the softmax's running max keeps everything finite."""
    _backend, device = use(name)
    inp = make_p2c_inputs(1, 20, 6, 2, 16, device=device, requires_grad=True)
    q = (inp.q.detach() * 1e3).requires_grad_(True)
    out = run(name)(q, inp.k, inp.v, 1.0)
    out.sum().backward()
    assert torch.isfinite(out).all()
    for t in (q, inp.k, inp.v):
        assert torch.isfinite(t.grad).all()
    assert_close(out, reference.p2c_attention(q, inp.k, inp.v, 1.0), rtol=1e-4, atol=1e-4)


# -- scores of order 1e4: the backward's softmax as accurate as PyTorch's ------------------------------

#: The scale of the large-score cases: the inputs carry it (q in multiples of 1/64, k integers), so that
#: the scores are exact in fp32 and fp16 never holds an unscaled product.
LARGE_SCALE = 1.0


def large_score_inputs(b, n, m, h, d, *, dtype=FP32, device="cpu", kind="mixed"):
    """q (B, N, h, d), k, v (B, M, h, d) with scores q·kᵀ of order 1e4, M >= 3: k integers, q integers
    over 64, every partial sum of q·kᵀ a multiple of 1/64 below 2¹⁸, so the scores are exact in fp32 (also
    from the bf16/fp16-rounded inputs): the kernels and PyTorch start from the same scores, and what
    differs is how each forms P and dS from them.

    kind "mixed" cycles the rows (over n) through three kinds: a near-tie at s ~ 2·10⁴ between keys 0, 1
    and 2 (k₁ = k₀ and k₂ = k₀ + e₀, q = 8·k₀ + noise with |q₀| <= 64, so the gaps are <= 1: P spread
    over three keys, where an fp32 lse's rounding, ulp(2·10⁴)/2 ≈ 1e-3, is a 1e-3 relative error of
    every P); a saturated row (random |q| <= 2048: |s| ~ 10⁴, one key takes P = 1 and the others
    underflow); an ordinary row (|q| <= 4: |s| ~ 10). kind "saturated": random keys, every row
    saturated on key 0 (q = 8·k₀ + noise; the runner-up trails by thousands, far past exp's underflow
    even in float64, so the true dq and dk are exactly 0).
    """
    k = torch.randint(-128, 129, (b, m, h, d)).float()
    if kind == "saturated":
        # s₀ − s_m = (8·(|k₀|² − k₀·k_m) + noise·(k₀ − k_m))/64 ~ 2·10⁴ for random k_m ≠ k₀.
        q = 8 * k[:, :1].expand(b, n, h, d) + torch.randint(-8, 9, (b, n, h, d))
    else:
        k[:, 1] = k[:, 0]
        k[:, 2] = k[:, 0]
        k[:, 2, :, 0] += 1
        near = 8 * k[:, :1].expand(b, n, h, d) + torch.randint(-8, 9, (b, n, h, d))
        near[..., 0] = torch.randint(-64, 65, (b, n, h)).float()
        rows = torch.arange(n).view(1, n, 1, 1) % 3
        q = torch.where(rows == 0, near,
                        torch.where(rows == 1, torch.randint(-2048, 2049, (b, n, h, d)).float(),
                                    torch.randint(-4, 5, (b, n, h, d)).float()))
    v = torch.randn(b, m, h, d)
    return [t.to(device=device, dtype=dtype).requires_grad_(True) for t in (q / 64, k, v)]


def gradient_errors(name, inputs, grad_out, scale=LARGE_SCALE):
    """(kernel's error, the reference composition's error in the inputs' dtype), both against the
    float64 reference, per gradient (max |·| over the elements), and the float64 gradients."""
    _, got = grads(lambda *t: run(name)(*t, scale), inputs, grad_out)
    _, low = grads(lambda *t: reference.p2c_attention(*t, scale), clone_leaves(inputs), grad_out)
    _, exact = grads(lambda *t: reference.p2c_attention(*t, scale),
                     [t.detach().double().requires_grad_(True) for t in inputs], grad_out.double())
    for g in got:
        assert g.dtype == inputs[0].dtype
    return [(max_error(a, e), max_error(lo, e)) for a, lo, e in zip(got, low, exact, strict=True)], exact


#: fp32 gradients at large scores: error against float64 at most this times fp32 PyTorch autograd's own.
#: Measured on the cases below (scores exact, so both errors are the roundings of forming P, dS and their
#: products): cpu at most 1.9x (dq 4.7e-4 against 2.5e-4, |dq| up to 1.1e3), the Triton interpreter 1.04x;
#: the former backward (P = exp(s − lse) from an fp32 lse, D = rowsum(dO ∘ O)) 10-2000x (dk 0.30 against
#: 1.5e-4, dv 5.8e-3 against 2.1e-6).
LARGE_FP32_FACTOR = 2.0

LARGE_SHAPES = [(2, 197, 49, 2, 40), (1, 1, 7, 1, 24), (1, 33, 3, 3, 12)]


@pytest.mark.parametrize("m", [13, 16, 29, 100])
def test_p2c_cpu_nonfinite_rows_propagate_as_in_reference(m):
    """A NaN and an inf in q: their score rows give NaN (torch.softmax's rule) in the forward and in
    the backward's softmax rows, exactly where the reference has them, every other value matching;
    M = 13, 16, 29, 100 put the row's end at every kind of vector edge."""
    backend, device = use("cpu")
    inp = make_p2c_inputs(2, 11, m, 2, 33, device=device, requires_grad=True)
    with torch.no_grad():
        inp.q[0, 3, 1, 0] = float("nan")
        inp.q[1, 5, 0, 2] = float("inf")
    grad_out = torch.randn(2, 11, 2, 33, device=device)
    got, got_g = grads(lambda *t: run("cpu")(*t, 33**-0.5), (inp.q, inp.k, inp.v), grad_out)
    want, want_g = grads(lambda *t: reference.p2c_attention(*t, 33**-0.5), clone_leaves((inp.q, inp.k, inp.v)),
                         grad_out)
    assert want.isnan().any() and not want.isnan().all()  # the premise: some rows NaN, not all
    for gname, g, w in zip(("out", *GRAD_NAMES), (got, *got_g), (want, *want_g), strict=True):
        assert torch.equal(g.isnan(), w.isnan()), gname
        assert_close(g, w, name=gname, **tol(backend, FP32, grad=gname != "out"))


@pytest.mark.parametrize(("name", "shape"), [
    pytest.param(b, s, id=p2c_id(b, s)) for b in BACKEND_NAMES for s in LARGE_SHAPES
])
def test_p2c_backward_at_large_scores_as_accurate_as_fp32_autograd(name, shape):
    """Scores of order 1e4 (near-ties, saturated and ordinary rows; N = 1; odd N, M, d): every fp32
    gradient within LARGE_FP32_FACTOR times fp32 PyTorch autograd's error against float64 (plus 1e-6
    of the gradient's scale), so exactly 0 error where PyTorch has none."""
    backend, device = use(name)
    inputs = large_score_inputs(*shape, device=device)
    require_backend(backend, OP, inputs)
    grad_out = torch.randn(shape[0], shape[1], shape[3], shape[4], device=device)
    errors, exact = gradient_errors(name, inputs, grad_out)
    for gname, (err, ref_err), e in zip(GRAD_NAMES, errors, exact, strict=True):
        bound = LARGE_FP32_FACTOR * ref_err + 1e-6 * float(e.abs().max())
        assert err <= bound, f"{gname}: error {err:.3g} > {bound:.3g} (fp32 autograd's error: {ref_err:.3g})"


@pytest.mark.parametrize(("name", "shape"), [
    pytest.param(b, s, id=p2c_id(b, s)) for b in BACKEND_NAMES for s in [(1, 1, 7, 1, 24), (2, 1, 49, 2, 40)]
])
def test_p2c_backward_saturated_rows_give_exactly_zero_dq_dk(name, shape):
    """Every row saturated (|s| ~ 2·10⁴, one key takes P = 1): the true dq and dk are exactly 0, and so is
    what fp32 PyTorch autograd computes (its P is exactly one-hot); the kernels too, with N = 1."""
    backend, device = use(name)
    inputs = large_score_inputs(*shape, device=device, kind="saturated")
    require_backend(backend, OP, inputs)
    grad_out = torch.randn(shape[0], shape[1], shape[3], shape[4], device=device)
    _, got = grads(lambda *t: run(name)(*t, LARGE_SCALE), inputs, grad_out)
    _, want = grads(lambda *t: reference.p2c_attention(*t, LARGE_SCALE), clone_leaves(inputs), grad_out)
    for gname, g, w in zip(GRAD_NAMES[:2], got[:2], want[:2], strict=True):
        assert torch.equal(w, torch.zeros_like(w)), gname  # the premise: PyTorch's is exactly 0
        assert torch.equal(g, torch.zeros_like(g)), f"{gname}: max |{gname}| = {float(g.abs().max()):.3g}, want 0"
    assert_close(got[2], want[2], name="dv", **tol(backend, FP32, grad=True))


LARGE_LOW_CASES = [
    pytest.param(b, shape, kind, dtype, id=f"{p2c_id(b, shape, dtype)}-{kind}")
    for b in BACKEND_NAMES
    for shape, kind in [((2, 197, 49, 2, 40), "mixed"), ((1, 1, 7, 1, 24), "mixed"),
                        ((1, 1, 7, 1, 24), "saturated")]
    for dtype in LOW
]


@pytest.mark.parametrize(("name", "shape", "kind", "dtype"), LARGE_LOW_CASES)
def test_p2c_low_precision_large_scores_within_flash_attention_rule(name, shape, kind, dtype):
    """fp16/bf16 at scores of order 1e4, FlashAttention's rule on every gradient (error against float64
    at most ``low_precision_factor`` times the reference composition's own error in that dtype), with
    no absolute floor: with N = 1 and a saturated row the true dq and dk are 0 and so is the reference's,
    so the kernel's must be exactly 0."""
    backend, device = use(name)
    inputs = large_score_inputs(*shape, device=device, dtype=dtype, kind=kind)
    require_backend(backend, OP, inputs)
    grad_out = torch.randn(shape[0], shape[1], shape[3], shape[4], device=device).to(dtype)
    errors, _ = gradient_errors(name, inputs, grad_out)
    for gname, (err, ref_err) in zip(GRAD_NAMES, errors, strict=True):
        bound = backend.low_precision_factor * ref_err
        assert err <= bound, f"{gname}: error {err:.3g} > {bound:.3g} (the {dtype} reference's: {ref_err:.3g})"


SMALL_N1_CASES = [pytest.param(b, dtype, id=f"{b}-{dtype_id(dtype)}") for b in BACKEND_NAMES for dtype in LOW]


@pytest.mark.parametrize(("name", "dtype"), SMALL_N1_CASES)
def test_p2c_low_precision_single_query_within_flash_attention_rule(name, dtype):
    """One query (N = 1) against 1 to 7 keys, scores of order 1 to 1e3 (random q, k scaled up): dq and dk
    within FlashAttention's rule (floor 1e-5), where D = rowsum(dO ∘ O) from the rounded output broke it
    (cpu, bf16: dq error 0.012 against the reference's 0.0044). dv = Pᵀ·dO has no D; with one query it is
    a single rounded product per element (the Triton kernel rounds P to bf16 first, as on the GPU), too
    few elements for the rule's statistics, and the other tests hold it."""
    backend, device = use(name)
    for m in (1, 2, 3, 7):
        for mag in (1e0, 1e1, 1e2, 1e3):
            q = torch.randn(1, 1, 1, 24) * mag**0.5
            k = torch.randn(1, m, 1, 24) * mag**0.5
            v = torch.randn(1, m, 1, 24)
            inputs = [t.to(device=device, dtype=dtype).requires_grad_(True) for t in (q, k, v)]
            require_backend(backend, OP, inputs)
            grad_out = torch.randn(1, 1, 1, 24, device=device).to(dtype)
            errors, _ = gradient_errors(name, inputs, grad_out, scale=24**-0.5)
            for gname, (err, ref_err) in zip(GRAD_NAMES[:2], errors[:2], strict=True):
                bound = backend.low_precision_factor * ref_err + 1e-5
                assert err <= bound, f"M={m}, |s| ~ {mag:g}, {gname}: error {err:.3g} > {bound:.3g}"


@pytest.mark.parametrize("name", KERNELS)
def test_p2c_lse_is_logsumexp_of_scores(name):
    backend, device = use(name)
    fwd, _ = raw_ops(name)
    inp = make_p2c_inputs(2, 9, 5, 3, 16, device=device)
    _, lse = fwd(inp.q, inp.k, inp.v, 0.3)
    scores = torch.einsum("bnhd,bmhd->bhnm", inp.q, inp.k) * 0.3
    assert lse.dtype == torch.float32 and lse.shape == (2, 3, 9)
    assert_close(lse, torch.logsumexp(scores, -1), name="lse", **tol(backend, FP32))


# -- the cpu backend's training pair (p2c_attention_saved_fwd / _bwd) ---------------------------

SAVED = torch.ops.paca_kernels


def _cpu_ops() -> None:
    backend, _ = use("cpu")
    require_backend(backend)


SAVED_CASES = [
    pytest.param(shape, contiguous, dtype, id=p2c_id("cpu", shape, dtype, contiguous))
    for shape in [(2, 197, 49, 3, 40), (8, 196, 100, 8, 40), (1, 500, 100, 2, 48), (2, 61, 29, 3, 33),
                  (1, 1, 1, 1, 8), (3, 250, 16, 2, 47)]
    for contiguous in (True, False)
    for dtype in (FP32, FP64, torch.bfloat16)
    if contiguous or dtype == FP32
]


@pytest.mark.parametrize(("shape", "contiguous", "dtype"), SAVED_CASES)
def test_p2c_cpu_saved_pair_gives_the_recomputing_pairs_bits(shape, contiguous, dtype):
    """The saving forward's out is p2c_attention_fwd's, its numerators are exp(s - rowmax s) and their
    sums (against float64), and the backward from them gives p2c_attention_bwd's gradients bit for
    bit (N = 197, 250 and 500: a ragged last query block and several chunks; M = 29 and 49: masked
    row tails; d = 33 and 47)."""
    _cpu_ops()
    b, n, m, h, d = shape
    inp = make_p2c_inputs(b, n, m, h, d, dtype=dtype, contiguous=contiguous)
    inp.q.mul_(3)  # spread the scores: rows far from uniform (in place: q stays a view)
    g = torch.randn(b, n, h, d).to(dtype)
    scale = d**-0.5
    out, lse = SAVED.p2c_attention_fwd(inp.q, inp.k, inp.v, scale)
    with poisoned_outputs():
        out_s, e, sums = SAVED.p2c_attention_saved_fwd(inp.q, inp.k, inp.v, scale)
        grads_s = SAVED.p2c_attention_saved_bwd(g, inp.q, inp.k, inp.v, e, sums, scale)
    grads = SAVED.p2c_attention_bwd(g, inp.q, inp.k, inp.v, scale, True)
    acc = FP64 if dtype == FP64 else FP32
    assert e.dtype == sums.dtype == acc and e.shape == (b, h, n, m) and sums.shape == (b, h, n)
    assert torch.equal(out_s, out)
    for gname, a, r in zip(GRAD_NAMES, grads_s, grads, strict=True):
        assert torch.equal(a, r), gname
    s = torch.einsum("bnhd,bmhd->bhnm", inp.q.double(), inp.k.double()) * scale
    exact = torch.exp(s - s.amax(-1, keepdim=True))
    # fp32: the scores carry ~|s| 2^-24 of rounding into e (up to 4.4e-6 measured at |s| ~ 20)
    rtol = 1e-12 if dtype == FP64 else 1.5e-5
    assert_close(e, exact.to(acc), name="exp_scores", rtol=rtol, atol=rtol)
    assert_close(sums, exact.sum(-1).to(acc), name="exp_sums", rtol=rtol, atol=rtol)
    assert_close(lse, (s.amax(-1) + exact.sum(-1).log()).to(acc), name="lse", rtol=rtol, atol=rtol)


def test_p2c_cpu_training_calls_keep_the_scores_up_to_the_cap(monkeypatch):
    """The cpu backend's one place of choice (``p2c_attention_cpp``): a call that records a backward
    takes the saving forward, up to SAVED_SCORES_MAX_BYTES of numerators, and the recomputing one
    above it or without a gradient; both train to the same bits."""
    _cpu_ops()
    p2c = importlib.import_module("paca_kernels.ops.p2c_attention")

    inp = make_p2c_inputs(2, 33, 17, 2, 24, requires_grad=True)
    g = torch.randn(2, 33, 2, 24)

    def train() -> tuple[str, tuple[Tensor, ...]]:
        out = ops.p2c_attention(inp.q, inp.k, inp.v, backend="cpu")
        return out.grad_fn.name(), torch.autograd.grad(out, (inp.q, inp.k, inp.v), g)

    name_saved, grads_saved = train()
    assert "p2c_attention_saved_fwd" in name_saved
    monkeypatch.setattr(p2c, "SAVED_SCORES_MAX_BYTES", 2 * 33 * 17 * 2 * 4 - 1)  # one byte short
    name_recompute, grads_recompute = train()
    assert "p2c_attention_saved_fwd" not in name_recompute and "p2c_attention_fwd" in name_recompute
    for gname, a, r in zip(GRAD_NAMES, grads_saved, grads_recompute, strict=True):
        assert torch.equal(a, r), gname
    monkeypatch.undo()
    with torch.no_grad():
        assert ops.p2c_attention(inp.q, inp.k, inp.v, backend="cpu").grad_fn is None
    frozen = make_p2c_inputs(2, 33, 17, 2, 24)
    assert ops.p2c_attention(frozen.q, frozen.k, frozen.v, backend="cpu").grad_fn is None


@pytest.mark.parametrize("contiguous", [True, False], ids=["contig", "strided"])
def test_p2c_cpu_saved_pair_opcheck(contiguous):
    _cpu_ops()
    inp = make_p2c_inputs(2, 7, 3, 2, 8, contiguous=contiguous, requires_grad=True)
    torch.library.opcheck(SAVED.p2c_attention_saved_fwd, (inp.q, inp.k, inp.v, 0.35))
    q, k, v = (t.detach() for t in (inp.q, inp.k, inp.v))
    _, e, sums = SAVED.p2c_attention_saved_fwd(q, k, v, 0.35)
    torch.library.opcheck(SAVED.p2c_attention_saved_bwd, (torch.randn_like(q), q, k, v, e, sums, 0.35))


@pytest.mark.parametrize(("what", "bad", "match"), [
    ("exp_scores", lambda e: e[..., :-1], r"expected exp_scores contiguous \(B, h, N, M\)"),
    ("exp_scores", lambda e: e.transpose(2, 3).contiguous().transpose(2, 3), r"not contiguous"),
    ("exp_scores", lambda e: e.double(), r"of dtype Float"),
    ("exp_sums", lambda s: s[:, :1], r"expected exp_sums contiguous \(B, h, N\)"),
    ("exp_sums", lambda s: s.half(), r"of dtype Float"),
])
def test_p2c_cpu_saved_backward_refuses_mismatched_numerators(what, bad, match):
    """Numerators that are not the forward's layout are refused, naming the tensor and the shape."""
    _cpu_ops()
    inp = make_p2c_inputs(2, 9, 5, 2, 8)
    _, e, sums = SAVED.p2c_attention_saved_fwd(inp.q, inp.k, inp.v, 0.3)
    if what == "exp_scores":
        e = bad(e)
    else:
        sums = bad(sums)
    with pytest.raises(RuntimeError, match=match):
        SAVED.p2c_attention_saved_bwd(torch.randn_like(inp.q), inp.q, inp.k, inp.v, e, sums, 0.3)


# -- as a torch.library op --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [FP32, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("contiguous", [True, False], ids=["contig", "strided"])
@pytest.mark.parametrize("name", KERNELS)
def test_p2c_opcheck(name, contiguous, dtype):
    backend, device = use(name)
    fwd, bwd = raw_ops(name)
    inp = make_p2c_inputs(2, 7, 3, 2, 8, device=device, dtype=dtype, contiguous=contiguous, requires_grad=True)
    require_backend(backend, OP, (inp.q, inp.k, inp.v))
    torch.library.opcheck(fwd, (inp.q, inp.k, inp.v, 0.35))
    g = torch.randn_like(inp.q.detach())
    for det in (False, True):
        torch.library.opcheck(bwd, (g, inp.q.detach(), inp.k.detach(), inp.v.detach(), 0.35, det))


@pytest.mark.parametrize("name", BACKEND_NAMES)
def test_p2c_compiles_fullgraph_forward_and_backward(name):
    backend, device = use(name)
    torch._dynamo.reset()

    def f(q, k, v):
        return ops.p2c_attention(q, k, v, backend=name).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="inductor" if device == "cuda" else "aot_eager")
    a = make_p2c_inputs(2, 11, 4, 2, 16, device=device, requires_grad=True)
    b = clone_leaves((a.q, a.k, a.v))
    compiled(a.q, a.k, a.v).backward()
    f(*b).backward()
    for gname, s, d in zip(GRAD_NAMES, (a.q, a.k, a.v), b, strict=True):
        assert_close(s.grad, d.grad, name=gname, **tol(backend, FP32, grad=True))


EXPORTED = {"cpu": "paca_kernels.p2c_attention_fwd.default", "cuda": "paca_kernels.p2c_attention_fwd.default",
            "triton": "paca_kernels.p2c_attention_fwd_triton.default"}


@pytest.mark.parametrize("name", KERNELS)
def test_p2c_export_keeps_the_op(name):
    backend, device = use(name)

    class Attend(torch.nn.Module):
        def forward(self, q, kv):
            return ops.p2c_attention(q, kv[:, :, 0], kv[:, :, 1], backend=name)

    q = torch.randn(1, 6, 2, 16, device=device)
    kv = torch.randn(1, 3, 2, 2, 16, device=device)
    ep = torch.export.export(Attend(), (q, kv))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert EXPORTED[name] in targets
    assert_close(ep.module()(q, kv), Attend()(q, kv), **tol(backend, FP32))


@pytest.mark.parametrize("name", BACKEND_NAMES)
def test_p2c_flops_equal_the_unfused_matmuls(name):
    """FlopCounterMode counts the fused op as the two matmuls: 4·BhNMd forward, 8·BhNMd backward."""
    _, device = use(name)

    def count(backend: str) -> int:
        p = make_p2c_inputs(2, 12, 5, 3, 8, device=device, requires_grad=True)
        return count_flops(lambda: ops.p2c_attention(p.q, p.k, p.v, backend=backend).sum().backward())

    assert count(name) == count("reference") == 12 * 2 * 3 * 12 * 5 * 8


# -- dispatch ---------------------------------------------------------------------------------------

# Where each backend's declared limits refuse a call, and the words its reason uses (meta tensors).
REFUSALS = [
    ("cpu", "device", {"device": "meta"}, "does not run on meta"),
    ("triton", "dtype", {"dtype": FP64}, "does not support float64"),
    ("triton", "keys", {"M": 257}, "M = 257"),
    ("triton", "head-dim", {"d": 256}, "d = 256"),
    ("cuda", "dtype", {"dtype": FP64}, "does not support float64"),
    ("cuda", "keys", {"M": 300}, "M = 300"),
    ("cuda", "head-dim", {"d": 256}, "d = 256"),
    ("cuda", "device", {"device": "cpu"}, "does not run on cpu"),
]


@pytest.mark.parametrize(("name", "what", "change", "words"), REFUSALS, ids=[f"{r[0]}-{r[1]}" for r in REFUSALS])
def test_p2c_dispatch_errors_give_each_backends_reason(name, what, change, words):
    backend = ops.get_backend(name)
    dims = {"B": 1, "N": 4, "M": 3, "h": 1, "d": 8, "dtype": FP32, "device": "meta", **change}
    device = dims.pop("device")
    dtype = dims.pop("dtype")
    p = make_p2c_inputs(*dims.values(), dtype=dtype, device=device)
    check_refusal(backend, OP, ops.p2c_attention, (p.q, p.k, p.v), words)


@pytest.mark.parametrize("name", BACKEND_NAMES)
def test_p2c_named_backend_serves_the_call(name):
    backend, device = use(name)
    p = make_p2c_inputs(1, 5, 3, 1, 8, device=device)
    require_backend(backend, OP, (p.q, p.k, p.v))
    assert ops.select_backend(OP, (p.q, p.k, p.v), name) is backend
    assert_close(run(name)(p.q, p.k, p.v), reference.p2c_attention(p.q, p.k, p.v), **tol(backend, FP32))


def _p2c_inputs() -> dict[str, torch.Tensor]:
    return {"q": torch.randn(2, 12, 2, 4), "k": torch.randn(2, 5, 2, 4), "v": torch.randn(2, 5, 2, 4)}


@pytest.mark.parametrize(("change", "exc", "match"), [
    pytest.param({"q": torch.randn(2, 12, 8)}, ValueError, r"q must have shape \(B, N, h, d\)", id="q-3d"),
    pytest.param({"k": torch.randn(2, 5, 2, 4, 1)}, ValueError, r"k must have shape", id="k-5d"),
    pytest.param({"q": torch.randn(3, 12, 2, 4)}, ValueError, r"disagree on B, h or d", id="B-mismatch"),
    pytest.param({"q": torch.randn(2, 12, 2, 3)}, ValueError, r"disagree on B, h or d", id="d-mismatch"),
    pytest.param({"v": torch.randn(2, 6, 2, 4)}, ValueError, r"k and v must have the same shape",
                 id="M-mismatch"),
    pytest.param({"q": torch.randint(0, 3, (2, 12, 2, 4))}, TypeError, r"q must be a floating",
                 id="int-q"),
    pytest.param({"v": torch.randn(2, 5, 2, 4, dtype=torch.float64)}, TypeError, r"same dtype",
                 id="mixed-dtypes"),
    pytest.param({"k": torch.randn(2, 5, 2, 4, device="meta")}, ValueError, r"same device",
                 id="k-on-meta"),
])
def test_p2c_bad_input_is_refused_before_dispatch(change: dict, exc: type, match: str) -> None:
    args = _p2c_inputs() | change
    with pytest.raises(exc, match=match):
        ops.p2c_attention(args["q"], args["k"], args["v"])


# -- past 2^31 elements (GPU only: ~9-20 GB of GPU memory) -------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["triton", "cuda"])
def test_p2c_index_arithmetic_past_2_pow_31(name):
    _backend, device = use(name)
    h, d, m = 2, 64, 16
    n = 2**31 // (h * d) + 4099  # q, out, grad_out and dq hold more than 2^31 elements
    q = torch.randn(1, n, h, d, device=device, dtype=torch.bfloat16).requires_grad_(True)
    k = torch.randn(1, m, h, d, device=device, dtype=torch.bfloat16).requires_grad_(True)
    v = torch.randn(1, m, h, d, device=device, dtype=torch.bfloat16).requires_grad_(True)
    out = run(name)(q, k, v)
    tail = slice(n - 300, n)
    qt = q.detach()[:, tail].float().requires_grad_(True)
    want = reference.p2c_attention(qt, k.detach().float(), v.detach().float())
    assert_close(out[:, tail].float(), want, rtol=2e-2, atol=2e-2)
    if name == "cuda":  # the triton backward's index arithmetic past 2^31 is not claimed
        grad = torch.zeros_like(out)
        grad[:, tail] = 1.0  # only the last rows get a gradient: dq there, dk/dv from them alone
        out.backward(grad)
        want.sum().backward()
        assert_close(q.grad[:, tail].float(), qt.grad, rtol=3e-2, atol=3e-2)
        assert torch.isfinite(k.grad).all() and torch.isfinite(v.grad).all()


# -- property test ----------------------------------------------------------------------------------

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies
MAX_EXAMPLES = int(os.environ.get("PACA_KERNELS_HYPOTHESIS_MAX", "10"))


@pytest.mark.parametrize("name", KERNELS)
@hypothesis.settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True)
@hypothesis.given(
    b=st.integers(1, 2), n=st.integers(1, 70), m=st.integers(1, 40), h=st.integers(1, 2),
    d=st.sampled_from([8, 12, 16, 24, 40]), contiguous=st.booleans(), seed=st.integers(0, 2**16),
)  # fmt: skip
def test_p2c_property_matches_reference(name, b, n, m, h, d, contiguous, seed):
    backend, device = use(name)
    torch.manual_seed(seed)
    p = make_p2c_inputs(b, n, m, h, d, device=device, contiguous=contiguous, requires_grad=True)
    g = torch.randn(b, n, h, d, device=device)
    got, got_g = grads(run(name), (p.q, p.k, p.v), g)
    want, want_g = grads(reference.p2c_attention, clone_leaves((p.q, p.k, p.v)), g)
    assert_close(got, want, **tol(backend, FP32))
    for gname, a, e in zip(GRAD_NAMES, got_g, want_g, strict=True):
        assert_close(a, e, name=gname, **tol(backend, FP32, grad=True))
