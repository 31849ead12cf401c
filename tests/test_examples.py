"""The examples run: examples/train_digits.py --quick in a subprocess (needs scikit-learn)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(importlib.util.find_spec("sklearn") is None, reason="scikit-learn is not installed")
def test_train_digits_quick(tmp_path: Path) -> None:
    out = tmp_path / "png"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "train_digits.py"), "--quick", "--out", str(out)],
        capture_output=True, text=True, timeout=300, env=env, check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # stderr is a pipe here: progress comes as plain short lines, never carriage returns.
    assert "\r" not in proc.stderr and "\r" not in proc.stdout
    progress = [line for line in proc.stderr.splitlines() if "/" in line and ":" in line]
    assert progress and all(len(line) < 80 for line in progress), proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "%" in line]
    assert [r.split("|")[1].strip() for r in rows] == ["conv", "mlp", "linear", "kmeans", "gmm"]
    for r in rows:
        acc = float(r.split("|")[4].strip().rstrip("%"))
        assert 0.0 <= acc <= 100.0
    if importlib.util.find_spec("matplotlib") is not None:
        pngs = sorted(p.name for p in out.glob("*.png"))
        assert len(pngs) == 5 and all(p.startswith("digits_") for p in pngs), pngs
