"""The optional timm integration: ``import paca_kernels`` never imports timm, and the variants are
registered in timm's registry whichever of the two is imported first (checked in subprocesses with a
minimal fake ``timm`` package; with the real timm where it can be imported)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NUM_MODELS = 13

FAKE_TIMM_INIT = "from .models import create_model, is_model, list_models, register_model\n"
FAKE_TIMM_MODELS = textwrap.dedent('''
    """A minimal stand-in for timm's model registry (same calls and calling conventions)."""
    import fnmatch
    import sys

    _registry = {}


    def register_model(fn):
        mod = sys.modules[fn.__module__]  # like timm: the entry is exported from its module
        if hasattr(mod, "__all__"):
            mod.__all__.append(fn.__name__)
        else:
            mod.__all__ = [fn.__name__]
        _registry[fn.__name__] = fn
        return fn


    def is_model(name):
        return name in _registry


    def list_models(pattern=""):
        return sorted(n for n in _registry if fnmatch.fnmatch(n, pattern or "*"))


    def create_model(name, pretrained=False, **kwargs):
        return _registry[name](
            pretrained=pretrained, pretrained_cfg=None, pretrained_cfg_overlay=None, **kwargs
        )
''')


@pytest.fixture(scope="module")
def fake_timm(tmp_path_factory) -> Path:
    """A directory holding the fake ``timm`` package (to put on PYTHONPATH)."""
    root = tmp_path_factory.mktemp("fake_timm")
    (root / "timm" / "models").mkdir(parents=True)
    (root / "timm" / "__init__.py").write_text(FAKE_TIMM_INIT)
    (root / "timm" / "models" / "__init__.py").write_text(FAKE_TIMM_MODELS)
    return root


def run_python(
    *parts: str, extra_path: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run the code ``parts`` (each dedented) in a fresh interpreter, the project importable and
    ``extra_path`` first on the path; assert that it succeeds."""
    environ = {k: v for k, v in os.environ.items() if k != "PACA_KERNELS_NO_TIMM_HOOK"}
    paths = ([str(extra_path)] if extra_path else []) + [str(ROOT)]
    environ["PYTHONPATH"] = os.pathsep.join(paths + [environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    environ.update(env or {})
    code = "\n".join(textwrap.dedent(part) for part in parts)
    proc = subprocess.run(
        [sys.executable, "-c", code], check=False, env=environ, cwd=ROOT, capture_output=True,
        text=True, timeout=240,
    )
    assert proc.returncode == 0, f"subprocess failed:\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


CHECK_REGISTERED = f"""
    import torch
    names = timm.list_models("pacavit_*")
    assert len(names) == {NUM_MODELS}, names
    assert sorted(names) == sorted(paca_kernels.list_models()), names
    assert all(timm.is_model(n) for n in paca_kernels.list_models())
    m = timm.create_model("pacavit_tiny_p2cconv_100_0", num_classes=3).eval()
    assert isinstance(m, paca_kernels.PaCaViT)
    with torch.no_grad():
        out = m(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, 3), out.shape
    print("OK")
"""


def test_import_does_not_import_timm(fake_timm) -> None:
    code = "import paca_kernels, sys; assert 'timm' not in sys.modules, 'timm was imported'"
    run_python(code)
    run_python(code, extra_path=fake_timm)  # not even when a timm is importable


def test_hook_registers_on_later_timm_import(fake_timm) -> None:
    proc = run_python("""
        import sys
        import paca_kernels
        assert "timm" not in sys.modules
        import timm
    """, CHECK_REGISTERED, extra_path=fake_timm)
    assert proc.stdout.strip().endswith("OK")


def test_registers_when_timm_imported_first(fake_timm) -> None:
    proc = run_python("""
        import timm
        assert timm.list_models("pacavit_*") == []
        import paca_kernels
    """, CHECK_REGISTERED, extra_path=fake_timm)
    assert proc.stdout.strip().endswith("OK")


def test_hook_disabled_by_env_var(fake_timm) -> None:
    proc = run_python(f"""
        import paca_kernels
        import timm
        assert timm.list_models("pacavit_*") == [], "registered although the hook is disabled"
        added = paca_kernels.register_timm_models()
        assert sorted(added) == sorted(paca_kernels.list_models()) and len(added) == {NUM_MODELS}
        assert paca_kernels.register_timm_models() == []  # idempotent
    """, CHECK_REGISTERED, extra_path=fake_timm, env={"PACA_KERNELS_NO_TIMM_HOOK": "1"})
    assert proc.stdout.strip().endswith("OK")


def test_broken_timm_does_not_break_import(tmp_path) -> None:
    (tmp_path / "timm" / "models").mkdir(parents=True)
    (tmp_path / "timm" / "__init__.py").write_text("from .models import register_model, is_model\n")
    (tmp_path / "timm" / "models" / "__init__.py").write_text(
        "def is_model(name):\n    return False\n\n"
        "def register_model(fn):\n    raise RuntimeError('registry is broken')\n"
    )
    proc = run_python("""
        import paca_kernels
        import timm
        print("imported")
    """, extra_path=tmp_path)
    assert "imported" in proc.stdout
    assert "could not register models with timm" in proc.stderr


def _real_timm_error() -> str | None:
    """None when the real timm imports in a fresh interpreter, else why not."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", "import timm"], check=False, capture_output=True,
                          text=True, timeout=240, env=env)
    if proc.returncode == 0:
        return None
    lines = proc.stderr.strip().splitlines()
    return lines[-1] if lines else f"exit status {proc.returncode}"


def test_real_timm() -> None:
    reason = _real_timm_error()
    if reason is not None:
        pytest.skip(f"the real timm cannot be imported here: {reason}")
    proc = run_python("""
        import paca_kernels
        import timm
    """, CHECK_REGISTERED)
    assert proc.stdout.strip().endswith("OK")
