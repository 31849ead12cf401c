"""Tests of the C++ build chain: paca_kernels._C loads, records its build, and its CPU
``cluster_pool_fwd`` kernel matches an explicit float64 formula.

Kernel numerics beyond this smoke level (gradients, all backends) live in the op tests.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from paca_kernels import _ext

if not _ext.load():
    pytest.skip(f"C++ extension unavailable: {_ext.unavailable_reason()}", allow_module_level=True)

OPS = torch.ops.paca_kernels
EXT_PY = Path(_ext.__file__)
EPS = 1e-6

SCHEMAS = {
    "cluster_pool_fwd": "paca_kernels::cluster_pool_fwd(Tensor logits, Tensor x, Tensor? weight, "
    "Tensor? bias, float eps) -> (Tensor out, Tensor pooled, Tensor stats)",
    "cluster_pool_bwd": "paca_kernels::cluster_pool_bwd(Tensor grad_out, Tensor logits, Tensor x, "
    "Tensor? weight, Tensor pooled, Tensor stats, float eps) -> (Tensor grad_logits, "
    "Tensor grad_x, Tensor grad_weight, Tensor grad_bias)",
    "p2c_attention_fwd": "paca_kernels::p2c_attention_fwd(Tensor q, Tensor k, Tensor v, "
    "float scale) -> (Tensor out, Tensor lse)",
    "p2c_attention_bwd": "paca_kernels::p2c_attention_bwd(Tensor grad_out, Tensor q, Tensor k, "
    "Tensor v, float scale, bool deterministic) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v)",
    "p2c_attention_saved_fwd": "paca_kernels::p2c_attention_saved_fwd(Tensor q, Tensor k, Tensor v, "
    "float scale) -> (Tensor out, Tensor exp_scores, Tensor exp_sums)",
    "p2c_attention_saved_bwd": "paca_kernels::p2c_attention_saved_bwd(Tensor grad_out, Tensor q, "
    "Tensor k, Tensor v, Tensor exp_scores, Tensor exp_sums, float scale) -> (Tensor grad_q, "
    "Tensor grad_k, Tensor grad_v)",
}


# ---------------------------------------------------------------------------------------------
# Loading and build info


def test_extension_loads_and_records_build_info() -> None:
    assert _ext.available() and _ext.unavailable_reason() is None
    info = _ext.build_info()
    assert info is not None
    assert info["torch_version"] == torch.__version__
    assert info["torch_cuda"] == torch.version.cuda
    assert isinstance(info["cuda_built"], bool) and _ext.cuda_built() == info["cuda_built"]
    if torch.version.cuda is None:
        assert not info["cuda_built"] and info["cuda_archs"] is None
    assert info["cxx_compiler"] and info["build_date"]
    assert info["cxx11_abi"] == bool(torch._C._GLIBCXX_USE_CXX11_ABI)
    assert "paca_kernels._C" in sys.modules


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_schema_defined(name: str) -> None:
    assert str(getattr(OPS, name).default._schema) == SCHEMAS[name]


def _probe(pkg_dir: Path, env_extra: dict[str, str] | None = None) -> tuple[bool, str | None]:
    """load() and unavailable_reason() of a fresh interpreter running ``pkg_dir/_ext.py``.

    The file is loaded standalone so that the probe sees only what sits next to it.
    """
    code = textwrap.dedent(
        f"""
        import importlib.util, json
        spec = importlib.util.spec_from_file_location("_ext_probe", {str(pkg_dir / "_ext.py")!r})
        e = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(e)
        print(json.dumps([e.load(), e.unavailable_reason(), e.load()]))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PACA_KERNELS_DISABLE_EXT"}
    env.update(env_extra or {})
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    loaded, reason, loaded_again = json.loads(res.stdout.strip().splitlines()[-1])
    assert loaded == loaded_again  # cached, never raises
    return loaded, reason


def test_disabled_by_env_gives_reason() -> None:
    loaded, reason = _probe(EXT_PY.parent, {"PACA_KERNELS_DISABLE_EXT": "1"})
    assert not loaded
    assert reason is not None and "PACA_KERNELS_DISABLE_EXT=1" in reason


def test_missing_extension_gives_reason(tmp_path: Path) -> None:
    shutil.copy(EXT_PY, tmp_path / "_ext.py")
    loaded, reason = _probe(tmp_path)
    assert not loaded
    assert reason is not None and "not built" in reason and "pip install" in reason


def test_stale_build_is_not_imported(tmp_path: Path) -> None:
    # An empty "_C" would fail to import: the reason must come from the version check instead.
    shutil.copy(EXT_PY, tmp_path / "_ext.py")
    (tmp_path / Path(sys.modules["paca_kernels._C"].__file__).name).write_bytes(b"")
    (tmp_path / "_build_info.json").write_text(json.dumps({"torch_version": "0.0.1+fake"}))
    loaded, reason = _probe(tmp_path)
    assert not loaded
    assert reason is not None
    assert f"built for torch 0.0.1+fake, running torch {torch.__version__}" in reason
    assert "rebuild" in reason


def test_import_failure_gives_reason(tmp_path: Path) -> None:
    shutil.copy(EXT_PY, tmp_path / "_ext.py")
    (tmp_path / Path(sys.modules["paca_kernels._C"].__file__).name).write_bytes(b"not an ELF")
    (tmp_path / "_build_info.json").write_text(json.dumps({"torch_version": torch.__version__}))
    loaded, reason = _probe(tmp_path)
    assert not loaded
    assert reason is not None and "failed to import" in reason and "ImportError" in reason


# ---------------------------------------------------------------------------------------------
# Kernel limits: one source (csrc/cuda/limits.h), reaching Python through the build info

ROOT = Path(__file__).resolve().parents[1]
LIMITS_HEADER = ROOT / "csrc" / "cuda" / "limits.h"
CUDA_LIMIT_NAMES = {
    "max_keys": "kMaxKeys",
    "max_head_dim": "kMaxHeadDim",
    "max_channels": "kMaxChannels",
    "max_channels_small_smem": "kMaxChannelsSmallSmem",
    "smem_per_block_sm80": "kSmemPerBlockSm80",
    "smem_per_block_sm90": "kSmemPerBlockSm90",
}


def _header_constants(header: Path) -> dict[str, int]:
    found = re.findall(r"^\s*constexpr\s+int64_t\s+(k\w+)\s*=\s*(\d+)\s*;", header.read_text(), re.MULTILINE)
    return {name: int(value) for name, value in found}


def test_build_info_limits_equal_the_cuda_header() -> None:
    consts = _header_constants(LIMITS_HEADER)
    # Every constant of the header reaches Python (a new one must be added to setup.py's CUDA_LIMITS).
    assert set(consts) == set(CUDA_LIMIT_NAMES.values())
    expected = {key: consts[name] for key, name in CUDA_LIMIT_NAMES.items()}
    assert _ext.kernel_limits("cuda") == expected
    assert _ext.build_info()["limits"]["cuda"] == expected  # also for CPU-only builds
    assert _ext.kernel_limits("cpu") is None  # no size limits recorded


def test_kernel_limits_without_build_info(tmp_path: Path) -> None:
    shutil.copy(EXT_PY, tmp_path / "_ext.py")
    code = textwrap.dedent(
        f"""
        import importlib.util, json
        spec = importlib.util.spec_from_file_location("_ext_probe", {str(tmp_path / "_ext.py")!r})
        e = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(e)
        print(json.dumps(e.kernel_limits("cuda")))
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(res.stdout.strip().splitlines()[-1]) is None


# ---------------------------------------------------------------------------------------------
# The per-ISA translation units (csrc/cpu/math/kernels_*.cpp) keep the ODR rule of dispatch.h

MATH_DIR = ROOT / "csrc" / "cpu" / "math"
ISA_SAFE_INCLUDES = {"<immintrin.h>", "<cstdint>", '"cpu/math/dispatch.h"', '"cpu/math/gelu_coefficients.h"'}


def _includes(path: Path) -> set[str]:
    return set(re.findall(r"^\s*#\s*include\s+([<\"][^>\"]+[>\"])", path.read_text(), re.MULTILINE))


#: Beyond ISA_SAFE_INCLUDES: the AVX-512 TUs' shared 16-lane helpers (internal linkage, checked
#: below), and the AMX TU's system headers for its tile-permission syscall (declarations only).
ISA_EXTRA_INCLUDES = {
    "avx2": set(),
    "avx512": {'"cpu/math/avx512_lanes.h"'},
    "avx512bf16": {'"cpu/math/avx512_lanes.h"'},
    "amx": {'"cpu/math/avx512_lanes.h"', "<sys/syscall.h>", "<unistd.h>"},
}


@pytest.mark.parametrize("isa", sorted(ISA_EXTRA_INCLUDES))
def test_isa_translation_unit_includes_only_code_free_headers(isa: str) -> None:
    # An inline function or template instantiated with -mavx2 / -mavx512f could be merged by the
    # linker with the baseline one (and run on a CPU without that ISA): the ISA files may include
    # only intrinsics, headers without function bodies, and avx512_lanes.h, whose functions all
    # have internal linkage.
    assert _includes(MATH_DIR / f"kernels_{isa}.cpp") <= ISA_SAFE_INCLUDES | ISA_EXTRA_INCLUDES[isa]
    for header in ("dispatch.h", "gelu_coefficients.h"):
        assert _includes(MATH_DIR / header) <= {"<cstdint>"}
    lanes = (MATH_DIR / "avx512_lanes.h").read_text()
    assert _includes(MATH_DIR / "avx512_lanes.h") <= {"<immintrin.h>", "<cstdint>", '"cpu/math/gelu_coefficients.h"'}
    # Every function body of the shared header sits inside its unnamed namespace.
    body = lanes[lanes.index("namespace {"):lanes.index("}  // namespace\n")]
    outside = lanes.replace(body, "")
    assert not re.search(r"\)\s*\{", outside), "a function defined outside the unnamed namespace"


@pytest.mark.parametrize("isa", sorted(ISA_EXTRA_INCLUDES))
def test_isa_object_exports_only_its_registration(isa: str) -> None:
    nm = shutil.which("nm")
    objs = sorted((ROOT / "build").glob(f"cmake-*/CMakeFiles/_C.dir/csrc/cpu/math/kernels_{isa}.cpp.o"))
    if nm is None or not objs:
        pytest.skip("no nm, or no CMake build directory with the object files")
    for obj in objs:
        out = subprocess.run([nm, "--defined-only", str(obj)], capture_output=True, text=True, check=True)
        # Global (T, D, B, R...), weak (W, V) and unique (u) symbols: only register_kernels.
        shared = [line for line in out.stdout.splitlines() if line.split()[1:2] and line.split()[1] not in "tdbrn"]
        assert len(shared) == 1 and "register_kernels" in shared[0], shared


# ---------------------------------------------------------------------------------------------
# cluster_pool_fwd vs an explicit float64 formula


def _reference(
    logits: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = EPS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, pooled, stats) in float64 from the definition: softmax, bmm, layer_norm, and the stats
    (B, M, 2) = (row max, Σ exp(logits − max)), the sum 0 where a row is all -inf."""
    logits64, x64 = logits.double(), x.double()
    pooled = torch.bmm(torch.softmax(logits64, dim=-1), x64)
    w = weight.double() if weight is not None else None
    b = bias.double() if bias is not None else None
    out = F.layer_norm(pooled, (x.shape[-1],), w, b, eps)
    row_max = logits64.amax(-1)
    row_sum = torch.exp(logits64 - row_max[..., None]).sum(-1).masked_fill(row_max == float("-inf"), 0.0)
    return out, pooled, torch.stack([row_max, row_sum], -1)


def _torch_lowp(
    logits: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None
) -> torch.Tensor:
    """The same computation done by PyTorch in the inputs' (low) precision."""
    pooled = torch.bmm(torch.softmax(logits, dim=-1), x)
    w = weight.to(x.dtype) if weight is not None else None
    b = bias.to(x.dtype) if bias is not None else None
    return F.layer_norm(pooled, (x.shape[-1],), w, b, EPS)


def _inputs(
    B: int, M: int, N: int, C: int, dtype: torch.dtype, affine: bool, pdtype: torch.dtype | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    logits = torch.randn(B, M, N, dtype=dtype) * 2
    x = torch.randn(B, N, C, dtype=dtype)
    if not affine:
        return logits, x, None, None
    pdtype = pdtype or dtype
    return logits, x, torch.randn(C, dtype=pdtype), torch.randn(C, dtype=pdtype)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


SHAPES = [(2, 49, 197, 24), (3, 1, 1, 5), (1, 1, 7, 3), (2, 5, 1, 8), (1, 4, 33, 1)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("affine", [False, True], ids=["plain", "affine"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_fwd_matches_formula(shape: tuple[int, ...], affine: bool, dtype: torch.dtype) -> None:
    logits, x, w, b = _inputs(*shape, dtype, affine, None)
    out, pooled, stats = OPS.cluster_pool_fwd(logits, x, w, b, EPS)
    ref_out, ref_pooled, ref_stats = _reference(logits, x, w, b)
    B, M, _, C = shape
    assert out.shape == (B, M, C) and out.dtype == dtype
    assert pooled.shape == (B, M, C) and pooled.dtype == _acc(dtype)
    assert stats.shape == (B, M, 2) and stats.dtype == _acc(dtype)
    tol = {"rtol": 1e-10, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(pooled.double(), ref_pooled, **tol)
    torch.testing.assert_close(stats.double(), ref_stats, **tol)
    # LayerNorm divides by the pooled std (small when C is tiny): allow that amplification.
    out_tol = tol if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-4}
    torch.testing.assert_close(out.double(), ref_out, **out_tol)


@pytest.mark.parametrize("affine", [False, True], ids=["plain", "affine"])
@pytest.mark.parametrize(
    ("dtype", "pdtype"),
    [
        (torch.bfloat16, None),
        (torch.bfloat16, torch.float32),
        (torch.float16, None),
        (torch.float16, torch.float32),
    ],
    ids=["bf16", "bf16-f32affine", "f16", "f16-f32affine"],
)
def test_fwd_low_precision(dtype: torch.dtype, pdtype: torch.dtype | None, affine: bool) -> None:
    logits, x, w, b = _inputs(2, 49, 197, 24, dtype, affine, pdtype)
    out, pooled, stats = OPS.cluster_pool_fwd(logits, x, w, b, EPS)
    ref_out, ref_pooled, ref_stats = _reference(logits, x, w, b)
    assert out.dtype == dtype and pooled.dtype == torch.float32 and stats.dtype == torch.float32
    # stats accumulate in float32 from the exact low-precision logits.
    torch.testing.assert_close(stats.double(), ref_stats, rtol=1e-5, atol=1e-5)
    if dtype == torch.bfloat16 and OPS.cpu_isa() in ("avx512bf16", "amx"):
        # bf16 where the CPU multiplies bf16: the pooling product is bf16 products with float32
        # sums (the probabilities rounded to bf16, as autocast's bf16 matmul of the assignment and
        # x): pooled within twice the error of that matmul done by PyTorch in bf16.
        lowp = torch.bmm(torch.softmax(logits.double(), dim=-1).to(dtype), x).double()
        perr = (pooled.double() - ref_pooled).abs().max().item()
        assert perr <= 2 * (lowp - ref_pooled).abs().max().item(), perr
        assert perr > 0  # rounded: this path really multiplied bf16
    else:
        # pooled accumulates in float32 from the exact low-precision inputs.
        torch.testing.assert_close(pooled.double(), ref_pooled, rtol=1e-5, atol=1e-5)
    # out: at most twice the error PyTorch makes doing the same computation in low precision.
    err = (out.double() - ref_out).abs().max().item()
    torch_err = (_torch_lowp(logits, x, w, b).double() - ref_out).abs().max().item()
    assert err <= 2 * torch_err + 1e-3, (err, torch_err)


def test_fwd_non_contiguous_and_expanded_inputs() -> None:
    B, M, N, C = 3, 6, 19, 10
    x = torch.randn(B, C, N).transpose(1, 2)  # (B, N, C) view, channel stride N
    logits = torch.randn(1, M, N).expand(B, M, N)  # batch stride 0
    assert not x.is_contiguous() and logits.stride(0) == 0
    w, b = torch.randn(C), torch.randn(C)
    out, pooled, stats = OPS.cluster_pool_fwd(logits, x, w, b, EPS)
    ref_out, ref_pooled, ref_stats = _reference(logits, x, w, b)
    torch.testing.assert_close(pooled.double(), ref_pooled, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.double(), ref_stats, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-4, atol=1e-4)

    # Stride 0 along N (constant logits): uniform softmax, i.e. the mean over patches.
    flat = torch.randn(B, M, 1).expand(B, M, N)
    _, pooled, stats = OPS.cluster_pool_fwd(flat, x, None, None, EPS)
    torch.testing.assert_close(pooled, x.mean(1, keepdim=True).expand(B, M, C))
    assert torch.equal(stats[..., 0], flat[..., 0]) and torch.equal(stats[..., 1], torch.full((B, M), float(N)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fwd_large_logits_finite(dtype: torch.dtype) -> None:
    logits = (torch.randn(2, 7, 50) * 1e4).to(dtype)
    logits[0, 0] = 1e4  # ties at the maximum
    logits[0, 1] = -1e4
    x = torch.randn(2, 50, 12, dtype=dtype)
    out, pooled, stats = OPS.cluster_pool_fwd(logits, x, None, None, EPS)
    assert torch.isfinite(out).all() and torch.isfinite(pooled).all() and torch.isfinite(stats).all()
    ref_out, ref_pooled, ref_stats = _reference(logits, x, None, None)
    torch.testing.assert_close(pooled.double(), ref_pooled, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.double(), ref_stats, rtol=1e-5, atol=1e-5)  # the max is exact
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), ref_out, rtol=1e-4, atol=1e-4)


def test_fwd_masked_rows() -> None:
    B, M, N, C = 2, 3, 11, 6
    logits = torch.randn(B, M, N)
    x = torch.randn(B, N, C)
    logits[1, 2] = float("-inf")
    logits[1, 2, 7] = 0.3  # all -inf but one: one-hot pooling of that patch
    logits[0, 1] = float("-inf")  # all -inf: NaN like torch.softmax
    out, pooled, stats = OPS.cluster_pool_fwd(logits, x, None, None, EPS)
    assert torch.equal(pooled[1, 2], x[1, 7])
    assert stats[1, 2].tolist() == [pytest.approx(0.3), 1.0]
    assert torch.isnan(pooled[0, 1]).all() and torch.isnan(out[0, 1]).all()
    assert stats[0, 1].tolist() == [float("-inf"), 0.0]
    ref_out, ref_pooled, ref_stats = _reference(logits, x, None, None)
    torch.testing.assert_close(pooled.double(), ref_pooled, rtol=1e-5, atol=1e-5, equal_nan=True)
    torch.testing.assert_close(stats.double(), ref_stats)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-4, atol=1e-4, equal_nan=True)


def test_fwd_empty_batch() -> None:
    out, pooled, stats = OPS.cluster_pool_fwd(
        torch.randn(0, 4, 5), torch.randn(0, 5, 3), None, None, EPS
    )
    assert out.shape == (0, 4, 3) and pooled.shape == (0, 4, 3) and stats.shape == (0, 4, 2)


@pytest.mark.parametrize(
    ("logits", "x", "weight", "match"),
    [
        (torch.randn(4, 5), torch.randn(1, 5, 3), None, "logits to have 3 dimensions"),
        (torch.randn(1, 4, 5), torch.randn(1, 5, 3, 1), None, "x to have 3 dimensions"),
        (torch.randn(2, 4, 5), torch.randn(3, 5, 3), None, "batch size B"),
        (torch.randn(1, 4, 5), torch.randn(1, 6, 3), None, "number of patches N"),
        (torch.randn(1, 4, 5).double(), torch.randn(1, 5, 3), None, "same dtype"),
        (
            torch.ones(1, 4, 5, dtype=torch.int32),
            torch.ones(1, 5, 3, dtype=torch.int32),
            None,
            "float64, float32, float16 or bfloat16",
        ),
        (torch.randn(1, 4, 5), torch.randn(1, 5, 3), torch.randn(4), "weight of shape \\(3,\\)"),
        (
            torch.randn(1, 4, 5),
            torch.randn(1, 5, 3),
            torch.randn(3).double(),
            "weight to have dtype",
        ),
        (torch.randn(1, 4, 0), torch.randn(1, 0, 3), None, "N > 0"),
    ],
    ids=["logits-rank", "x-rank", "B", "N", "dtype", "int", "weight-shape", "weight-dtype", "N0"],
)
def test_fwd_input_checks(
    logits: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, match: str
) -> None:
    with pytest.raises(RuntimeError, match=match):
        OPS.cluster_pool_fwd(logits, x, weight, None, EPS)


def test_fwd_bias_shape_check() -> None:
    with pytest.raises(RuntimeError, match="bias of shape"):
        OPS.cluster_pool_fwd(torch.randn(1, 4, 5), torch.randn(1, 5, 3), None, torch.randn(2), EPS)
