"""The CUDA kernels run on the CPU: tests/backends/cuda_emulation.cpp compiles the production kernels and
launch sequences (csrc/cuda/*.cuh) with the host compiler over an emulated CUDA runtime (a CTA = one
std::thread per CUDA thread, __syncthreads = a barrier, NaN-filled shared memory and workspaces, an
emulated nvcuda::wmma with the GPU's roundings), and this file compares their results with the reference
through ctypes.

What this checks without a GPU: indexing (strides, padding, partial tiles, key chunks), the
synchronisation structure (a missing barrier or a read of unwritten shared memory gives NaN or wrong
values), the online softmax and its split-N merge, the LayerNorm epilogue and backward, the fixed-order
and atomic dk/dv reductions, every tile configuration of cluster_pool, the grid-stride loops, and the
tensor-core paths (fp16/bf16 WMMA for p2c_attention, TF32 WMMA for the half-precision cluster_pool) with
the GPU's precision choices: fp16/bf16 and TF32 conversions round as the GPU's do, p2c_attention rounds
the probabilities to fp16/bf16 before P.v, cluster_pool keeps them float and rounds them to TF32, all in
the production code. The low-precision results are held to FlashAttention's rule (error against float64
at most 2x the PyTorch reference's own error in the same precision). Not covered: real GPU memory
ordering and timing, the tensor cores' summation order (float32 rounding), and the torch glue (the cuda
backend's cases in tests/ops/ cover those on a GPU).
"""

from __future__ import annotations

import ctypes
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from paca_kernels import reference
from paca_kernels.testing import (
    assert_close,
    assert_low_precision_ok,
    make_cluster_pool_inputs,
    make_p2c_inputs,
    shape_id,
)

ROOT = Path(__file__).resolve().parents[2]
SOURCE = Path(__file__).resolve().with_name("cuda_emulation.cpp")
HEADERS = sorted((ROOT / "csrc" / "cuda").glob("*.cuh")) + [ROOT / "csrc" / "cuda" / h for h in ("launchers.h", "limits.h")]

FWD_TOL = {"rtol": 1e-5, "atol": 1e-5}
BWD_TOL = {"rtol": 1e-4, "atol": 3e-5}
I64P = ctypes.POINTER(ctypes.c_int64)
FP = ctypes.c_void_p
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # launchers.h DType
LOW = [torch.float16, torch.bfloat16]
LOW_IDS = ["fp16", "bf16"]


def _cuda_include() -> Path | None:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "include" / "cuda_runtime.h").is_file():
            return Path(home) / "include"
    nvcc = shutil.which("nvcc")
    roots = [Path(nvcc).resolve().parent.parent] if nvcc else []
    for root in [*roots, Path("/usr/local/cuda")]:
        if (root / "include" / "cuda_runtime.h").is_file():
            return root / "include"
    return None


@pytest.fixture(scope="module")
def emu(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    """The emulation library, built once per session with the host compiler."""
    include = _cuda_include()
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if include is None or cxx is None:
        pytest.skip("the CUDA toolkit headers (cuda_runtime.h, cuda_fp16.h) or a host C++ compiler are missing")
    lib = tmp_path_factory.mktemp("cuda_emu") / "libpaca_cuda_emu.so"
    cmd = [
        cxx, "-std=c++20", "-O2", "-shared", "-fPIC", "-pthread", "-Wall", "-Wextra", "-Werror",
        "-Wno-attributes", "-Wno-unknown-pragmas", "-Wno-unused-parameter",
        f"-I{ROOT / 'csrc'}", f"-I{include}", str(SOURCE), "-o", str(lib),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, f"$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr[-8000:]}"
    dll = ctypes.CDLL(str(lib))
    i64, f32, i32 = ctypes.c_int64, ctypes.c_float, ctypes.c_int
    dll.emu_p2c_fwd.argtypes = [i32] + [i64] * 5 + [f32] + [FP, I64P] * 3 + [FP, FP]
    dll.emu_p2c_bwd.argtypes = [i32] + [i64] * 5 + [f32, i32, i32] + [FP, I64P] * 4 + [FP] * 3
    dll.emu_pool_fwd.argtypes = [i32] + [i64] * 4 + [f32] + [FP, I64P] * 2 + [FP] * 5 + [i32, i64, i64, I64P]
    dll.emu_pool_bwd.argtypes = [i32] + [i64] * 4 + [f32] + [FP, I64P] * 3 + [FP] + [FP, I64P] * 2 + [FP] * 4 + [i64]
    dll.emu_pool_smem.argtypes = [i32, i64, I64P, I64P]
    dll.emu_set_grid_limit.argtypes = [i64]
    dll.emu_round.argtypes = [i32, FP, FP, i64]
    dll.emu_opt_in_cache.argtypes = [i32, i32, i32, i32, I64P]
    dll.emu_opt_in_cache.restype = i32
    dll.emu_tile_loads.argtypes = [I64P]
    for name in ("emu_p2c_fwd", "emu_p2c_bwd", "emu_pool_fwd", "emu_pool_bwd"):
        getattr(dll, name).restype = i32
    return dll


def _strides(t: torch.Tensor):
    return (ctypes.c_int64 * t.dim())(*t.stride())


def _ptr(t: torch.Tensor | None):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def _nan(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.full(shape, math.nan, dtype=dtype)


# -- p2c_attention ----------------------------------------------------------------------------------


def _p2c_fwd(emu, q, k, v, scale):
    b, n, h, d = q.shape
    m = k.shape[1]
    out, lse = _nan(b, n, h, d, dtype=q.dtype), _nan(b, h, n)
    rc = emu.emu_p2c_fwd(DTYPE_CODE[q.dtype], b, n, m, h, d, scale, _ptr(q), _strides(q), _ptr(k), _strides(k), _ptr(v),
                         _strides(v), _ptr(out), _ptr(lse))
    assert rc == 0
    return out, lse


def _p2c_bwd(emu, g, q, k, v, scale, deterministic, num_sms):
    b, n, h, d = q.shape
    m = k.shape[1]
    dq, dk, dv = _nan(b, n, h, d, dtype=q.dtype), _nan(b, m, h, d, dtype=q.dtype), _nan(b, m, h, d, dtype=q.dtype)
    rc = emu.emu_p2c_bwd(DTYPE_CODE[q.dtype], b, n, m, h, d, scale, int(deterministic), num_sms,
                         _ptr(q), _strides(q), _ptr(k), _strides(k), _ptr(v), _strides(v),
                         _ptr(g), _strides(g), _ptr(dq), _ptr(dk), _ptr(dv))  # fmt: skip
    assert rc == 0
    return dq, dk, dv


# (B, N, M, h, d, contiguous): one partial query tile (N < 32), several (70, 100), several key chunks
# (M = 49, 100, 256 > 32 keys per chunk), M and d not multiples of 4 (padding), d up to 128.
P2C_SHAPES = [
    (1, 1, 1, 1, 8, True),
    (2, 7, 3, 2, 6, True),
    (2, 70, 49, 2, 24, False),
    (1, 100, 100, 1, 40, True),
    (1, 33, 17, 3, 10, False),
    (1, 40, 256, 1, 128, True),
]


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize(
    "shape", P2C_SHAPES,
    ids=[shape_id(B=b, N=n, M=m, H=h, D=d) + ("" if c else "-strided") for b, n, m, h, d, c in P2C_SHAPES],
)
def test_p2c_forward_backward(emu, shape, deterministic):
    b, n, m, h, d, contiguous = shape
    inp = make_p2c_inputs(b, n, m, h, d, contiguous=contiguous, requires_grad=True)
    scale = d**-0.5
    out, lse = _p2c_fwd(emu, inp.q.detach(), inp.k.detach(), inp.v.detach(), scale)
    want = reference.p2c_attention(inp.q, inp.k, inp.v, scale)
    assert_close(out, want, **FWD_TOL)
    scores = torch.einsum("bnhd,bmhd->bhnm", inp.q.detach(), inp.k.detach()) * scale
    assert_close(lse, torch.logsumexp(scores, -1), **FWD_TOL, name="lse")
    g = torch.randn(b, n, h, d)
    want.backward(g)
    # num_sms=1: one deterministic group per (b, head), so a CTA adds several query tiles into its slice.
    got = _p2c_bwd(emu, g, inp.q.detach(), inp.k.detach(), inp.v.detach(), scale, deterministic, 1)
    for name, a, t in zip(("dq", "dk", "dv"), got, (inp.q, inp.k, inp.v), strict=True):
        assert_close(a, t.grad, name=name, **BWD_TOL)


@pytest.mark.parametrize("dtype", [torch.float32, *LOW], ids=["fp32", *LOW_IDS])
def test_p2c_backward_row_statistics_over_key_chunks(emu, dtype):
    """The backward's first sweep folds the key chunks (32 keys each) into each row's max, sum and
    rowsum(P ∘ dP) online: with scores of order 1e4 (exact in fp32) whose maximum sits in the last chunk
    (key 70 of 100, third chunk), a saturated row's dq is exactly 0, as PyTorch's is, and near-tie rows
    (keys 5 and 90 within 1 of each other, chunks apart) are as accurate as PyTorch autograd in the same
    dtype (fp32: 2x its error + 1e-6 of the gradient's scale; fp16/bf16: FlashAttention's 2x)."""
    b, n, m, h, d = 1, 40, 100, 2, 24
    k = torch.randint(-128, 129, (b, m, h, d)).float()
    k[:, 5] = k[:, 90]
    k[:, 5, :, 0] += 1
    # Even rows: near-ties of keys 5 and 90 (gap |q₀|/64 <= 1) at s ~ 2e4; odd rows: key 70 (third chunk)
    # leads every other key by ~2e4 (saturated: the others' P underflow, in float64 too).
    lead = torch.where(torch.arange(n).view(1, n, 1, 1) % 2 == 0, k[:, 90:91], k[:, 70:71])
    q = 8 * lead + torch.randint(-8, 9, (b, n, h, d))
    q[:, ::2, :, 0] = torch.randint(-64, 65, (b, (n + 1) // 2, h)).float()
    q = q / 64  # scores: multiples of 1/64 below 2^18, exact in fp32
    v = torch.randn(b, m, h, d)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    g = torch.randn(b, n, h, d).to(dtype)
    got = _p2c_bwd(emu, g, q, k, v, 1.0, True, 1)
    exact = [t.double().requires_grad_(True) for t in (q, k, v)]
    reference.p2c_attention(*exact, 1.0).backward(g.double())
    low = [t.clone().requires_grad_(True) for t in (q, k, v)]
    reference.p2c_attention(*low, 1.0).backward(g)
    odd = slice(1, None, 2)
    assert torch.equal(low[0].grad[:, odd], torch.zeros_like(low[0].grad[:, odd]))  # the premise
    assert torch.equal(got[0][:, odd], torch.zeros_like(got[0][:, odd])), "dq of saturated rows"
    for name, a, lo, ex in zip(("dq", "dk", "dv"), got, low, exact, strict=True):
        err, ref_err = (float((t.double() - ex.grad).abs().max()) for t in (a, lo.grad))
        bound = 2 * ref_err + (1e-6 * float(ex.grad.abs().max()) if dtype == torch.float32 else 0)
        assert err <= bound, f"{name}: error {err:.3g} > {bound:.3g} (PyTorch's: {ref_err:.3g})"


def test_p2c_deterministic_groups_and_stride0_grad(emu):
    """Deterministic dk/dv repeat bitwise, match the reference with one group or many (and the atomic
    path), and a stride-0 upstream gradient (what out.sum().backward() passes) is read correctly."""
    inp = make_p2c_inputs(1, 150, 20, 2, 16)
    g = torch.ones(1, 1, 1, 1).expand(1, 150, 2, 16)  # what out.sum().backward() passes
    runs = [_p2c_bwd(emu, g, inp.q, inp.k, inp.v, 0.3, True, sms) for sms in (1, 1, 132)]
    atomic = _p2c_bwd(emu, g, inp.q, inp.k, inp.v, 0.3, False, 132)
    q, k, v = (t.clone().requires_grad_(True) for t in (inp.q, inp.k, inp.v))
    reference.p2c_attention(q, k, v, 0.3).sum().backward()
    for i, (name, t) in enumerate(zip(("dq", "dk", "dv"), (q, k, v), strict=True)):
        assert torch.equal(runs[0][i], runs[1][i])
        for r in (runs[0], runs[2], atomic):
            assert_close(r[i], t.grad, name=name, **BWD_TOL)


# -- cluster_pool -----------------------------------------------------------------------------------


def _smem(emu, c, dtype=torch.float32):
    f3, b3 = (ctypes.c_int64 * 3)(), (ctypes.c_int64 * 3)()
    emu.emu_pool_smem(DTYPE_CODE[dtype], c, f3, b3)
    return list(f3), list(b3)


def _pool_fwd(emu, logits, x, w, bias, eps, max_smem, splits=0, num_sms=132):
    b, m, n = logits.shape
    c = x.shape[2]
    out, pooled, stats = _nan(b, m, c, dtype=x.dtype), _nan(b, m, c), _nan(b, m, 2)
    used = ctypes.c_int64(0)
    w, bias = (None if t is None else t.float().contiguous() for t in (w, bias))  # as the glue passes them
    cfg = emu.emu_pool_fwd(DTYPE_CODE[x.dtype], b, m, n, c, eps, _ptr(logits), _strides(logits), _ptr(x), _strides(x), _ptr(w),
                           _ptr(bias), _ptr(out), _ptr(pooled), _ptr(stats), num_sms, max_smem, splits,
                           ctypes.byref(used))  # fmt: skip
    assert cfg >= 0
    return out, pooled, stats, cfg, used.value


def _pool_bwd(emu, g, logits, x, w, pooled, stats, eps, max_smem):
    b, m, n = logits.shape
    c = x.shape[2]
    dl, dx, dw, db = _nan(b, m, n, dtype=x.dtype), _nan(b, n, c, dtype=x.dtype), _nan(c), _nan(c)
    w = None if w is None else w.float().contiguous()
    rc = emu.emu_pool_bwd(DTYPE_CODE[x.dtype], b, m, n, c, eps, _ptr(g), _strides(g), _ptr(logits), _strides(logits), _ptr(x),
                          _strides(x), _ptr(w), _ptr(pooled), _strides(pooled), _ptr(stats), _strides(stats),
                          _ptr(dl), _ptr(dx), _ptr(dw), _ptr(db), max_smem)  # fmt: skip
    assert rc == 0
    return dl, dx, dw, db


# (B, M, N, C, affine, contiguous): C not a multiple of 4 (padding), M not a multiple of any BM (and
# more than one cluster block for BM = 16, 32), N across several tiles and splits.
POOL_SHAPES = [
    (1, 3, 5, 8, True, True),
    (2, 20, 100, 24, True, False),
    (1, 37, 150, 10, False, True),
]


@pytest.mark.parametrize("splits", [1, 3], ids=["one-pass", "split3"])
@pytest.mark.parametrize("config", [0, 1, 2], ids=["cfg0", "cfg1", "cfg2"])
@pytest.mark.parametrize(
    "shape", POOL_SHAPES,
    ids=[shape_id(B=b, M=m, N=n, C=c) + ("" if a else "-noaffine") + ("" if ct else "-strided")
         for b, m, n, c, a, ct in POOL_SHAPES],
)  # fmt: skip
def test_pool_forward_backward(emu, shape, config, splits):
    b, m, n, c, affine, contiguous = shape
    fwd3, bwd3 = _smem(emu, c)
    inp = make_cluster_pool_inputs(b, m, n, c, affine=affine, contiguous=contiguous, requires_grad=True)
    args = (inp.logits, inp.x, inp.weight, inp.bias)
    det = [t.detach() if t is not None else None for t in args]
    # A shared-memory budget that admits this configuration and no larger one.
    out, pooled, stats, cfg, used = _pool_fwd(emu, *det, 1e-6, fwd3[config], splits=splits)
    bk = (32, 32, 16)[config]  # patches per tile of each configuration (cluster_pool.cuh: kFwdBK)
    chunk = math.ceil(math.ceil(n / max(1, min(splits, math.ceil(n / bk)))) / bk) * bk
    assert cfg == config and used == math.ceil(n / chunk)
    want = reference.cluster_pool(*args, 1e-6)
    assert_close(out, want, **FWD_TOL)
    assert_close(pooled, torch.softmax(det[0], -1) @ det[1], **FWD_TOL, name="pooled")
    row_max = det[0].amax(-1)
    assert torch.equal(stats[..., 0], row_max)
    assert_close(stats[..., 1], torch.exp(det[0] - row_max[..., None]).sum(-1), **FWD_TOL, name="row sum")
    g = torch.randn(b, m, c)
    want.backward(g)
    got = _pool_bwd(emu, g, det[0], det[1], det[2], pooled, stats, 1e-6, bwd3[config])
    for name, a, t in zip(("dlogits", "dx", "dweight", "dbias"), got, args, strict=True):
        if t is not None:
            assert_close(a, t.grad, name=name, **BWD_TOL)


def test_pool_split_heuristic_extreme_logits_and_stride0(emu):
    """Heuristic split (small batch), logits of ±1e4, a cluster -inf everywhere but one patch (whole
    splits see only -inf), an all -inf cluster (NaN like torch.softmax), and a stride-0 grad_out."""
    inp = make_cluster_pool_inputs(1, 4, 400, 16, requires_grad=False)
    logits = torch.sign(inp.logits) * 1e4 + inp.logits
    logits[0, 1] = -math.inf
    logits[0, 1, 337] = 0.5
    out, pooled, stats, _, used = _pool_fwd(emu, logits, inp.x, inp.weight, inp.bias, 1e-6, 48 * 1024)
    assert used > 1
    # float64 oracle. The backward recomputes S = exp(logit - max) / sum from the saved stats (logit -
    # max exact), so the gradients hold the ordinary tolerance at |logit| ~ 1e4 (with a saved lse they
    # carried 1e4 * 2^-24 ≈ 6e-4 relative error).
    lr = logits.double().requires_grad_(True)
    xr = inp.x.double().requires_grad_(True)
    want = reference.cluster_pool(lr, xr, inp.weight.double(), inp.bias.double())
    assert torch.isfinite(out).all()
    assert_close(out, want, rtol=1e-4, atol=1e-4)
    assert_close(pooled[0, 1], inp.x[0, 337], **FWD_TOL)
    g = torch.ones(1, 1, 1).expand(1, 4, 16)
    want.backward(g.double())
    dl, dx, _, _ = _pool_bwd(emu, g, logits, inp.x, inp.weight, pooled, stats, 1e-6, 48 * 1024)
    assert_close(dl, lr.grad, name="dlogits", **BWD_TOL)
    assert_close(dx, xr.grad, name="dx", **BWD_TOL)

    logits[0, 2] = -math.inf
    for splits in (1, 4):
        out, pooled, stats, _, _ = _pool_fwd(emu, logits, inp.x, None, None, 1e-6, 48 * 1024, splits=splits)
        assert torch.isnan(pooled[0, 2]).all() and torch.isnan(out[0, 2]).all()
        assert stats[0, 2, 0] == -math.inf and stats[0, 2, 1] == 0
        assert torch.isfinite(out[0, [0, 1, 3]]).all()


def test_emulation_catches_a_wrong_result(emu):
    """The comparison can fail: a perturbed input gives a result the reference rejects."""
    inp = make_p2c_inputs(1, 9, 5, 1, 8)
    out, _ = _p2c_fwd(emu, inp.q, inp.k, inp.v, 0.5)
    v = inp.v.clone()
    v[0, 2, 0, 3] += 1e-2  # one value element: changes every output row's column 3
    assert_close(out, reference.p2c_attention(inp.q, inp.k, inp.v, 0.5), **FWD_TOL)
    with pytest.raises(AssertionError):
        assert_close(out, reference.p2c_attention(inp.q, inp.k, v, 0.5), **FWD_TOL)


# -- grid limits, launch attributes -----------------------------------------------------------------------


@pytest.fixture
def small_grid(emu):
    """gridDim.y/z limited to 2 (65535 on the GPU): the launch sequences plan with it, the emulated
    launches reject more, and the kernels' grid-stride loops cover the rest."""
    emu.emu_set_grid_limit(2)
    yield emu
    emu.emu_set_grid_limit(65535)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_p2c_grid_stride_over_batch_heads(small_grid, dtype):
    """B*h = 7 > the grid limit 2: each CTA row loops over (batch, head) pairs, forward and backward."""
    emu = small_grid
    inp = make_p2c_inputs(7, 20, 5, 1, 8, dtype=dtype)
    out, _ = _p2c_fwd(emu, inp.q, inp.k, inp.v, 0.3)
    exact = _exact(inp.q, inp.k, inp.v)
    want = reference.p2c_attention(*exact, 0.3)
    low = _low(inp.q, inp.k, inp.v)
    want_low = reference.p2c_attention(*low, 0.3)
    g = torch.randn(7, 20, 1, 8).to(dtype)
    want.backward(g.double())
    want_low.backward(g)
    assert_low_precision_ok(out, want_low, want, floor=1e-4)
    for deterministic in (False, True):
        got = _p2c_bwd(emu, g, inp.q, inp.k, inp.v, 0.3, deterministic, 1)
        for name, a, lo, ex in zip(("dq", "dk", "dv"), got, low, exact, strict=True):
            assert_low_precision_ok(a, lo.grad, ex.grad, name=name, floor=1e-4)


@pytest.mark.parametrize("splits", [1, 5], ids=["one-pass", "split"])
def test_pool_grid_stride_over_batches(small_grid, splits):
    """B = 5 > the grid limit 2 (grid axis y) and splits capped at 2 (axis z), forward and backward."""
    emu = small_grid
    inp = make_cluster_pool_inputs(5, 3, 100, 8, requires_grad=True)
    args = (inp.logits, inp.x, inp.weight, inp.bias)
    det = [t.detach() for t in args]
    out, pooled, stats, _, used = _pool_fwd(emu, *det, 1e-6, 48 * 1024, splits=splits)
    assert used == min(splits, 2)
    want = reference.cluster_pool(*args, 1e-6)
    assert_close(out, want, **FWD_TOL)
    g = torch.randn(5, 3, 8)
    want.backward(g)
    got = _pool_bwd(emu, g, *det[:3], pooled, stats, 1e-6, 48 * 1024)
    for name, a, t in zip(("dlogits", "dx", "dweight", "dbias"), got, args, strict=True):
        assert_close(a, t.grad, name=name, **BWD_TOL)


def test_opt_in_cache_sets_each_kernel_once_per_device(emu):
    """CudaRuntime's shared-memory opt-in (common.cuh SmemOptInCache): one cudaFuncSetAttribute per
    kernel and device and one device query per device, also under concurrent first calls; past the
    table's 64 slots a kernel still launches (the attribute is set on each call)."""
    counts = (ctypes.c_int64 * 2)()
    assert emu.emu_opt_in_cache(0, 10, 1, 3, counts) == 0
    assert list(counts) == [10, 1]
    assert emu.emu_opt_in_cache(0, 10, 1, 1, counts) == 0
    assert list(counts) == [0, 0]  # cached
    assert emu.emu_opt_in_cache(1, 30, 8, 5, counts) == 0  # another device, 8 threads at once
    assert 30 <= counts[0] <= 30 * 8 and 1 <= counts[1] <= 8
    assert emu.emu_opt_in_cache(1, 30, 8, 5, counts) == 0
    assert list(counts) == [0, 0]
    assert emu.emu_opt_in_cache(2, 70, 1, 2, counts) == 0  # 6 kernels over the 64 slots
    assert list(counts) == [64 + 2 * 6, 1]
    assert emu.emu_opt_in_cache(99, 1, 1, 2, counts) == 0  # device index past the table
    assert list(counts) == [2, 2]


def _tile_loads(emu) -> tuple[int, int]:
    return _tile_load_paths(emu)[:2]


def _tile_load_paths(emu) -> tuple[int, int, int, int]:
    """Since the last call: element tile loads, 16-byte tile loads, cp.async tile loads, cp.async copies."""
    counts = (ctypes.c_int64 * 4)()
    emu.emu_tile_loads(counts)
    return tuple(counts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_tile_loads_vectorised_with_a_scalar_fallback(emu, dtype):
    """Contiguous inputs whose heads start 16-byte aligned load in 16-byte chunks only (d = 24 in fp16 pads
    to 32: its last chunk is all fill); a misaligned base (storage offset 1), a row stride that breaks the
    alignment or a column stride != 1 fall back to element loads, with bitwise the same results."""
    for d in (40, 24):
        inp = make_p2c_inputs(1, 70, 20, 2, d, dtype=dtype)
        _tile_loads(emu)
        out, lse = _p2c_fwd(emu, inp.q, inp.k, inp.v, 0.3)
        element, vector = _tile_loads(emu)
        assert vector > 0 and element == 0, (d, element, vector)
        # The same values through a misaligned view and a transposed (column stride 2) one.
        qm = torch.empty(1 + inp.q.numel(), dtype=dtype)[1:].view_as(inp.q).copy_(inp.q)
        qt = inp.q.transpose(2, 3).contiguous().transpose(2, 3)
        ks = torch.empty(1, 20, 2, d + 1, dtype=dtype)[..., :d].copy_(inp.k)  # row stride (d+1)*h: misaligned
        for q, k in ((qm, inp.k), (qt, inp.k), (inp.q, ks)):
            got, got_lse = _p2c_fwd(emu, q, k, inp.v, 0.3)
            element, vector = _tile_loads(emu)
            assert element > 0, (d, q.stride(), k.stride())
            assert torch.equal(got, out) and torch.equal(got_lse, lse)


@pytest.mark.parametrize("dtype", [torch.float32, *LOW], ids=["fp32", *LOW_IDS])
@pytest.mark.parametrize("shape", [(1, 70, 20, 2, 40), (2, 33, 100, 2, 6), (1, 40, 256, 1, 128)],
                         ids=["one-chunk", "tail-zero-fill", "many-chunks"])
def test_p2c_forward_double_buffers_keys_and_values_with_cp_async(emu, shape, dtype):
    """Aligned contiguous keys/values stream through the forward's two chunk buffers by cp.async (one
    16-byte copy per chunk of every padded key row, zero-filled past M and D); the emulated copies land
    only at the cp.async.wait_group that covers them, and a launch that leaves copies unwaited fails. A
    misaligned value tensor sends keys and values through the synchronous loader (one buffer): bitwise the
    same output and lse."""
    b, n, m, h, d = shape
    inp = make_p2c_inputs(b, n, m, h, d, dtype=dtype)
    # Rows of 8 elements' storage per head (d = 6 is a view): every head 16-byte aligned, and d < the
    # padded width, so the last chunk of a row reads d % 4 (fp32) or 6 (fp16/bf16) elements, zero-fills
    # the rest, and fp16/bf16's second chunk (columns 8..15) is all zero fill.
    w = -(-d // 8) * 8
    q, k, v = (torch.zeros(*t.shape[:-1], w, dtype=dtype)[..., :d].copy_(t) for t in (inp.q, inp.k, inp.v))
    _tile_load_paths(emu)
    out, lse = _p2c_fwd(emu, q, k, v, 0.3)
    element, vector, tiles, copies = _tile_load_paths(emu)
    fp32 = dtype == torch.float32
    bn, pad, vec = (32, 4, 4) if fp32 else (64, 16, 8)
    mp, dp = -(-m // pad) * pad, -(-d // pad) * pad
    ctas = -(-n // bn) * b * h
    assert element == 0 and vector > 0 and tiles > 0, (element, vector, tiles)
    assert copies == ctas * 2 * mp * dp // vec  # keys and values, every chunk of every padded row
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    want = reference.p2c_attention(inp.q.double(), inp.k.double(), inp.v.double(), 0.3)
    assert_close(out.double(), want, rtol=2e-2 if not fp32 else 1e-5, atol=2e-2 if not fp32 else 1e-5)
    vm = torch.empty(1 + inp.v.numel(), dtype=dtype)[1:].view_as(inp.v).copy_(inp.v)
    got, got_lse = _p2c_fwd(emu, q, k, vm, 0.3)
    element, vector, tiles, copies = _tile_load_paths(emu)
    assert tiles == 0 and copies == 0 and element > 0, (element, tiles, copies)
    assert torch.equal(got, out) and torch.equal(got_lse, lse)


@pytest.mark.parametrize("dtype", [torch.float32, *LOW], ids=["fp32", *LOW_IDS])
@pytest.mark.parametrize("shape", [(1, 70, 20, 2, 40), (2, 33, 100, 2, 6), (1, 40, 256, 1, 128)],
                         ids=["one-chunk", "tail-zero-fill", "many-chunks"])
def test_p2c_backward_double_buffers_keys_and_values_with_cp_async(emu, shape, dtype):
    """The backward's key/value chunks (32 keys) go through cp.async and two buffer pairs for aligned
    inputs (exact copy count: every query tile loads every chunk once per sweep), and through the synchronous loader
    for a misaligned value tensor, with bitwise the same dq, dk, dv (deterministic reduction)."""
    b, n, m, h, d = shape
    inp = make_p2c_inputs(b, n, m, h, d, dtype=dtype)
    w = -(-d // 8) * 8
    q, k, v = (torch.zeros(*t.shape[:-1], w, dtype=dtype)[..., :d].copy_(t) for t in (inp.q, inp.k, inp.v))
    out, _ = _p2c_fwd(emu, q, k, v, 0.3)
    g = torch.randn_like(out)
    _tile_load_paths(emu)
    grads = _p2c_bwd(emu, g, q, k, v, 0.3, True, 2)
    element, vector, tiles, copies = _tile_load_paths(emu)
    fp32 = dtype == torch.float32
    bn, pad, vec = (32, 4, 4) if fp32 else (64, 16, 8)
    mp, dp = -(-m // pad) * pad, -(-d // pad) * pad
    tiles_n = -(-n // bn) * b * h
    # Keys and values, each loaded twice per query tile (the statistics sweep, then the gradient sweep).
    assert tiles > 0 and copies == tiles_n * 2 * 2 * mp * dp // vec, (element, vector, tiles, copies)
    vm = torch.empty(1 + v.numel(), dtype=dtype)[1:].view_as(inp.v).copy_(v)
    got = _p2c_bwd(emu, g, q, k, vm, 0.3, True, 2)
    element, vector, tiles, copies = _tile_load_paths(emu)
    assert tiles == 0 and copies == 0 and element > 0, (element, tiles, copies)
    for name, a, want in zip(("dq", "dk", "dv"), got, grads, strict=True):
        assert torch.isfinite(want).all(), name
        assert torch.equal(a, want), name


# -- tensor-core paths (fp16/bf16 WMMA, TF32 WMMA) ------------------------------------------------------


def _round(emu, x: torch.Tensor, code: int) -> torch.Tensor:
    x = x.float().contiguous()
    out = torch.empty_like(x)
    emu.emu_round(code, _ptr(x), _ptr(out), x.numel())
    return out


def test_emulated_roundings_match_the_gpu(emu):
    """fp16/bf16 conversions round to nearest even (as torch's and the GPU's __float2half_rn do), TF32 to
    nearest with ties away from zero (cvt.rna.tf32.f32, what wmma::__float_to_tf32 executes)."""
    x = torch.randn(4096) * torch.logspace(-12, 12, 4096)
    ties = torch.tensor([1 + 2**-11, 1 + 3 * 2**-11, -(1 + 2**-11), 1 + 2**-8, 1 + 2**-9 + 2**-8, 65520.0, 1e-8])
    x = torch.cat([x, ties, -ties])
    assert torch.equal(_round(emu, x, 1), x.half().float())
    assert torch.equal(_round(emu, x, 2), x.bfloat16().float())
    tf32 = _round(emu, torch.tensor([1 + 2**-11, 1 + 3 * 2**-11, -(1 + 2**-11), 1 + 2**-12, 1 + 2**-11 + 2**-20]), 3)
    assert tf32.tolist() == [1 + 2**-10, 1 + 2 * 2**-10, -(1 + 2**-10), 1.0, 1 + 2**-10]
    r = _round(emu, x, 3)  # 10 mantissa bits kept, within half a unit of the last place
    assert (r.view(torch.int32) & 0x1FFF).eq(0).all()
    assert ((r - x).abs() <= x.abs() * 2**-11).all()


def _exact(*tensors):
    """float64 leaves with the same (already rounded) values."""
    return [None if t is None else t.detach().double().requires_grad_(True) for t in tensors]


def _low(*tensors):
    return [None if t is None else t.detach().clone().requires_grad_(True) for t in tensors]


# (B, N, M, h, d, contiguous): N = 197 (a partial 64-query tile), M = 49 and 100 (one and two 64-key
# chunks forward, two and four 32-key chunks backward; padded to 64 and 112), d = 24 / 40 / 72 (padded to
# 32 / 48 / 80), strided q and interleaved k/v.
P2C_LOW_SHAPES = [
    (2, 197, 49, 2, 24, True),
    (1, 197, 100, 1, 40, False),
    (1, 70, 49, 1, 72, True),
]


@pytest.mark.parametrize("dtype", LOW, ids=LOW_IDS)
@pytest.mark.parametrize(
    "shape", P2C_LOW_SHAPES,
    ids=[shape_id(B=b, N=n, M=m, H=h, D=d) + ("" if c else "-strided") for b, n, m, h, d, c in P2C_LOW_SHAPES],
)
def test_p2c_tensor_cores_within_flash_attention_rule(emu, shape, dtype):
    """The fp16/bf16 WMMA path, forward and backward (atomic and deterministic dk/dv), against float64 by
    FlashAttention's rule: at most 2x the error of the PyTorch reference run in the same precision."""
    b, n, m, h, d, contiguous = shape
    inp = make_p2c_inputs(b, n, m, h, d, dtype=dtype, contiguous=contiguous)
    scale = d**-0.5
    out, lse = _p2c_fwd(emu, inp.q, inp.k, inp.v, scale)
    assert out.dtype == dtype
    low = _low(inp.q, inp.k, inp.v)
    exact = _exact(inp.q, inp.k, inp.v)
    want_low = reference.p2c_attention(*low, scale)
    want = reference.p2c_attention(*exact, scale)
    assert_low_precision_ok(out, want_low, want, name="out")
    scores = torch.einsum("bnhd,bmhd->bhnm", *exact[:2]).detach() * scale
    scores_low = torch.einsum("bnhd,bmhd->bhnm", *low[:2]).detach() * scale
    assert_low_precision_ok(lse, torch.logsumexp(scores_low, -1), torch.logsumexp(scores, -1), name="lse")
    g = torch.randn(b, n, h, d).to(dtype)
    want_low.backward(g)
    want.backward(g.double())
    for deterministic in (False, True):
        got = _p2c_bwd(emu, g, inp.q, inp.k, inp.v, scale, deterministic, 1)
        for name, a, lo, ex in zip(("dq", "dk", "dv"), got, low, exact, strict=True):
            assert a.dtype == dtype and torch.isfinite(a).all(), name
            assert_low_precision_ok(a, lo.grad, ex.grad, name=f"{name} ({'deterministic' if deterministic else 'atomic'})")


# (B, M, N, C, contiguous): N = 197 over several tiles and splits, M = 49 (partial cluster blocks), C = 40
# and 100 (padded to 48 and 112 for the 16-wide TF32 tiles).
POOL_LOW_SHAPES = [(2, 49, 197, 40, True), (1, 49, 197, 100, False)]


@pytest.mark.parametrize("splits", [1, 3], ids=["one-pass", "split3"])
@pytest.mark.parametrize("dtype", LOW, ids=LOW_IDS)
@pytest.mark.parametrize(
    "shape", POOL_LOW_SHAPES,
    ids=[shape_id(B=b, M=m, N=n, C=c) + ("" if ct else "-strided") for b, m, n, c, ct in POOL_LOW_SHAPES],
)
def test_pool_tensor_cores_within_flash_attention_rule(emu, shape, dtype, splits):
    """The TF32 WMMA path of half-precision cluster_pool (float probabilities rounded to TF32, float
    accumulation), forward (one pass and split-N) and backward, by FlashAttention's rule."""
    b, m, n, c, contiguous = shape
    inp = make_cluster_pool_inputs(b, m, n, c, dtype=dtype, contiguous=contiguous)
    args = (inp.logits, inp.x, inp.weight, inp.bias)
    out, pooled, stats, _, used = _pool_fwd(emu, *args, 1e-6, 227 * 1024, splits=splits)
    assert out.dtype == dtype and used == splits
    low, exact = _low(*args), _exact(*args)
    want_low = reference.cluster_pool(*low, 1e-6)
    want = reference.cluster_pool(*exact, 1e-6)
    assert_low_precision_ok(out, want_low, want, name="out")
    p_low = torch.softmax(low[0].detach(), -1) @ low[1].detach()
    p_exact = torch.softmax(exact[0].detach(), -1) @ exact[1].detach()
    assert_low_precision_ok(pooled, p_low, p_exact, name="pooled")
    row_max = inp.logits.float().amax(-1)
    assert torch.equal(stats[..., 0], row_max)  # exact: the backward's logits - max must be
    assert_low_precision_ok(stats[..., 1], torch.exp(low[0].detach() - row_max.to(dtype)[..., None]).sum(-1),
                            torch.exp(exact[0].detach() - row_max.double()[..., None]).sum(-1), name="row sum")
    g = torch.randn(b, m, c).to(dtype)
    want_low.backward(g)
    want.backward(g.double())
    got = _pool_bwd(emu, g, inp.logits, inp.x, inp.weight, pooled, stats, 1e-6, 227 * 1024)
    for name, a, lo, ex in zip(("dlogits", "dx", "dweight", "dbias"), got, low, exact, strict=True):
        assert torch.isfinite(a).all(), name
        assert_low_precision_ok(a, lo.grad, ex.grad, name=name)


@pytest.mark.parametrize("dtype", LOW, ids=LOW_IDS)
def test_pool_tensor_cores_every_configuration(emu, dtype):
    """Each of the three tile configurations of the TF32 path (forced through the shared-memory budget)."""
    inp = make_cluster_pool_inputs(1, 37, 150, 24, dtype=dtype)
    args = (inp.logits, inp.x, inp.weight, inp.bias)
    fwd3, bwd3 = _smem(emu, 24, dtype)
    exact, low = _exact(*args), _low(*args)
    want, want_low = reference.cluster_pool(*exact, 1e-6), reference.cluster_pool(*low, 1e-6)
    g = torch.randn(1, 37, 24).to(dtype)
    want.backward(g.double())
    want_low.backward(g)
    for config in range(3):
        out, pooled, stats, cfg, _ = _pool_fwd(emu, *args, 1e-6, fwd3[config], splits=1)
        assert cfg == config
        assert_low_precision_ok(out, want_low, want, name=f"out cfg{config}")
        got = _pool_bwd(emu, g, inp.logits, inp.x, inp.weight, pooled, stats, 1e-6, bwd3[config])
        for name, a, lo, ex in zip(("dlogits", "dx"), got, low, exact, strict=False):
            assert_low_precision_ok(a, lo.grad, ex.grad, name=f"{name} cfg{config}")


def test_tensor_core_emulation_catches_a_wrong_result(emu):
    """The rule can fail on the emulated half path: one value element off by 1/8 (through the kernel)."""
    inp = make_p2c_inputs(1, 40, 20, 1, 24, dtype=torch.float16)
    exact = _exact(inp.q, inp.k, inp.v)
    want, low = reference.p2c_attention(*exact, 0.2), reference.p2c_attention(inp.q, inp.k, inp.v, 0.2)
    out, _ = _p2c_fwd(emu, inp.q, inp.k, inp.v, 0.2)
    assert_low_precision_ok(out, low, want)
    v = inp.v.clone()
    v[0, 3, 0, 5] += 0.125
    bad, _ = _p2c_fwd(emu, inp.q, inp.k, v, 0.2)
    with pytest.raises(AssertionError):
        assert_low_precision_ok(bad, low, want)


def test_headers_exist():
    assert SOURCE.is_file() and all(h.is_file() for h in HEADERS)
