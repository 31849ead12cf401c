"""The fused query side of a PaCa layer (inference): ``torch.ops.paca_kernels.p2c_attention_proj``.

Through PyTorch the patches' path through a PaCa layer is three ops, each writing a (B, N, C) tensor
to memory that the next one reads back:

    q = x · Wqᵀ + bq,    o = softmax(q · kᵀ · scale over M) · v  (per head),    out = o · Wpᵀ + bp

and each linear with a bias first broadcasts its bias into a freshly allocated output. The C++ kernel
(csrc/cpu/p2c_attention.cpp) takes each block of query rows through the whole chain, all heads, in
cache: the only tensor it writes is ``out`` (B, N, Co). The keys and values (B, M, h, d) come from the
layer's k and v modules as before (M ≪ N rows: cheap).

It has no backward: :class:`~paca_kernels.nn.PaCaAttention` uses it only when no gradient is needed
(see :func:`fused_query_side_applies`), and its modules otherwise. The fake kernel makes it
traceable by ``torch.compile``; the FLOP formula counts it like the two linears and the attention
it replaces, so ``FlopCounterMode`` totals do not change.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import register_flop_formula

from .. import _ext
from ._inference import backend_is_cpu, fusable_in_inference, register_inference_only

__all__ = ["REGISTERED", "fused_query_side_applies", "p2c_attention_proj"]

_LIB = "paca_kernels"


def _register() -> bool:
    if not _ext.load() or not hasattr(torch.ops.paca_kernels, "p2c_attention_proj"):
        return False
    op = torch.ops.paca_kernels.p2c_attention_proj

    @torch.library.register_fake(f"{_LIB}::p2c_attention_proj")
    def _fake(x, k, v, q_weight, q_bias, proj_weight, proj_bias, scale):
        return x.new_empty((*x.shape[:2], proj_weight.shape[0]))

    register_inference_only(
        "p2c_attention_proj", "PaCaAttention runs its q/proj modules and p2c_attention when gradients are needed"
    )

    @register_flop_formula(op)
    def _flops(x_shape, k_shape, v_shape, wq_shape, bq_shape, wp_shape, *args, **kwargs) -> int:
        b, n, c = x_shape
        m, hd = k_shape[1], k_shape[2] * k_shape[3]
        # What FlopCounterMode counts for the q linear, the attention (two matmuls) and proj.
        return 2 * b * n * c * hd + 4 * b * n * m * hd + 2 * b * n * hd * wp_shape[0]

    return True


REGISTERED = _register()


def p2c_attention_proj(layer: nn.Module, x: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """``layer.proj(p2c_attention(layer.q(x), k, v))`` for a :class:`~paca_kernels.nn.PaCaAttention`
    ``layer``, tokens x (B, N, C) and keys/values k, v (B, M, h, d), through the fused kernel (no
    autograd, dropout not applied). Returns (B, N, C)."""
    return torch.ops.paca_kernels.p2c_attention_proj(
        x, k, v, layer.q.weight, layer.q.bias, layer.proj.weight, layer.proj.bias,
        1.0 / math.sqrt(k.shape[-1]),
    )


def fused_query_side_applies(layer: nn.Module, x: Tensor) -> bool:
    """Whether ``layer``'s q projection, attention and output projection may run as the fused kernel
    on x: the extension loaded, a backend that resolves to "cpu", plain ``nn.Linear`` q and proj
    (a subclass could compute something else), inactive dropouts, CPU tensors outside autocast, no
    gradient wanted, and no forward hooks on q, proj or the dropout (which the kernel would skip)."""
    if not (REGISTERED and type(layer.q) is nn.Linear and type(layer.proj) is nn.Linear):
        return False
    if layer.training and (layer.attn_drop > 0.0 or layer.proj_drop.p > 0.0):
        return False
    return fusable_in_inference(x, layer.q, layer.proj, layer.proj_drop) and backend_is_cpu(layer.backend, x)
