#!/usr/bin/env bash
# Set up what `make demo` / `make test` need, keeping whatever is already there:
# a virtual environment (.venv), torch, the build tools and the test tools.
#
# - A torch >= 2.11 already installed for the chosen python (GPU machines: CUDA torch, no network) is
#   kept: the venv is then created with --system-site-packages and nothing is downloaded for it.
# - Otherwise torch 2.13.0 is installed, pinned (an unpinned torch would pull GBs of CUDA wheels).
set -euo pipefail

VENV=${1:-.venv}
PYTHON=${PYTHON:-python3}

"$PYTHON" - <<'PY' || { echo "paca_kernels needs Python >= 3.11 (PYTHON=$PYTHON)" >&2; exit 1; }
import sys
sys.exit(0 if sys.version_info >= (3, 11) else 1)
PY

torch_ok='import sys, torch; v = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]); sys.exit(0 if v >= (2, 11) else 1)'

if [ ! -x "$VENV/bin/python" ]; then
    if "$PYTHON" -c "$torch_ok" 2>/dev/null; then
        echo "bootstrap: keeping the installed torch ($("$PYTHON" -c 'import torch; print(torch.__version__)'))"
        "$PYTHON" -m venv --system-site-packages "$VENV"
    else
        "$PYTHON" -m venv "$VENV"
    fi
fi
PY="$VENV/bin/python"

if ! "$PY" -c "$torch_ok" 2>/dev/null; then
    echo "bootstrap: installing torch==2.13.0"
    "$PY" -m pip install -q "torch==2.13.0"
fi

# module:distribution pairs; only the missing ones are installed (none of them depends on torch).
missing=()
for pair in setuptools:setuptools wheel:wheel cmake:cmake ninja:ninja numpy:numpy pytest:pytest \
            hypothesis:hypothesis pytest_benchmark:pytest-benchmark expecttest:expecttest; do
    "$PY" -c "import ${pair%%:*}" 2>/dev/null || missing+=("${pair#*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "bootstrap: installing ${missing[*]}"
    "$PY" -m pip install -q "${missing[@]}"
fi
# Triton: the GPU backend, and its CPU interpreter for the tests (TRITON_INTERPRET=1). Optional: where
# it cannot be installed, the triton backend reports itself unavailable and its tests skip with why.
if ! "$PY" -c "import triton" 2>/dev/null; then
    echo "bootstrap: installing triton==3.9.0"
    "$PY" -m pip install -q "triton==3.9.0" || echo "bootstrap: triton could not be installed" >&2
fi
# Optional extras the tests exercise when present (explain's PNG overlays and the benchmark plots:
# matplotlib; the digits example: scikit-learn). Neither depends on torch; where they cannot be
# installed, those tests skip and say why.
extras=()
for pair in matplotlib:matplotlib sklearn:scikit-learn; do
    "$PY" -c "import ${pair%%:*}" 2>/dev/null || extras+=("${pair#*:}")
done
if [ ${#extras[@]} -gt 0 ]; then
    echo "bootstrap: installing optional ${extras[*]}"
    "$PY" -m pip install -q "${extras[@]}" || echo "bootstrap: ${extras[*]} could not be installed" >&2
fi
# Optional ONNX export extra (paca_kernels.deploy, tests/test_export.py, the deployment benchmark):
# torch.onnx's dynamo exporter needs onnx and onnxscript, and the tests run the graphs in onnxruntime.
# None of the three depends on torch (pip never resolves torch here); where they cannot be installed
# (no wheel for this Python or platform, no network), the ONNX tests skip and say why.
onnx_extras=()
for pair in onnx:onnx onnxscript:onnxscript onnxruntime:onnxruntime; do
    "$PY" -c "import ${pair%%:*}" 2>/dev/null || onnx_extras+=("${pair#*:}")
done
if [ ${#onnx_extras[@]} -gt 0 ]; then
    echo "bootstrap: installing optional ${onnx_extras[*]}"
    "$PY" -m pip install -q "${onnx_extras[@]}" || echo "bootstrap: ${onnx_extras[*]} could not be installed" >&2
fi
"$PY" -c 'import torch; print(f"bootstrap: torch {torch.__version__} in '"$VENV"'")'
