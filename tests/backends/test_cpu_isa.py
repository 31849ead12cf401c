"""The C++ CPU kernels' ISA builds (csrc/cpu/math: one translation unit per ISA for the GEMM tiles,
chosen once per process at first use, capped by ``PACA_KERNELS_CPU_ISA``): every float32 kernel on
the portable build and on the AVX2 one, the AVX-512 products giving the AVX2 bits, and the kernels'
GELU. Each build needs a process of its own: the checks are in cpu_isa_checks.py, run as a script."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from paca_kernels.testing import assert_passes_on_cpu_isa

pytestmark = pytest.mark.extension

CHECKS = Path(__file__).with_name("cpu_isa_checks.py")


def _script(*args: str) -> str:
    """Python source that runs cpu_isa_checks.py as ``__main__`` with ``args``."""
    return (f"import runpy, sys\nsys.argv = [{str(CHECKS)!r}, *{list(args)!r}]\n"
            f"runpy.run_path({str(CHECKS)!r}, run_name='__main__')\n")


@pytest.mark.parametrize("isa", ["baseline", "avx2"])
def test_capped_isa_builds_pass_every_kernel_check(isa: str):
    """The float32 kernels with the build capped: the portable one ("baseline"), and the AVX2
    products where the CPU would use the AVX-512 ones. Checks: the differentiable ops with their
    gradients, conv_cluster_logits, p2c_attention_proj, conv_paca_layer, mlp_dwconv, mlp_fused, and
    the GELU's accuracy, tails and NaN (cpu_isa_checks.CHECKS)."""
    assert_passes_on_cpu_isa(_script(), isa)


def test_kernel_gelu_accuracy_tails_and_nan():
    """The kernels' rational-erf GELU of the default build (AVX2 or AVX-512 where the CPU has it)
    against float64: tails, NaN."""
    from cpu_isa_checks import check_gelu

    check_gelu()


def _cpu_has_avx512f() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " avx512f" in line for line in f)
    except OSError:
        return False


@pytest.mark.skipif(not _cpu_has_avx512f(), reason="no AVX-512F: the default build is the AVX2 one")
def test_avx512_products_give_the_avx2_bits(tmp_path):
    """On an AVX-512 CPU the products run 16-lane tiles by default: every output is the same chain
    of FMAs in the same order as in the AVX2 tiles, so both builds give the same bits."""
    from cpu_isa_checks import NUM_OUTPUTS

    paths = {}
    for isa in ("default", "avx2"):
        paths[isa] = tmp_path / f"{isa}.pt"
        env = {k: v for k, v in os.environ.items() if k != "PACA_KERNELS_CPU_ISA"}
        if isa == "avx2":
            env["PACA_KERNELS_CPU_ISA"] = "avx2"
        proc = subprocess.run([sys.executable, "-c", _script("outputs", str(paths[isa]))], env=env,
                              capture_output=True, text=True, timeout=120, check=False)
        assert proc.returncode == 0 and "isa ok" in proc.stdout, proc.stdout + proc.stderr
    default, avx2 = torch.load(paths["default"]), torch.load(paths["avx2"])
    assert len(default) == len(avx2) == NUM_OUTPUTS
    for i, (a, b) in enumerate(zip(default, avx2, strict=True)):
        assert torch.isfinite(a).all(), i
        assert torch.equal(a, b), f"output {i}: max difference {(a - b).abs().max().item():.3g}"
