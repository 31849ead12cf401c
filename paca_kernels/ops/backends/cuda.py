"""The "cuda" backend: the CUDA C++ kernels of ``paca_kernels._C`` (csrc/cuda).

The CUDA kernels register on the same schemas as the CPU kernels (``TORCH_LIBRARY_IMPL(paca_kernels,
CUDA, m)`` in csrc/cuda/torch_glue.cpp), so the fake kernels, autograd and FLOP formulas that
:mod:`paca_kernels.ops.cluster_pool` and :mod:`paca_kernels.ops.p2c_attention` attach to those ops serve
both devices; the p2c backward gets ``deterministic=torch.are_deterministic_algorithms_enabled()``
(fixed-order dk/dv reduction instead of fp32 atomics). Available when ``_C`` was built with its CUDA
kernels (a CUDA build of torch and nvcc at build time, ``PACA_KERNELS_BUILD_CUDA``) and a CUDA device
is visible.

Kernels: fp16/bf16 on tensor cores (WMMA; cluster_pool in TF32 on float probabilities), float32 with
fp32 FMA; compute capability 8.0 or newer. Tolerances as the triton backend's (fp32 FMA, atomics or
fixed-order partial sums), checked on the CPU through tests/backends/cuda_emulation.cpp. Size limits:
:func:`limits`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ... import _ext
from ..cluster_pool import cluster_pool_cpp
from ..dispatch import Backend
from ..p2c_attention import p2c_attention_cpp

__all__ = ["BACKEND", "limits"]

_AVAILABILITY: list[str | None] = []


def _availability() -> str | None:
    """None when ``_C`` holds CUDA kernels and a CUDA device is visible (computed once)."""
    if not _AVAILABILITY:
        reason: str | None = None
        if not _ext.load():
            reason = _ext.unavailable_reason()
        elif not torch._C._dispatch_has_kernel_for_dispatch_key("paca_kernels::cluster_pool_fwd", "CUDA"):
            info = _ext.build_info() or {}
            why = (
                "torch is a CPU-only build" if torch.version.cuda is None
                else "nvcc was not found or PACA_KERNELS_BUILD_CUDA=0" if not info.get("cuda_built")
                else "the CUDA kernels did not register"
            )
            reason = (
                f"paca_kernels._C was built without CUDA kernels ({why}): rebuild with a CUDA build of torch "
                "and nvcc (`PACA_KERNELS_BUILD_CUDA=1 pip install --no-build-isolation -e .`)"
            )
        elif not torch.cuda.is_available():
            reason = "no CUDA device is visible"
        _AVAILABILITY.append(reason)
    return _AVAILABILITY[0]


def _device_reasons(t: Tensor) -> list[str]:
    if t.device.type != "cuda":
        return []  # the generic device check reports it
    major, _ = torch.cuda.get_device_capability(t.device)
    return [] if major >= 8 else [f"needs compute capability >= 8.0 (sm_80), {t.device} is sm_{major}x"]


def limits() -> dict[str, int] | None:
    """The CUDA kernels' size limits (``max_keys``, ``max_head_dim``, ``max_channels``,
    ``max_channels_small_smem``, and the shared memory per block they are sized for,
    ``smem_per_block_sm80`` / ``smem_per_block_sm90``), from their one source, csrc/cuda/limits.h, through the build info
    (:func:`paca_kernels._ext.kernel_limits`); None without build info (then the backend is
    unavailable anyway)."""
    return _ext.kernel_limits("cuda")


_NO_LIMITS = "paca_kernels._C records no CUDA kernel limits (no _build_info.json): rebuild it"


def _p2c_limits(inputs: Sequence[Tensor]) -> list[str]:
    q, k = inputs[0], inputs[1]
    lim = limits()
    if lim is None:
        return [_NO_LIMITS]
    reasons = _device_reasons(q)
    if k.shape[1] > lim["max_keys"]:
        reasons.append(f"p2c_attention holds all keys on chip: M = {k.shape[1]} > {lim['max_keys']}")
    if q.shape[-1] > lim["max_head_dim"]:
        reasons.append(f"p2c_attention head dim d = {q.shape[-1]} > {lim['max_head_dim']}")
    return reasons


def _max_channels(device: torch.device, lim: dict[str, int]) -> int:
    if device.type != "cuda":
        return lim["max_channels"]
    # cluster_pool's backward above max_channels_small_smem channels is sized for sm_90's shared
    # memory per block (csrc/cuda/limits.h: kSmemPerBlockSm90; sm_80 has kSmemPerBlockSm80).
    props = torch.cuda.get_device_properties(device)
    smem = getattr(props, "shared_memory_per_block_optin", 0)
    return lim["max_channels"] if smem >= lim["smem_per_block_sm90"] else lim["max_channels_small_smem"]


def _cp_limits(inputs: Sequence[Tensor]) -> list[str]:
    x = inputs[1]
    lim = limits()
    if lim is None:
        return [_NO_LIMITS]
    reasons = _device_reasons(x)
    small = lim["max_channels_small_smem"]
    limit = lim["max_channels"] if x.shape[-1] <= small else _max_channels(x.device, lim)
    if x.shape[-1] > limit:
        reasons.append(f"cluster_pool holds a cluster's channels on chip: C = {x.shape[-1]} > {limit}")
    return reasons


BACKEND = Backend(
    name="cuda",
    description="CUDA C++ kernels (paca_kernels._C): fused cluster_pool and p2c_attention, tensor cores",
    device_types=("cuda",),
    dtypes=(torch.float16, torch.bfloat16, torch.float32),
    impls={"cluster_pool": cluster_pool_cpp, "p2c_attention": p2c_attention_cpp},
    availability=_availability,
    limits={"cluster_pool": _cp_limits, "p2c_attention": _p2c_limits},
    tolerances={torch.float32: (1e-5, 1e-5)},
    grad_tolerances={torch.float32: (3e-5, 3e-5)},
)
