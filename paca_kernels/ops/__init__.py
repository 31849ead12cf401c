"""Functional API of the two PaCa computations, with per-call backend dispatch.

- :func:`cluster_pool` (logits (B, M, N), x (B, N, C)) -> LayerNorm(softmax(logits over N)·x), (B, M, C)
- :func:`p2c_attention` (q (B, N, h, d), k and v (B, M, h, d)) -> softmax(q·kᵀ·scale over M)·v

Both take ``backend=`` (a name, or a comma-separated preference list); :mod:`.dispatch` holds the
selection rules and :mod:`.backends` the backends, one file each. The raw ops are
``torch.ops.paca_kernels.*`` for compile/export users; the inference-only fusions the layers use
are in :mod:`.fused`.

Layout: ``ops/<op>.py`` is an op's Python side (fake kernels, autograd, FLOP formulas, the backends'
entry points), ``ops/fused/<op>.py`` an inference fusion's. Nothing here imports ``paca_kernels.nn``
or ``paca_kernels.models``: the ops take tensors and numbers, never modules.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Importing registers the backends, and the ops' decompositions into ATen ops (for the ONNX exporter).
from .._ext import cpu_output_cache, cpu_output_cache_clear
from . import backends, decompositions
from ._checks import check_cluster_pool, check_p2c_attention
from .dispatch import (
    AUTO_PRIORITY,
    ENV_VAR,
    Backend,
    BackendError,
    backend_names,
    check_backend_name,
    get_backend,
    preferred_backend,
    register_backend,
    select_backend,
)

__all__ = [
    "AUTO_PRIORITY",
    "ENV_VAR",
    "Backend",
    "BackendError",
    "backend_names",
    "backend_status",
    "backends",
    "check_backend_name",
    "cluster_pool",
    "cpu_output_cache",
    "cpu_output_cache_clear",
    "decompositions",
    "get_backend",
    "p2c_attention",
    "preferred_backend",
    "register_backend",
    "select_backend",
]

_ALL_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _autocast(*tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """Under ``torch.autocast`` for the inputs' device, floating inputs go to the autocast dtype,
    as F.scaled_dot_product_attention does (the kernels accumulate in fp32 whatever the input)."""
    first = tensors[0]
    if not isinstance(first, Tensor):
        return tensors
    device_type = first.device.type
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(
        t.to(dtype) if isinstance(t, Tensor) and t.dtype != dtype and t.is_floating_point()
        and t.dtype != torch.float64 else t
        for t in tensors
    )


def cluster_pool(
    logits: Tensor,
    x: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-6,
    *,
    backend: str | None = None,
) -> Tensor:
    """Cluster tokens Z = LayerNorm(softmax(logits over N) · x), differentiable.

    Args:
        logits: (B, M, N) clustering scores.
        x: (B, N, C) patch tokens, same dtype and device as logits.
        weight, bias: (C,) LayerNorm affine, or None.
        eps: LayerNorm epsilon.
        backend: backend name or comma-separated preference list (None: env var, then automatic).

    Returns:
        (B, M, C) in x's dtype (the autocast dtype under ``torch.autocast``).

    Every backend gives the same answer on these edge cases:

    - N = 0 (no patches): ValueError. A softmax over an empty set is 0/0, like a row whose logits are
      all -inf (which gives NaN); there is no meaningful cluster token to return.
    - B = 0 or M = 0: an empty (B, M, C) output; gradients dx, dweight, dbias are 0.
    - C = 0: an empty (B, M, 0) output (LayerNorm over no channels); dlogits is 0, since nothing of
      the output depends on the logits.
    - Pooled rows far outside float32's squarable range (|P| ~ 1e20, or 1e-20 with a tiny eps): the true
      LayerNorm, computed with the row divided by a power of two near its largest magnitude
      (:func:`paca_kernels.reference.layer_norm_stats`); F.layer_norm gives NaN or loses the variance.
    - Logits of any magnitude (±1e4 from small-temperature clustering heads): the backward recomputes
      the softmax from the saved row max and sum, so gradients are as accurate as PyTorch's autograd.
    """
    logits, x, weight, bias = _autocast(logits, x, weight, bias)
    check_cluster_pool(logits, x, weight, bias, eps)
    impl = select_backend("cluster_pool", (logits, x), backend).impls["cluster_pool"]
    return impl(logits, x, weight, bias, eps)


def p2c_attention(
    q: Tensor, k: Tensor, v: Tensor, scale: float | None = None, *, backend: str | None = None
) -> Tensor:
    """Patch-to-cluster attention softmax(q·kᵀ·scale over M)·v per head, differentiable.

    Args:
        q: (B, N, h, d) queries.
        k, v: (B, M, h, d) cluster keys and values.
        scale: score scale (default d^-1/2).
        backend: backend name or comma-separated preference list (None: env var, then automatic).

    Returns:
        (B, N, h, d) in q's dtype (the autocast dtype under ``torch.autocast``). M = 0 (no clusters)
        is a ValueError on every backend; B, N, h or d = 0 give an empty output and zero gradients
        (d = 0: every score is 0, the default scale is then 1).
    """
    q, k, v = _autocast(q, k, v)
    check_p2c_attention(q, k, v)
    if scale is None:
        # d = 0: every score is an empty dot product (0) whatever the scale; out is empty.
        scale = 1.0 / math.sqrt(q.shape[-1]) if q.shape[-1] > 0 else 1.0
    impl = select_backend("p2c_attention", (q, k, v), backend).impls["p2c_attention"]
    return impl(q, k, v, scale)


def backend_status() -> dict[str, str | None]:
    """Backend name -> None when it can run here, else the reason it cannot."""
    return {name: get_backend(name).unavailable_reason() for name in backend_names()}

