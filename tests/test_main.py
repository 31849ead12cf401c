"""`python -m paca_kernels` and the package's behaviour without the C++ extension."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import paca_kernels.__main__ as main_mod
from paca_kernels import ops, reference
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
                   "all available backends match the reference"):
        assert needle in out
    assert "MISMATCH" not in out


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
    assert main_mod.main(["--device", "cpu"]) == 1
    out = capsys.readouterr().out
    assert "broken" in out and "MISMATCH" in out


def test_main_help_documents_options():
    res = _run("--help")
    assert res.returncode == 0
    for opt in ("--device", "--dtype", "--seed"):
        assert opt in res.stdout


@pytest.mark.parametrize("dtype", ["bfloat16", "float64"])
def test_main_job_other_dtypes(dtype):
    assert main_mod.main(["--device", "cpu", "--dtype", dtype]) == 0


def test_speed_table_times_every_available_provider(capsys):
    """The speed table on a tiny grid: one row per provider, a time for each that can run and a
    reason for each that cannot; the compiled row uses a cheap compile backend here."""
    rows = main_mod.speed_table(torch.device("cpu"), torch.float32, "full", batch=1, grid=(5, 6),
                                compile_backend="aot_eager")
    out = capsys.readouterr().out
    labels = {label for label, _, _, _ in rows}
    assert {"reference", "reference compiled", "cpu"} <= labels
    assert {p for _, p, _, _ in rows} == {"forward", "forward+backward"}
    for label, _pass, ms, note in rows:
        backend = ops.get_backend(label.split()[0])
        if backend.unavailable_reason() is None:  # reference and cpu here; triton under its interpreter
            assert ms is not None and ms > 0, (label, note)
            assert note.endswith("x reference eager")
        else:
            assert ms is None and note.startswith("skipped"), (label, note)
    assert next(ms for label, _, ms, _ in rows if label == "cpu") is not None
    assert "[1/" in out and "speed: PaCa-ViT-Tiny stage-1 layer" in out


def test_main_help_documents_speed_options():
    res = _run("--help")
    assert res.returncode == 0
    for needle in ("--device", "--dtype", "--speed", "quick", "full"):
        assert needle in res.stdout
