"""The CUDA kernels' float32 path, run on the CPU: tests/backends/cuda_emulation.cpp compiles the production kernels
and launch sequences (csrc/cuda/*.cuh) with the host compiler over an emulated CUDA runtime (a CTA = one
std::thread per CUDA thread, __syncthreads = a barrier, NaN-filled shared memory and workspaces), and this
file compares their results with the reference through ctypes.

What this checks without a GPU: indexing (strides, padding, partial tiles, key chunks), the
synchronisation structure (a missing barrier or a read of unwritten shared memory gives NaN or wrong
values), the online softmax and its split-N merge, the LayerNorm epilogue and backward, the fixed-order
and atomic dk/dv reductions, every tile configuration of cluster_pool. Not covered: the tensor-core
(fp16/bf16/TF32) products, real GPU memory ordering and timing, and the torch glue (the cuda
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
from paca_kernels.testing import assert_close, make_cluster_pool_inputs, make_p2c_inputs, shape_id

ROOT = Path(__file__).resolve().parents[2]
SOURCE = Path(__file__).resolve().with_name("cuda_emulation.cpp")
HEADERS = sorted((ROOT / "csrc" / "cuda").glob("*.cuh")) + [ROOT / "csrc" / "cuda" / h for h in ("launchers.h", "limits.h")]

FWD_TOL = {"rtol": 1e-5, "atol": 1e-5}
BWD_TOL = {"rtol": 1e-4, "atol": 3e-5}
I64P = ctypes.POINTER(ctypes.c_int64)
FP = ctypes.c_void_p


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
    dll.emu_p2c_fwd.argtypes = [i64] * 5 + [f32] + [FP, I64P] * 3 + [FP, FP]
    dll.emu_p2c_bwd.argtypes = [i64] * 5 + [f32, i32, i32] + [FP, I64P] * 6 + [FP] * 3
    dll.emu_pool_fwd.argtypes = [i64] * 4 + [f32] + [FP, I64P] * 2 + [FP] * 5 + [i32, i64, i64, I64P]
    dll.emu_pool_bwd.argtypes = [i64] * 4 + [f32] + [FP, I64P] * 3 + [FP] + [FP, I64P] * 2 + [FP] * 4 + [i64]
    dll.emu_pool_smem.argtypes = [i64, I64P, I64P]
    for name in ("emu_p2c_fwd", "emu_p2c_bwd", "emu_pool_fwd", "emu_pool_bwd"):
        getattr(dll, name).restype = i32
    return dll


def _strides(t: torch.Tensor):
    return (ctypes.c_int64 * t.dim())(*t.stride())


def _ptr(t: torch.Tensor | None):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def _nan(*shape: int) -> torch.Tensor:
    return torch.full(shape, math.nan)


# -- p2c_attention ----------------------------------------------------------------------------------


def _p2c_fwd(emu, q, k, v, scale):
    b, n, h, d = q.shape
    m = k.shape[1]
    out, lse = _nan(b, n, h, d), _nan(b, h, n)
    rc = emu.emu_p2c_fwd(b, n, m, h, d, scale, _ptr(q), _strides(q), _ptr(k), _strides(k), _ptr(v),
                         _strides(v), _ptr(out), _ptr(lse))
    assert rc == 0
    return out, lse


def _p2c_bwd(emu, g, q, k, v, out, lse, scale, deterministic, num_sms):
    b, n, h, d = q.shape
    m = k.shape[1]
    dq, dk, dv = _nan(b, n, h, d), _nan(b, m, h, d), _nan(b, m, h, d)
    rc = emu.emu_p2c_bwd(b, n, m, h, d, scale, int(deterministic), num_sms,
                         _ptr(q), _strides(q), _ptr(k), _strides(k), _ptr(v), _strides(v),
                         _ptr(out), _strides(out), _ptr(g), _strides(g), _ptr(lse), _strides(lse),
                         _ptr(dq), _ptr(dk), _ptr(dv))  # fmt: skip
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
    got = _p2c_bwd(emu, g, inp.q.detach(), inp.k.detach(), inp.v.detach(), out, lse, scale, deterministic, 1)
    for name, a, t in zip(("dq", "dk", "dv"), got, (inp.q, inp.k, inp.v), strict=True):
        assert_close(a, t.grad, name=name, **BWD_TOL)


def test_p2c_deterministic_groups_and_stride0_grad(emu):
    """Deterministic dk/dv repeat bitwise, match the reference with one group or many (and the atomic
    path), and a stride-0 upstream gradient (what out.sum().backward() passes) is read correctly."""
    inp = make_p2c_inputs(1, 150, 20, 2, 16)
    out, lse = _p2c_fwd(emu, inp.q, inp.k, inp.v, 0.3)
    g = torch.ones(1, 1, 1, 1).expand(1, 150, 2, 16)  # what out.sum().backward() passes
    runs = [_p2c_bwd(emu, g, inp.q, inp.k, inp.v, out, lse, 0.3, True, sms) for sms in (1, 1, 132)]
    atomic = _p2c_bwd(emu, g, inp.q, inp.k, inp.v, out, lse, 0.3, False, 132)
    q, k, v = (t.clone().requires_grad_(True) for t in (inp.q, inp.k, inp.v))
    reference.p2c_attention(q, k, v, 0.3).sum().backward()
    for i, (name, t) in enumerate(zip(("dq", "dk", "dv"), (q, k, v), strict=True)):
        assert torch.equal(runs[0][i], runs[1][i])
        for r in (runs[0], runs[2], atomic):
            assert_close(r[i], t.grad, name=name, **BWD_TOL)


# -- cluster_pool -----------------------------------------------------------------------------------


def _smem(emu, c):
    f3, b3 = (ctypes.c_int64 * 3)(), (ctypes.c_int64 * 3)()
    emu.emu_pool_smem(c, f3, b3)
    return list(f3), list(b3)


def _pool_fwd(emu, logits, x, w, bias, eps, max_smem, splits=0, num_sms=132):
    b, m, n = logits.shape
    c = x.shape[2]
    out, pooled, lse = _nan(b, m, c), _nan(b, m, c), _nan(b, m)
    used = ctypes.c_int64(0)
    cfg = emu.emu_pool_fwd(b, m, n, c, eps, _ptr(logits), _strides(logits), _ptr(x), _strides(x), _ptr(w),
                           _ptr(bias), _ptr(out), _ptr(pooled), _ptr(lse), num_sms, max_smem, splits,
                           ctypes.byref(used))  # fmt: skip
    assert cfg >= 0
    return out, pooled, lse, cfg, used.value


def _pool_bwd(emu, g, logits, x, w, pooled, lse, eps, max_smem):
    b, m, n = logits.shape
    c = x.shape[2]
    dl, dx, dw, db = _nan(b, m, n), _nan(b, n, c), _nan(c), _nan(c)
    rc = emu.emu_pool_bwd(b, m, n, c, eps, _ptr(g), _strides(g), _ptr(logits), _strides(logits), _ptr(x),
                          _strides(x), _ptr(w), _ptr(pooled), _strides(pooled), _ptr(lse), _strides(lse),
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
    out, pooled, lse, cfg, used = _pool_fwd(emu, *det, 1e-6, fwd3[config], splits=splits)
    bk = (32, 32, 16)[config]  # patches per tile of each configuration (cluster_pool.cuh: kFwdBK)
    chunk = math.ceil(math.ceil(n / max(1, min(splits, math.ceil(n / bk)))) / bk) * bk
    assert cfg == config and used == math.ceil(n / chunk)
    want = reference.cluster_pool(*args, 1e-6)
    assert_close(out, want, **FWD_TOL)
    assert_close(pooled, torch.softmax(det[0], -1) @ det[1], **FWD_TOL, name="pooled")
    assert_close(lse, torch.logsumexp(det[0], -1), **FWD_TOL, name="lse")
    g = torch.randn(b, m, c)
    want.backward(g)
    got = _pool_bwd(emu, g, det[0], det[1], det[2], pooled, lse, 1e-6, bwd3[config])
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
    out, pooled, lse, _, used = _pool_fwd(emu, logits, inp.x, inp.weight, inp.bias, 1e-6, 48 * 1024)
    assert used > 1
    # float64 oracle: in float32, exp(logit - lse) with |logit| ~ 1e4 carries ~1e4 * 6e-8 relative
    # error in any implementation, so the tolerance below is 1e4 * float32 epsilon, not 1e-5.
    lr = logits.double().requires_grad_(True)
    xr = inp.x.double().requires_grad_(True)
    want = reference.cluster_pool(lr, xr, inp.weight.double(), inp.bias.double())
    assert torch.isfinite(out).all()
    assert_close(out, want, rtol=1e-4, atol=1e-4)
    assert_close(pooled[0, 1], inp.x[0, 337], **FWD_TOL)
    g = torch.ones(1, 1, 1).expand(1, 4, 16)
    want.backward(g.double())
    dl, dx, _, _ = _pool_bwd(emu, g, logits, inp.x, inp.weight, pooled, lse, 1e-6, 48 * 1024)
    assert_close(dl, lr.grad, rtol=2e-3, atol=2e-3, name="dlogits")
    assert_close(dx, xr.grad, rtol=2e-3, atol=2e-3, name="dx")

    logits[0, 2] = -math.inf
    for splits in (1, 4):
        out, pooled, lse, _, _ = _pool_fwd(emu, logits, inp.x, None, None, 1e-6, 48 * 1024, splits=splits)
        assert torch.isnan(pooled[0, 2]).all() and torch.isnan(out[0, 2]).all() and lse[0, 2] == -math.inf
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


def test_headers_exist():
    assert SOURCE.is_file() and all(h.is_file() for h in HEADERS)
