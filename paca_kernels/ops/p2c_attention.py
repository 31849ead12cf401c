"""p2c_attention as a ``torch.library`` op: fake kernels, autograd, FLOP formulas, and the C++ backend.

The schemas live in ``csrc/registration.cpp`` (namespace ``paca_kernels``):

- ``p2c_attention_fwd(q, k, v, scale) -> (out, lse)``: q (B, N, h, d), k and v (B, M, h, d); out
  (B, N, h, d) in q's dtype, lse (B, h, N) = logsumexp over M of the scaled scores, in the accumulation
  dtype (float64 for float64 inputs, float32 otherwise), kept for the backward.
- ``p2c_attention_bwd(grad_out, q, k, v, out, lse, scale, deterministic) -> (dq, dk, dv)``.

Backward math (P = softmax(q·kᵀ·scale over M) recomputed from q, k and lse):

    D = rowsum(dO ∘ O),   dS = P ∘ (dO·vᵀ − D)
    dq = dS·k·scale,   dk = dSᵀ·q·scale,   dv = Pᵀ·dO   (the last two summed over N)
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _ext
from ._registration import register_p2c_attention

_LIB = "paca_kernels"


def _deterministic(q: Tensor) -> bool:
    # The CPU kernel's reduction over N is always in a fixed order; ask for determinism everywhere
    # on CPU so that the flag means the same thing to every kernel.
    return q.device.type == "cpu" or torch.are_deterministic_algorithms_enabled()


def _register() -> bool:
    """Attach the Python pieces to the C++ schemas; False when the extension is unavailable."""
    if not _ext.load():
        return False
    register_p2c_attention(f"{_LIB}::p2c_attention_fwd", f"{_LIB}::p2c_attention_bwd", _deterministic)
    return True


REGISTERED = _register()


def p2c_attention_cpp(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """The C++ backend: ``torch.ops.paca_kernels.p2c_attention_fwd`` (differentiable); returns out."""
    return torch.ops.paca_kernels.p2c_attention_fwd(q, k, v, scale)[0]
