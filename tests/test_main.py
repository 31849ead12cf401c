"""`python -m paca_kernels` and the package's behaviour without the C++ extension."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import paca_kernels.__main__ as main_mod
from paca_kernels import _ext, ops, reference
from paca_kernels.ops import dispatch as _backends


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "paca_kernels", *args], check=False, capture_output=True, text=True, env=full_env,
        timeout=300,
    )


def test_main_job_reports_and_passes():
    res = _run("--device", "cpu", "--speed", "none")
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    for needle in ("torch", "triton", "backends", "reference", "cpu", "self-check",
                   "all available backends match the reference", "torch threads", "cpu isa  C++ kernels"):
        assert needle in out
    assert "MISMATCH" not in out
    assert "speed:" not in out  # --speed none: no table


def test_main_job_without_extension_says_why():
    res = _run("--device", "cpu", "--speed", "none", env={"PACA_KERNELS_DISABLE_EXT": "1"})
    assert res.returncode == 0, res.stdout + res.stderr
    assert "PACA_KERNELS_DISABLE_EXT" in res.stdout  # the reason, in the backends table
    assert "cluster_pool   reference  ok" in res.stdout


def test_import_without_extension_runs_the_models():
    code = (
        "import torch, paca_kernels as pk\n"
        "assert not pk._ext.available()\n"
        "m = pk.create_model('pacavit_tiny_p2cconv_100_0', num_classes=3).eval()\n"
        "print(m(torch.randn(1, 3, 64, 64)).shape)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PACA_KERNELS_DISABLE_EXT": "1"})
    assert res.returncode == 0, res.stderr
    assert "torch.Size([1, 3])" in res.stdout


def test_main_job_fails_on_a_mismatching_backend(monkeypatch, capsys):
    def broken(logits, x, weight, bias, eps):
        return reference.cluster_pool(logits, x, weight, bias, eps) * 1.001

    backend = ops.Backend(
        name="broken", description="a deliberately wrong backend", device_types=("cpu",),
        dtypes=(torch.float32,), impls={"cluster_pool": broken},
    )
    monkeypatch.setitem(_backends._REGISTRY, "broken", backend)
    assert main_mod.main(["--device", "cpu", "--speed", "none"]) == 1
    out = capsys.readouterr().out
    assert "broken" in out and "MISMATCH" in out


def test_main_help_documents_options():
    res = _run("--help")
    assert res.returncode == 0
    for opt in ("--device", "--dtype", "--seed"):
        assert opt in res.stdout


@pytest.mark.parametrize("dtype", ["bfloat16", "float64"])
def test_main_job_other_dtypes(dtype):
    assert main_mod.main(["--device", "cpu", "--dtype", dtype, "--speed", "none"]) == 0


@pytest.mark.parametrize(("mode", "dtype"), [("quick", torch.float32), ("full", torch.float32),
                                             ("quick", torch.bfloat16)], ids=["quick", "full", "quick-bf16"])
def test_speed_table_times_every_available_provider(mode, dtype, capsys):
    """The speed table on a tiny grid with a small budget: one row per provider and pass, a time and a
    per-round speed-up for each that can run and a reason for each that cannot; the compiled row
    uses a cheap compile backend here."""
    rows = main_mod.speed_table(torch.device("cpu"), dtype, mode, batch=1, grid=(5, 6),
                                compile_backend="aot_eager", budget_s=1.0, min_rounds=3)
    out = capsys.readouterr().out
    labels = {r.provider for r in rows}
    assert {"reference", "reference compiled", "cpu"} <= labels
    passes = {"forward", "forward+backward"} if mode == "full" else {"forward"}
    assert {r.pass_name for r in rows} == passes
    for r in rows:
        backend = ops.get_backend(r.provider.split()[0])
        if backend.unavailable_reason() is None:  # reference and cpu here; triton under its interpreter
            assert r.result is not None and r.result.time.median > 0, r
            assert r.result.time.n >= 3 and r.result.time.q1 <= r.result.time.median <= r.result.time.q3
            assert (r.result.speedup is None) == (r.provider == "reference")
        else:
            assert r.result is None and r.note.startswith("skipped"), r
    assert next(r.result for r in rows if r.provider == "cpu") is not None
    assert "speed: PaCa-ViT-Tiny stage-1 layer" in out and f"{mode} mode" in out
    assert "interleaved rounds" in out and "rounds in" in out and "speed table:" in out
    assert "median [q1, q3]" in out and "1 (baseline)" in out
    assert "torch threads" in out and "C++ kernels" in out


def _round_times(ratios: list[float], ref_s: float = 0.1) -> dict[str, list[float]]:
    """Per-round times whose speed-ups over "reference" are ``ratios`` (the reference drifting)."""
    ref = [ref_s * (1 + i % 3) for i in range(len(ratios))]
    return {"reference": ref, "cpu": [r / q for r, q in zip(ref, ratios, strict=True)]}


def test_speed_rows_show_the_spread_and_no_warning_when_steady():
    comparisons, lines = main_mod.format_rounds("forward", _round_times([12.0, 13.0, 12.5, 14.0, 12.2]),
                                                skipped={"triton": "skipped: no GPU"},
                                                order=["reference", "triton", "cpu"])
    assert [line.split()[0] for line in lines] == ["reference", "triton", "cpu"]
    assert "1 (baseline)" in lines[0] and "skipped: no GPU" in lines[1]
    assert "12.5x [12.2, 13]" in lines[2]  # median speed-up of the rounds [q1, q3]
    assert " ms [" in lines[0] and " ms [" in lines[2]
    assert comparisons["cpu"].speedup.median == pytest.approx(12.5)
    assert not any("WARNING" in line for line in lines)


@pytest.mark.parametrize("ratios", [[0.86, 1.5, 2.8, 9.0, 14.3], [0.8, 1.2, 0.9, 1.3, 1.0]],
                         ids=["wide", "straddles-1"])
def test_speed_rows_warn_when_the_spread_hides_the_ratio(ratios):
    _, lines = main_mod.format_rounds("forward", _round_times(ratios))
    warnings = [line for line in lines if "WARNING" in line]
    assert len(warnings) == 1 and "WARNING cpu, forward" in warnings[0] and "cannot be read" in warnings[0]
    assert "5 rounds" in warnings[0]


def _cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@pytest.mark.parametrize("cap", [None, "avx512bf16", "avx512", "avx2", "baseline", "AVX2"])
def test_cpu_isa_is_the_extensions_choice(cap: str | None) -> None:
    """The ISA line reports what the extension chose (the op paca_kernels::cpu_isa), in a process
    whose PACA_KERNELS_CPU_ISA was set before the first kernel: the CPU's best build, capped by the
    variable's exact values ("AVX2" caps nothing, as dispatch.cpp compares exactly)."""
    if not _ext.load():
        assert _ext.cpu_isa() is None
        pytest.skip("the C++ extension is unavailable")
    if platform.machine().lower() not in {"x86_64", "amd64"} or not Path("/proc/cpuinfo").exists():
        pytest.skip("the expected build is derived from x86 /proc/cpuinfo flags here")
    flags = _cpu_flags()
    order = ["baseline", "avx2", "avx512", "avx512bf16", "amx"]  # each build needs the ones before
    needs = [set(), {"avx2", "fma"}, {"avx512f"}, {"avx512_bf16", "avx512bw"}, {"amx_bf16", "amx_tile"}]
    best = "baseline"
    for isa, flag_set in zip(order[1:], needs[1:], strict=True):
        if not flag_set <= flags:
            break
        best = isa
    release = tuple(int(p) for p in platform.release().split("-")[0].split(".")[:2] if p.isdigit())
    if best == "amx" and release < (5, 16):
        pytest.skip("AMX needs the OS to grant the tile data (Linux 5.16+)")
    capped = order[: order.index(cap) + 1] if cap in order else order
    expected = best if best in capped else capped[-1]
    env = {k: v for k, v in os.environ.items() if k != "PACA_KERNELS_CPU_ISA"}
    if cap is not None:
        env["PACA_KERNELS_CPU_ISA"] = cap
    code = "from paca_kernels import _ext; print(_ext.cpu_isa()[0])"
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == expected


def test_main_help_documents_speed_options():
    res = _run("--help")
    assert res.returncode == 0
    for needle in ("--device", "--dtype", "--speed", "quick", "full", "--budget"):
        assert needle in res.stdout
