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
    heads = ["conv", "mlp", "linear", "kmeans", "gmm", "hierarchical", "density"]
    assert [r.split("|")[1].strip() for r in rows] == heads
    for r in rows:
        acc = float(r.split("|")[4].strip().rstrip("%"))
        f1 = float(r.split("|")[5].strip())
        assert 0.0 <= acc <= 100.0 and 0.0 <= f1 <= 1.0
    if importlib.util.find_spec("matplotlib") is not None:
        pngs = sorted(p.name for p in out.glob("*.png"))
        assert len(pngs) == 7 and all(p.startswith("digits_") for p in pngs), pngs


@pytest.mark.skipif(importlib.util.find_spec("sklearn") is None, reason="scikit-learn is not installed")
def test_train_digits_macro_f1_matches_sklearn() -> None:
    import importlib.machinery

    import torch
    from sklearn.metrics import f1_score

    loader = importlib.machinery.SourceFileLoader("train_digits", str(ROOT / "examples" / "train_digits.py"))
    spec = importlib.util.spec_from_loader("train_digits", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    gen = torch.Generator().manual_seed(0)
    target = torch.randint(0, 10, (300,), generator=gen)
    pred = torch.where(torch.rand(300, generator=gen) < 0.7, target, torch.randint(0, 9, (300,), generator=gen))
    expected = f1_score(target.numpy(), pred.numpy(), average="macro", labels=list(range(10)), zero_division=0)
    assert abs(module.macro_f1(pred, target) - expected) < 1e-12
