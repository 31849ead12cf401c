"""Helpers shared by the tests, the benchmarks and ``python -m paca_kernels``.

- input makers with random data (never zeros), optional non-contiguous layouts;
- :func:`assert_close` that reports the worst index, the count and the share of mismatches;
- :func:`assert_low_precision_ok`: FlashAttention's rule for fp16/bf16 — the kernel's error against a
  float64 reference is at most ``factor`` times the error of the PyTorch reference run in the same low
  precision (plus a small absolute floor for outputs that are exactly representable).
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "BACKEND_NAMES",
    "TOLERANCES",
    "ClusterPoolInputs",
    "P2CInputs",
    "assert_close",
    "assert_low_precision_ok",
    "assert_passes_on_cpu_isa",
    "assert_same_bits_across_thread_counts",
    "assert_same_flops",
    "backend_device",
    "cast_tensors",
    "check_grads_repeat_bitwise",
    "check_low_precision",
    "check_matches_reference",
    "check_refusal",
    "clone_leaves",
    "count_flops",
    "dtype_id",
    "grads",
    "isolate_inductor_cache",
    "make_cluster_pool_inputs",
    "make_p2c_inputs",
    "max_error",
    "noncontiguous",
    "num_threads",
    "opcheck_inference_only",
    "poisoned_outputs",
    "require_backend",
    "shape_id",
]

#: Every backend of the ops, in the order the op tests run them (``paca_kernels.ops.get_backend``).
BACKEND_NAMES = ("reference", "cpu", "triton", "cuda")

_DTYPE_IDS = {torch.float64: "fp64", torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

#: (rtol, atol) for float comparisons of a kernel against the reference in the same dtype,
#: from the error measured on the shapes of the test-suite (float32 accumulation everywhere).
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (2e-5, 2e-5),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (2e-3, 2e-3),
}


def shape_id(**dims: int | str) -> str:
    """``shape_id(B=2, N=197, M=49) -> "B2-N197-M49"`` for readable parametrize ids."""
    return "-".join(f"{k}{v}" for k, v in dims.items())


def dtype_id(dtype: torch.dtype) -> str:
    """``torch.float32 -> "fp32"`` (fp64, fp16, bf16) for parametrize ids."""
    return _DTYPE_IDS[dtype]


def backend_device(name: str) -> str:
    """The device a backend's op tests run on: "cuda" for the cuda backend, the GPU for triton where
    there is one (else the CPU, under Triton's interpreter), the CPU for the others."""
    if name == "cuda" or (name == "triton" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


def require_backend(backend, op: str | None = None, inputs=None) -> None:
    """Skip the running test with the backend's own reason where ``backend`` (a
    :class:`paca_kernels.ops.Backend`) cannot run here at all, or cannot run ``op`` on ``inputs``."""
    import pytest

    reason = backend.unavailable_reason()
    reasons = [reason] if reason is not None else []
    if not reasons and op is not None:
        reasons = backend.not_supported_reasons(op, inputs)
    if reasons:
        pytest.skip(f"{backend.name}: {'; '.join(reasons)}")


def cast_tensors(args, dtype: torch.dtype):
    """A copy of ``args`` (a NamedTuple of an op's arguments) with its tensors in ``dtype``."""
    return type(args)(*(t.to(dtype) if isinstance(t, Tensor) else t for t in args))


def clone_leaves(tensors) -> list[Tensor | None]:
    """Independent leaf copies (requires_grad) of ``tensors`` (None stays None): the reference's
    inputs, same values as the kernel's."""
    return [t.detach().clone().requires_grad_(True) if t is not None else None for t in tensors]


def grads(fn, inputs, grad_out: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
    """``fn(*inputs)`` and the gradients of its output (upstream ``grad_out``) with respect to the
    inputs that are not None, in order."""
    out = fn(*inputs)
    used = [t for t in inputs if t is not None]
    return out, torch.autograd.grad(out, used, grad_out)


@contextlib.contextmanager
def num_threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``n`` for the block."""
    prev = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def assert_same_bits_across_thread_counts(fn, counts: tuple[int, ...] = (1, 2, 3)) -> None:
    """Run ``fn()`` (no gradient) with each intra-op thread count in ``counts``: every run returns
    the same bits (a tensor, or a tuple of tensors)."""
    outs = []
    for n in counts:
        with num_threads(n), torch.no_grad():
            out = fn()
        outs.append(out if isinstance(out, tuple) else (out,))
    for other in outs[1:]:
        for a, b in zip(outs[0], other, strict=True):
            assert torch.equal(a, b), f"{counts}: the runs differ by {(a - b).abs().max().item():.3g}"


def noncontiguous(t: Tensor) -> Tensor:
    """The same values in a non-contiguous layout (last dim strided by 2), same requires_grad."""
    wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    wide[..., ::2] = t.detach()
    out = wide[..., ::2]
    return out.requires_grad_(t.requires_grad)


@contextlib.contextmanager
def poisoned_outputs() -> Iterator[None]:
    """Fill every new allocation with NaN while active (C++ ``at::empty`` and ``torch.empty_like``
    included): an output element a kernel forgets to write shows up as NaN, never as a stale value."""
    prev = torch.are_deterministic_algorithms_enabled()
    prev_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev)
        torch.utils.deterministic.fill_uninitialized_memory = prev_fill


@dataclass
class ClusterPoolInputs:
    """logits (B, M, N), x (B, N, C), LayerNorm weight and bias (C,)."""

    logits: Tensor
    x: Tensor
    weight: Tensor | None
    bias: Tensor | None


def make_cluster_pool_inputs(
    B: int,
    M: int,
    N: int,
    C: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    affine: bool = True,
    logit_scale: float = 3.0,
    requires_grad: bool = False,
    contiguous: bool = True,
) -> ClusterPoolInputs:
    """Random cluster_pool inputs. Logits are spread (``logit_scale``) so the softmax is not flat."""
    logits = torch.randn(B, M, N, device=device, dtype=torch.float32) * logit_scale
    x = torch.randn(B, N, C, device=device, dtype=torch.float32)
    weight = bias = None
    if affine:
        weight = 1.0 + 0.5 * torch.randn(C, device=device)
        bias = 0.5 * torch.randn(C, device=device)
    tensors = [t.to(dtype) if t is not None else None for t in (logits, x, weight, bias)]
    if not contiguous:
        tensors[0] = noncontiguous(tensors[0])
        tensors[1] = tensors[1].transpose(1, 2).contiguous().transpose(1, 2)
    if requires_grad:
        for t in tensors:
            if t is not None:
                t.requires_grad_(True)
    return ClusterPoolInputs(*tensors)


@dataclass
class P2CInputs:
    """q (B, N, h, d), k and v (B, M, h, d)."""

    q: Tensor
    k: Tensor
    v: Tensor


def make_p2c_inputs(
    B: int,
    N: int,
    M: int,
    h: int,
    d: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    requires_grad: bool = False,
    contiguous: bool = True,
) -> P2CInputs:
    """Random p2c_attention inputs; non-contiguous ones are views of a (B, N, 3, h, d)-like layout."""
    q = torch.randn(B, N, h, d, device=device).to(dtype)
    k = torch.randn(B, M, h, d, device=device).to(dtype)
    v = torch.randn(B, M, h, d, device=device).to(dtype)
    if not contiguous:
        q = torch.stack([q, torch.empty_like(q)], dim=3)[:, :, :, 0]
        kv = torch.stack([k, v], dim=2)  # (B, M, 2, h, d): k and v interleaved, as from one linear
        k, v = kv[:, :, 0], kv[:, :, 1]
    if requires_grad:
        for t in (q, k, v):
            t.requires_grad_(True)
    return P2CInputs(q, k, v)


def max_error(actual: Tensor, expected: Tensor) -> float:
    """max |actual − expected| in float64 (NaN if either has a NaN where the other has not)."""
    a, e = actual.detach().double(), expected.detach().double()
    nan_mismatch = torch.isnan(a) != torch.isnan(e)
    if nan_mismatch.any():
        return math.nan
    diff = (a - e).abs()
    diff = diff[~torch.isnan(diff)]
    return float(diff.max()) if diff.numel() else 0.0


def assert_close(
    actual: Tensor,
    expected: Tensor,
    *,
    rtol: float | None = None,
    atol: float | None = None,
    name: str = "output",
) -> None:
    """allclose with a report: worst index and values, number and share of mismatches."""
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    d_rtol, d_atol = TOLERANCES.get(actual.dtype, TOLERANCES[torch.float32])
    rtol = d_rtol if rtol is None else rtol
    atol = d_atol if atol is None else atol
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    bad = ~torch.isclose(a, e, rtol=rtol, atol=atol, equal_nan=True)
    if not bad.any():
        return
    diff = (a - e).abs().nan_to_num(nan=math.inf)
    diff = torch.where(bad, diff, torch.zeros_like(diff))
    flat = int(diff.argmax())
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), a.shape))
    count = int(bad.sum())
    raise AssertionError(
        f"{name}: {count} of {a.numel()} elements ({100.0 * count / a.numel():.3g}%) differ beyond "
        f"rtol={rtol:g}, atol={atol:g}; worst at {idx}: got {a[idx].item():.8g}, "
        f"expected {e[idx].item():.8g} (|diff| {diff[idx].item():.3g})"
    )


def assert_low_precision_ok(
    actual: Tensor,
    low_precision_reference: Tensor,
    exact: Tensor,
    *,
    factor: float = 2.0,
    floor: float = 1e-5,
    name: str = "output",
) -> None:
    """FlashAttention's rule: err(actual, exact) <= factor · err(reference in low precision, exact) + floor.

    Args:
        actual: the kernel's output in fp16/bf16.
        low_precision_reference: the PyTorch reference computed in the same low precision.
        exact: the reference computed in float64 (or float32) from the same inputs.
    """
    err = max_error(actual, exact)
    ref_err = max_error(low_precision_reference, exact)
    if not (err <= factor * ref_err + floor):
        raise AssertionError(
            f"{name}: max error {err:.3g} against the exact result exceeds {factor:g} × the "
            f"low-precision PyTorch reference's error {ref_err:.3g} (+ {floor:g})"
        )


def assert_passes_on_cpu_isa(script: str, isa: str = "baseline", timeout: float = 120) -> None:
    """Run ``script`` (Python source that prints "isa ok" when its checks pass) in a fresh
    interpreter with ``PACA_KERNELS_CPU_ISA=isa``: ``"baseline"`` for the C++ kernels' portable
    float32 build, ``"avx2"`` for the AVX2 products on a CPU that would otherwise use the AVX-512
    ones, ``"avx512"`` for the AVX-512 build without the bf16 products (bf16 inputs then multiply
    in float32), ``"avx512bf16"`` for the AVX512-BF16 bf16 products where the CPU would use AMX.
    The build is chosen once per process at first use, so it needs a process of its own."""
    import os
    import subprocess
    import sys

    if isa not in ("baseline", "avx2", "avx512", "avx512bf16"):
        raise ValueError(f"isa must be 'baseline', 'avx2', 'avx512' or 'avx512bf16', got {isa!r}")
    env = {**os.environ, "PACA_KERNELS_CPU_ISA": isa}
    proc = subprocess.run(
        [sys.executable, "-c", script], check=False, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0 and "isa ok" in proc.stdout, proc.stdout + proc.stderr


# -- check bodies shared by the op tests (tests/ops/), whatever the op ----------------------------------


def check_matches_reference(fn, ref_fn, args, grad_out: Tensor, names, tol: dict, grad_tol: dict) -> None:
    """``fn(*args)`` and its gradients (upstream ``grad_out``; allocations NaN-filled, so an unwritten
    output shows) against ``ref_fn`` on leaf copies of ``args``; ``names`` name the gradients of the
    inputs that are not None."""
    with poisoned_outputs():
        got, got_g = grads(fn, args, grad_out)
    want, want_g = grads(ref_fn, clone_leaves(args), grad_out)
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    assert_close(got, want, name="out", **tol)
    assert len(got_g) == len(want_g)
    for name, g, w in zip(names, got_g, want_g, strict=False):
        assert_close(g, w, name=name, **grad_tol)


def check_low_precision(fn, ref_fn, args, grad_out: Tensor, names, factor: float, floors=None) -> None:
    """FlashAttention's rule for an fp16/bf16 ``fn`` against ``ref_fn``: the output and every gradient
    within ``factor`` times the error of ``ref_fn`` in the same dtype, both against ``ref_fn`` in
    float64. ``floors``: gradient name -> absolute floor (default 1e-5)."""
    dtype = args[0].dtype
    got, got_g = grads(fn, args, grad_out)
    low, low_g = grads(ref_fn, clone_leaves(args), grad_out)
    exact, exact_g = grads(ref_fn, [t.detach().double().requires_grad_(True) for t in args], grad_out.double())
    assert got.dtype == dtype
    assert_low_precision_ok(got, low, exact, factor=factor)
    for name, g, lg, eg in zip(names, got_g, low_g, exact_g, strict=True):
        assert g.dtype == dtype, name
        floor = (floors or {}).get(name, lambda e: 1e-5)(eg)
        assert_low_precision_ok(g, lg, eg, factor=factor, floor=floor, name=name)


def check_grads_repeat_bitwise(fn, ref_fn, args, names, grad_tol: dict) -> None:
    """``fn(*args).sum().backward()`` (an expanded, stride-0 upstream gradient) twice with NaN-filled
    allocations and deterministic algorithms on: finite outputs, gradients close to ``ref_fn``'s, and
    the same bits both times."""
    ref = clone_leaves(args)
    ref_fn(*ref).sum().backward()
    results = []
    with poisoned_outputs():
        for _ in range(2):
            for t in args:
                t.grad = None
            out = fn(*args)
            assert torch.isfinite(out).all()
            out.sum().backward()
            results.append([t.grad.clone() for t in args])
    for name, g, r in zip(names, results[0], ref, strict=False):
        assert_close(g, r.grad, name=name, **grad_tol)
    for g0, g1 in zip(*results, strict=True):
        assert torch.equal(g0, g1)


def check_refusal(backend, op: str, call, inputs, words: str) -> None:
    """``backend`` (a :class:`paca_kernels.ops.Backend`) refuses ``op`` on ``inputs`` for a reason
    containing ``words``, from its declared devices, dtypes or limits (whether or not it can run in
    this process); and ``call(*inputs, backend=name)`` raises the BackendError that lists every
    backend's reasons, its own among them."""
    import pytest

    t = inputs[0]
    declared = backend.limits.get(op, lambda _: [])(inputs)
    if t.device.type not in backend.device_types:
        declared.append(f"does not run on {t.device.type}")
    if t.dtype not in backend.dtypes:
        declared.append(f"does not support {str(t.dtype).removeprefix('torch.')}")
    assert any(words in r for r in declared), declared
    reasons = backend.not_supported_reasons(op, inputs)
    assert reasons
    with pytest.raises(ValueError) as info:
        call(*inputs, backend=backend.name)
    assert type(info.value).__name__ == "BackendError"
    msg = str(info.value)
    assert f"backend={backend.name!r}" in msg and f"  {backend.name}: {'; '.join(reasons)}" in msg
    assert "reference: can serve this call" in msg


def count_flops(fn) -> int:
    """What ``FlopCounterMode`` counts for ``fn()``."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def assert_same_flops(fused, unfused) -> None:
    """A fused op counts, under ``FlopCounterMode`` and without gradients, what the ops it replaces
    count: ``fused()`` and ``unfused()`` give the same positive total."""
    with torch.no_grad():
        got, want = count_flops(fused), count_flops(unfused)
    assert got == want > 0, (got, want)


def opcheck_inference_only(op, args) -> None:
    """``torch.library.opcheck`` for an inference-only custom op (no autograd to check)."""
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def isolate_inductor_cache(root: Path, base: Path | None = None, keep_days: float = 1.0) -> Path:
    """Point TorchInductor's cache (``TORCHINDUCTOR_CACHE_DIR``) at a folder named by a hash of the
    sources under ``root`` (``csrc/`` and ``paca_kernels/``), unless the variable is already set;
    returns the folder. Call before anything compiles.

    Why: Inductor's FX-graph cache keys a compiled graph by its code and inputs, not by the custom
    ops' fake kernels or C++ schemas. After an op's outputs change (cluster_pool's saved lse (B, M)
    became stats (B, M, 2)), a cached graph from the old sources still asserts the old shapes and
    fails. One folder per source state keeps the cache across runs of the same code and never
    serves another's; folders of other states older than ``keep_days`` are removed.
    """
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    digest = hashlib.sha256()
    for folder in ("csrc", "paca_kernels"):
        for path in sorted((root / folder).rglob("*")):
            if path.suffix in {".py", ".cpp", ".h", ".cu", ".cuh"} and path.is_file():
                digest.update(str(path.relative_to(root)).encode())
                digest.update(path.read_bytes())
    base = base or Path(tempfile.gettempdir()) / f"paca_kernels_inductor_{getpass.getuser()}"
    folder = base / digest.hexdigest()[:16]
    folder.mkdir(parents=True, exist_ok=True)
    cutoff = time.time() - keep_days * 86400
    for other in base.iterdir():
        if other != folder and other.is_dir() and other.stat().st_mtime < cutoff:
            shutil.rmtree(other, ignore_errors=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    return folder
