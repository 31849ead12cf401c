"""The one-shot GPU check (scripts/gpu_check.sh, `make gpu-check`) in its dry run, on any machine: the
plan's time boxes fit the 8-minute budget, the machine is recorded, and every pytest selection it
would run on the GPU collects tests (a renamed test, marker or benchmark shape id fails here, not in
the few minutes a GPU is lent)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
STEPS = ["versions", "gpu tests (-m gpu)", "op suites: cuda, triton", "bench cluster_pool tiny-s1",
         "bench cluster_pool det800x1216-s1", "bench p2c_attention tiny-s1",
         "bench p2c_attention det800x1216-s1"]


def _dry_run(out: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), str(out)], check=False, cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "GPU_CHECK_DRY_RUN": "1", "PYTHON": sys.executable, **env},
    )


def test_gpu_check_dry_run(tmp_path: Path) -> None:
    res = _dry_run(tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = (tmp_path / "summary.txt").read_text()
    for step in STEPS:
        assert any(line.startswith(step) and " ok " in line for line in summary.splitlines()), (step, summary)
    assert "480 s budget" not in summary
    assert '"torch"' in (tmp_path / "versions.txt").read_text()
    assert (tmp_path / "nvidia-smi.txt").exists()


def test_gpu_check_dry_run_fails_on_an_empty_selection_and_reports_an_overlong_plan(tmp_path: Path) -> None:
    """A selection that collects nothing fails the dry run; time boxes over the budget are reported."""
    script = SCRIPT.read_text().replace('-k "test_$op and $shape"', '-k "test_$op and no-such-shape"')
    broken = tmp_path / "gpu_check_broken.sh"
    broken.write_text(script)
    out = tmp_path / "out"
    res = subprocess.run(
        ["bash", str(broken), str(out)], check=False, cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "GPU_CHECK_DRY_RUN": "1", "PYTHON": sys.executable, "GPU_CHECK_ROOT": str(ROOT),
             "GPU_CHECK_BOX_BUILD": "400"},
    )
    assert res.returncode != 0
    summary = (out / "summary.txt").read_text()
    assert "collects no test" in summary
    assert "over the 480 s budget" in summary
