"""The Triton kernels as a GPU would see them, without a GPU.

- The resource gate: every launch configuration the launchers can choose (paca_kernels/triton/plan.py,
  enumerated for an H100) compiled for sm_90 by the installed Triton and, when the environment exists,
  by Triton 3.6 (the GPU machine's version, .venv-triton36 made by scripts/triton_gate.sh): it compiles,
  its shared memory fits 227 KiB, fp16/bf16 kernels neither spill nor use a stack, dk/dv reduce without
  returning atomics. It runs on GPU machines too (the target is sm_90 whatever the device). fp32 variants are
  sampled (largest and smallest tiles per kernel: each takes 10-60 s to compile). Compiled kernels stay
  in Triton's cache, so a second run compiles nothing.
- The plans themselves: grids within CUDA's limits at any B·h, the interpreter planning as the GPU
  does, the split choices, the backend's limits.
- The device guard: the launchers launch on their inputs' device.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from paca_kernels.triton import MAX_CHANNELS, MAX_HEAD_DIM, MAX_KEY_TILE, MAX_KEYS, TRITON_AVAILABLE, plan

if not TRITON_AVAILABLE:
    pytest.skip("Triton does not import", allow_module_level=True)

import triton
import triton.language as tl

from paca_kernels.ops import get_backend
from paca_kernels.testing import backend_device
from paca_kernels.triton import _launch
from paca_kernels.triton import cluster_pool as cp
from paca_kernels.triton import p2c_attention as p2c

ROOT = Path(__file__).resolve().parents[2]
GATE = ROOT / "scripts" / "triton_gate.py"
TRITON36 = Path(os.environ.get("TRITON36_VENV", ROOT / ".venv-triton36")) / "bin" / "python"


def _run_gate(python: str | Path, tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's default today, stated (silences 3.9's warning)
    out = tmp_path / "gate.json"
    proc = subprocess.run([str(python), str(GATE), "--json", str(out)], env=env, capture_output=True, text=True,
                          timeout=1200, check=False)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-5000:]
    report = json.loads(out.read_text())
    failures = [f"{v['kernel']} {v['dtype']} {v['consts']} w{v['num_warps']}: {'; '.join(v['violations'])}"
                for v in report["variants"] if v["violations"]]
    summary = report["summary"]
    print("gate:", json.dumps(summary))
    assert not failures, f"{len(failures)} variants fail the H100 budget:\n" + "\n".join(failures)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert summary["compiled"] == summary["attempted"] > 100
    return summary


@pytest.mark.slow
def test_every_launch_compiles_within_h100_budget(tmp_path):
    _run_gate(sys.executable, tmp_path)


def _triton36_reason() -> str | None:
    if not TRITON36.exists():
        return (f"no Triton 3.6 environment at {TRITON36.parent.parent} (scripts/triton_gate.sh --setup "
                "makes it when the triton==3.6.0 wheel can be installed)")
    return None


@pytest.mark.slow
@pytest.mark.skipif(_triton36_reason() is not None, reason=str(_triton36_reason()))
def test_every_launch_compiles_within_h100_budget_triton36(tmp_path):
    summary = _run_gate(TRITON36, tmp_path)
    assert summary["triton"] == "3.6.0"


# -- the plans --------------------------------------------------------------------------------------

def test_enumeration_covers_the_advertised_range():
    configs = plan.configurations(plan.H100, MAX_KEYS, MAX_HEAD_DIM, MAX_KEY_TILE, MAX_CHANNELS)
    kinds = {(launch.kernel, launch.dtype) for launch, _ in configs}
    for kernel in ("p2c_fwd", "p2c_bwd", "cluster_pool_fwd", "cluster_pool_bwd", "cluster_pool_merge"):
        for dtype in plan.DTYPES:
            assert (kernel, dtype) in kinds
    block_c = {launch.consts["BLOCK_C"] for launch, _ in configs if launch.kernel == "cluster_pool_bwd"}
    assert max(block_c) == plan.next_power_of_2(MAX_CHANNELS)
    tiles = {(launch.consts["BLOCK_M"], launch.consts["BLOCK_D"]) for launch, _ in configs if launch.kernel == "p2c_bwd"}
    assert (256, 64) in tiles and (128, 128) in tiles and (256, 128) not in tiles


@pytest.mark.parametrize("bh", [65_535, 65_536, 70_000, 1 << 20])
def test_grids_stay_within_cuda_limits_at_any_batch(bh):
    """B·h (p2c_attention) and B (cluster_pool) on grid axis 1 made launches past 65,535 invalid: the
    grids are 1-D now, decoded in the kernels."""
    for launch in (plan.p2c_fwd_plan(bh, 3136, 49, 1, 64, "bf16", plan.H100),
                   plan.p2c_bwd_plan(bh // 2, 784, 100, 2, 32, "fp16", plan.H100),
                   plan.cluster_pool_fwd_plan(bh, 100, 3136, 96, "bf16", plan.H100),
                   plan.cluster_pool_bwd_plan(bh, 100, 3136, 96, "bf16", plan.H100),
                   plan.cluster_pool_merge_plan(bh, 100, 96, 3, "bf16", plan.H100)):
        launch.check_grid()
        assert launch.grid[1:] == (1, 1)


def test_grid_check_refuses_axis_overflow():
    launch = plan.p2c_fwd_plan(1, 3136, 49, 1, 64, "bf16", plan.H100)
    bad = plan.Launch(launch.kernel, launch.dtype, launch.constexprs, 4, 2, (1, 70_000, 1))
    with pytest.raises(ValueError, match="exceeds CUDA's limits"):
        bad.check_grid()


SHAPES = [(1, 49, 3136, 96), (2, 100, 784, 192), (8, 49, 196, 320), (1, 2, 50, 1000), (3, 256, 17, 40)]


@pytest.mark.parametrize("dtype", plan.DTYPES)
def test_interpreter_plans_as_a_one_sm_gpu(dtype):
    """Under TRITON_INTERPRET the launchers take the GPU's tiles, warps and grids (those the gate
    compiles); only the dot's arithmetic differs (emulated roundings for fp16/bf16)."""
    gpu1 = plan.Device(sms=1)

    def same(a, b):
        ca, cb = a.consts, b.consts
        da, db = ca.pop("DOT"), cb.pop("DOT")
        assert (ca, a.num_warps, a.num_stages, a.grid, a.extra) == (cb, b.num_warps, b.num_stages, b.grid, b.extra)
        assert da == ("ieee" if dtype == "fp32" else "emulate")
        assert db in (("ieee",) if dtype == "fp32" else ("tf32", "native"))

    for b, m, n, c in SHAPES:
        same(plan.cluster_pool_fwd_plan(b, m, n, c, dtype, plan.INTERPRETER),
             plan.cluster_pool_fwd_plan(b, m, n, c, dtype, gpu1))
        same(plan.cluster_pool_bwd_plan(b, m, n, c, dtype, plan.INTERPRETER),
             plan.cluster_pool_bwd_plan(b, m, n, c, dtype, gpu1))
        d = min(c // 4, 64)
        same(plan.p2c_fwd_plan(b, n, m, 4, d, dtype, plan.INTERPRETER), plan.p2c_fwd_plan(b, n, m, 4, d, dtype, gpu1))
        same(plan.p2c_bwd_plan(b, n, m, 4, d, dtype, plan.INTERPRETER), plan.p2c_bwd_plan(b, n, m, 4, d, dtype, gpu1))


def test_split_n_for_small_batches_on_many_sms():
    small = plan.cluster_pool_fwd_plan(1, 49, 3136, 96, "bf16", plan.H100)
    assert small.get("splits") > 1
    assert plan.cluster_pool_fwd_plan(1, 49, 3136, 96, "bf16", plan.INTERPRETER).get("splits") == 1
    assert plan.cluster_pool_fwd_plan(128, 49, 3136, 96, "bf16", plan.H100).get("splits") == 1
    # Every split gets a whole number of N tiles, and the splits cover N.
    chunk, splits = small.get("chunk"), small.get("splits")
    assert chunk % small.consts["BLOCK_K"] == 0 and (splits - 1) * chunk < 3136 <= splits * chunk


def test_backend_refuses_key_tiles_past_the_budget():
    """M = 256 keys of head dim 128 spilled in every backward configuration and needed 278 KB of
    shared memory in fp32: refused with the reason, while M = 256 at d = 64 and M = 128 at d = 128 run."""
    backend = get_backend("triton")
    if backend.unavailable_reason() is not None:
        pytest.skip(backend.unavailable_reason())
    dev = backend_device("triton")

    def reasons(m, d):
        q = torch.empty(1, 8, 1, d, device=dev)
        k = torch.empty(1, m, 1, d, device=dev)
        return backend.not_supported_reasons("p2c_attention", [q, k, k])

    assert reasons(256, 64) == [] and reasons(128, 128) == [] and reasons(100, 96) == []
    (why,) = reasons(256, 128)
    assert "256 × 128" in why and "M ≤ 256 takes d ≤ 64" in why
    (why,) = reasons(129, 65)
    assert "256 × 128" in why


# -- the device guard -------------------------------------------------------------------------------

def test_device_guard_makes_the_inputs_device_current(monkeypatch):
    entered = []
    monkeypatch.setattr(torch.cuda, "device", lambda d: entered.append(d) or contextlib.nullcontext())
    with _launch.device_guard(torch.device("cuda", 1)):
        pass
    assert entered == [torch.device("cuda", 1)]
    with _launch.device_guard(torch.device("cpu")):
        pass
    assert len(entered) == 1
    assert _launch.device_of(torch.empty(1)) is plan.INTERPRETER


def test_launchers_launch_under_the_inputs_device(monkeypatch):
    """Triton launches on the current CUDA device: tensors on cuda:1 with cuda:0 current would fault.
    Every launcher enters the guard with its inputs' device around its launches."""
    backend = get_backend("triton")
    if backend.unavailable_reason() is not None:
        pytest.skip(backend.unavailable_reason())
    dev = torch.device(backend_device("triton"))
    seen = []

    def spy(device):
        seen.append(torch.device(device))
        return contextlib.nullcontext()

    monkeypatch.setattr(cp, "device_guard", spy)
    monkeypatch.setattr(p2c, "device_guard", spy)
    q, k = torch.randn(1, 20, 2, 16, device=dev), torch.randn(1, 5, 2, 16, device=dev)
    out, _ = p2c.p2c_attention_fwd(q, k, k, 0.25)
    p2c.p2c_attention_bwd(torch.ones_like(out), q, k, k, 0.25)
    logits, x = torch.randn(1, 3, 40, device=dev), torch.randn(1, 40, 16, device=dev)
    _, pooled, lse = cp.cluster_pool_fwd(logits, x, None, None, 1e-6, num_splits=2)
    cp.cluster_pool_bwd(torch.ones(1, 3, 16, device=dev), logits, x, None, pooled, lse, 1e-6)
    assert seen == [dev] * 4


# -- the GPU's roundings, emulated under the interpreter ---------------------------------------------

@triton.jit
def _round_tf32_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, cp._round_tf32(tl.load(x_ptr + offs)))


def test_tf32_rounding_emulation_matches_cvt_rna():
    """Half-precision cluster_pool multiplies in TF32 on the GPU; under the interpreter its operands are
    rounded the same way (to nearest, ties away from zero, 10 mantissa bits) before fp32 products."""
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("checks the interpreter's emulation")
    x = torch.randn(1024) * torch.logspace(-20, 20, 1024)
    x[:3] = torch.tensor([1 + 2**-11, 1 + 2**-11 + 2**-12, float("-inf")])  # a tie, above a tie, -inf
    y = torch.empty_like(x)
    _round_tf32_kernel[(1,)](x, y, BLOCK=1024)
    bits = x.view(torch.int32)
    want = ((bits + 0x1000) & ~0x1FFF).view(torch.float32)
    assert torch.equal(y, want)
    assert y[0] == 1 + 2**-10 and y[1] == 1 + 2**-10 and y[2] == float("-inf")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_p2c_half_precision_is_the_gpus_arithmetic(dtype):
    """fp16/bf16 p2c_attention on the GPU: q·kᵀ from half operands in fp32, softmax in fp32, P rounded
    to the inputs' dtype, P·V in fp32. The interpreter runs that (an "emulate" dot: fp32 products of
    the half operands): it matches the statement of that arithmetic within two output ulps."""
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("checks the interpreter's emulation")
    q, k, v = (torch.randn(2, 37, 3, 40).to(dtype), torch.randn(2, 49, 3, 40).to(dtype),
               torch.randn(2, 49, 3, 40).to(dtype))
    out, _ = p2c.p2c_attention_fwd(q, k, v, 40**-0.5)
    s = torch.einsum("bnhd,bmhd->bhnm", q.float(), k.float()) * 40**-0.5
    p = torch.softmax(s, -1).to(dtype).float()
    want = torch.einsum("bhnm,bmhd->bnhd", p, v.float()).to(dtype)
    # Relative to Σ_m P·|v| (the sum's own scale: outputs near 0 cancel): one output rounding (up to an
    # ulp) plus the rare P that fp32 summation order rounds the other way.
    ulp = 2.0 ** (-10 if dtype == torch.float16 else -7)
    scale = torch.einsum("bhnm,bmhd->bnhd", p, v.float().abs())
    err = (out.float() - want.float()).abs() / scale
    assert float(err.max()) <= 2 * ulp, float(err.max())
