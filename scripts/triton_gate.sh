#!/usr/bin/env bash
# The resource gate (scripts/triton_gate.py) under Triton 3.6, the GPU machine's version, next to the
# main environment's Triton: a small virtual environment (.venv-triton36) holding only triton==3.6.0
# (installed with --no-deps, so torch is never resolved again) that sees the main environment's
# packages (torch included) through a .pth file.
#
#   scripts/triton_gate.sh --setup        create/refresh the environment only (exit 0 if usable)
#   scripts/triton_gate.sh [gate args]    create it if needed, then run the gate with it
#
# Environment: VENV (main environment, default .venv), TRITON36_VENV (default .venv-triton36),
# TRITON36_WHEELS (a folder holding the triton-3.6.0 wheel; default: the package index).
set -euo pipefail
cd "$(dirname "$0")/.."
main=${VENV:-.venv}
env36=${TRITON36_VENV:-.venv-triton36}
version=3.6.0

usable() {
    [ -x "$env36/bin/python" ] && "$env36/bin/python" -c \
        "import triton, torch, sys; sys.exit(triton.__version__ != '$version')" 2>/dev/null
}

if ! usable; then
    rm -rf "$env36"
    "$main/bin/python" -m venv --without-pip "$env36"
    site36=$("$env36/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    main_site=$("$main/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    find_links=()
    if [ -n "${TRITON36_WHEELS:-}" ]; then find_links=(--find-links "$TRITON36_WHEELS"); fi
    "$main/bin/python" -m pip install -q --no-deps --target "$site36" "${find_links[@]}" "triton==$version"
    # After the environment's own site-packages: its triton 3.6 wins, torch comes from the main one.
    echo "$(cd "$main_site" && pwd)" > "$site36/_paca_main_env.pth"
    usable || { echo "triton $version environment at $env36 is not usable" >&2; exit 1; }
fi
if [ "${1:-}" = "--setup" ]; then exit 0; fi
env -u TRITON_INTERPRET "$env36/bin/python" scripts/triton_gate.py "$@"
