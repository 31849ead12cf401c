"""Loading of the compiled extension ``paca_kernels._C`` (the ``torch.ops.paca_kernels`` ops).

The extension is optional: :func:`load` never raises. When it cannot be used, :func:`available`
is False and :func:`unavailable_reason` says why in one actionable sentence (not built, built for
another torch, import failure, or disabled with ``PACA_KERNELS_DISABLE_EXT=1``).

A ``_C`` built against one torch must not be imported under another: C++ symbols may be missing
(ImportError at best, a crash at worst). setup.py records the build's torch version in
``_build_info.json`` next to the module, and it is checked before the import.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Any

__all__ = [
    "available",
    "build_info",
    "cpu_isa",
    "cpu_output_cache",
    "cpu_output_cache_clear",
    "cuda_built",
    "kernel_limits",
    "load",
    "unavailable_reason",
]

_PKG_DIR = Path(__file__).resolve().parent
_BUILD_INFO_FILE = _PKG_DIR / "_build_info.json"
_REBUILD = "rebuild with `pip install --no-build-isolation -e .` in the source tree"
_logger = logging.getLogger("paca_kernels")

_lock = threading.Lock()
_loaded: bool | None = None  # None: load() not attempted yet
_reason: str | None = None
_info: dict[str, Any] | None = None
_info_read = False


def _read_build_info() -> dict[str, Any] | None:
    """The parsed ``_build_info.json`` (cached), or None when absent or unreadable."""
    global _info, _info_read
    if not _info_read:
        try:
            data = json.loads(_BUILD_INFO_FILE.read_text())
            _info = data if isinstance(data, dict) else None
        except (OSError, ValueError):
            _info = None
        _info_read = True
    return _info


def _module_file() -> Path | None:
    """The ``_C`` shared library next to this file, for this interpreter's extension suffixes."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = _PKG_DIR / f"_C{suffix}"
        if path.is_file():
            return path
    return None


def _import_extension(path: Path) -> None:
    """Import ``path`` as ``paca_kernels._C``: exactly the file whose build info was checked."""
    if "paca_kernels._C" in sys.modules:
        return
    spec = importlib.util.spec_from_file_location("paca_kernels._C", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"no extension loader for {path}")
    module = importlib.util.module_from_spec(spec)  # dlopen: the op registrations run here
    spec.loader.exec_module(module)
    sys.modules["paca_kernels._C"] = module


def _try_load() -> str | None:
    """Import ``_C``; None on success, else the reason it is unavailable."""
    if os.environ.get("PACA_KERNELS_DISABLE_EXT", "").strip().lower() in {"1", "true", "yes", "on"}:
        return "paca_kernels._C is disabled by PACA_KERNELS_DISABLE_EXT=1"
    module_file = _module_file()
    if module_file is None:
        return (
            "paca_kernels._C is not built (build it with `pip install --no-build-isolation -e .` "
            "in the source tree, with torch, cmake and ninja installed)"
        )
    import torch  # loads libtorch/libc10, which _C links against without an rpath of its own

    info = _read_build_info()
    built_for = info.get("torch_version") if info else None
    if built_for is not None and built_for != torch.__version__:
        return (
            f"paca_kernels._C was built for torch {built_for}, running torch "
            f"{torch.__version__}: {_REBUILD}"
        )
    try:
        _import_extension(module_file)
    except (ImportError, OSError) as exc:
        return f"paca_kernels._C failed to import ({type(exc).__name__}: {exc}): {_REBUILD}"
    if not hasattr(torch.ops.paca_kernels, "cluster_pool_fwd"):
        return f"paca_kernels._C imported but registered no torch.ops.paca_kernels ops: {_REBUILD}"
    return None


def load() -> bool:
    """Load the extension once (cached); True when ``torch.ops.paca_kernels`` ops are usable."""
    global _loaded, _reason
    if _loaded is not None:
        return _loaded
    with _lock:
        if _loaded is None:
            try:
                reason = _try_load()
            except Exception as exc:  # noqa: BLE001 (load() must never raise)
                reason = f"paca_kernels._C could not be loaded ({type(exc).__name__}: {exc})"
            _reason = reason
            _loaded = reason is None
            if reason is not None:
                _logger.debug("C++ extension unavailable: %s", reason)
    return _loaded


def available() -> bool:
    """Whether the C++ extension is loaded (loads it on first call)."""
    return load()


def unavailable_reason() -> str | None:
    """Why the extension is unavailable, or None when it is loaded (loads it on first call)."""
    load()
    return _reason


def build_info() -> dict[str, Any] | None:
    """Contents of ``_build_info.json`` written by setup.py, or None if there is none.

    Keys: torch_version, torch_cuda, cuda_built, cuda_archs, cxx_compiler, cuda_compiler,
    cxx11_abi, python, build_date, limits (see :func:`kernel_limits`). Readable even when the
    extension itself is unavailable.
    """
    info = _read_build_info()
    return dict(info) if info is not None else None


def kernel_limits(device: str) -> dict[str, int] | None:
    """The size limits of the compiled kernels for ``device`` (e.g. ``"cuda"``), from the build info.

    For ``"cuda"``: ``{"max_keys": ..., "max_head_dim": ..., "max_channels": ...,
    "max_channels_small_smem": ...}``, the largest M, head dim d and C the CUDA kernels hold on chip,
    and the C up to which cluster_pool's backward fits every supported GPU's shared memory. setup.py
    parses them from csrc/cuda/limits.h, the header the kernels are compiled with, so they are
    recorded for CPU-only builds too (the header is read whether or not CUDA is compiled).

    Returns a fresh dict, or None when there is no build info, or it records no limits for
    ``device`` (a build older than the limits, or a device without size limits such as "cpu").
    Readable even when the extension itself is unavailable.
    """
    info = _read_build_info()
    limits = info.get("limits") if info is not None else None
    per_device = limits.get(device) if isinstance(limits, dict) else None
    if not isinstance(per_device, dict):
        return None
    return {str(k): int(v) for k, v in per_device.items()}


def cuda_built() -> bool:
    """Whether the loaded extension contains CUDA kernels."""
    info = _read_build_info()
    return load() and bool(info and info.get("cuda_built"))


def cpu_isa() -> tuple[str, str] | None:
    """The build the C++ CPU kernels run in this process, and how that was learnt.

    Returns ``(isa, how)``: isa is ``"amx"`` (the AVX-512 build, and the bfloat16 inputs' products on
    AMX-BF16 tiles), ``"avx512bf16"`` (the same with AVX512-BF16 ``vdpbf16ps`` products),
    ``"avx512"`` (AVX-512 products, AVX2 for the rest; bf16 inputs multiplied in float32 by the
    bf16-rounded weights), ``"avx2"`` (AVX2+FMA) or ``"baseline"`` (portable SSE2), as the extension
    reports it (the op ``paca_kernels::cpu_isa``); ``how`` says how it was chosen. None when the
    extension is unavailable.

    The choice is made in C++ (csrc/cpu/math/dispatch.cpp) once per process, at the first kernel
    call (or this query): cpuid's avx2+fma, avx512f, avx512bf16 (with avx512bw) and amx-bf16 (with
    amx-tile, and the OS granting the tile data: Linux 5.16+), capped by
    ``PACA_KERNELS_CPU_ISA=baseline``, ``=avx2``, ``=avx512`` or ``=avx512bf16`` as the environment
    was then; changing the variable later changes nothing.
    """
    if not load():
        return None
    import torch  # as in load(): this module is read before torch is needed

    isa = str(torch.ops.paca_kernels.cpu_isa())
    cap = os.environ.get("PACA_KERNELS_CPU_ISA")
    how = "cpuid, at first use"
    if cap in {"baseline", "avx2", "avx512", "avx512bf16"}:
        how += f"; PACA_KERNELS_CPU_ISA={cap} caps it (if it was set then)"
    return isa, how


def cpu_output_cache() -> tuple[int, int] | None:
    """``(cached, limit)``: the bytes the C++ CPU kernels' output cache holds now, and its cap.

    The CPU kernels take outputs of 256 KiB and more from a cache of blocks their earlier outputs
    freed (csrc/cpu/output_pool.h): with glibc's malloc such an output is otherwise fresh memory,
    page-faulted in on every call (on the development machine about 1 microsecond per 4 KiB page:
    8-9 ms of a 38 MiB activation's 16 ms in PaCa-ViT-Tiny's first-stage MLP convolution, B = 8). The
    cache holds only memory no tensor uses, at most ``limit`` bytes:
    ``PACA_KERNELS_CPU_OUTPUT_CACHE_MB`` as the environment was at the first kernel call (default
    1024; 0 turns the cache off). None when the extension is unavailable.
    """
    if not load():
        return None
    import torch

    cached, limit = torch.ops.paca_kernels.cpu_output_cache()
    return int(cached), int(limit)


def cpu_output_cache_clear() -> int:
    """Frees every block the CPU kernels' output cache holds (:func:`cpu_output_cache`); returns the
    bytes given back (0 when the extension is unavailable). Tensors in use are not affected."""
    if not load():
        return 0
    import torch

    return int(torch.ops.paca_kernels.cpu_output_cache_clear())
