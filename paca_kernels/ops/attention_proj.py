"""The fused attention of a PaCa layer (inference): ``torch.ops.paca_kernels.p2c_attention_proj``.

After the pooling, a PaCa layer is five ops through PyTorch, the patch-sized ones writing a (B, N, C)
tensor to memory that the next one reads back:

    q = x · Wqᵀ + bq,  k = c · Wkᵀ + bk,  v = c · Wvᵀ + bv,
    o = softmax(q · kᵀ · scale over M) · v  (per head),  out = o · Wpᵀ + bp

and each linear with a bias first broadcasts its bias into a freshly allocated output. The C++ kernel
(csrc/cpu/p2c_attention.cpp) computes k and v of the M cluster tokens straight into the per-head
layout the attention reads, then takes each block of query rows through the whole chain, all heads,
in cache: the only tensor it writes is ``out`` (B, N, Co).

It has no backward: :class:`~paca_kernels.nn.PaCaAttention` uses it only when no gradient is needed
(see :func:`fused_attention_applies`), and its modules otherwise. The fake kernel makes it
traceable by ``torch.compile``; the FLOP formula counts it like the four linears and the
attention it replaces, so ``FlopCounterMode`` totals do not change.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import register_flop_formula

from .. import _ext
from ._inference import backend_is_cpu, fusable_in_inference, register_inference_only

__all__ = ["REGISTERED", "attention_is_fusable", "attention_proj_flops", "fused_attention_applies", "p2c_attention_proj"]

_LIB = "paca_kernels"


def _register() -> bool:
    if not _ext.load() or not hasattr(torch.ops.paca_kernels, "p2c_attention_proj"):
        return False
    op = torch.ops.paca_kernels.p2c_attention_proj

    @torch.library.register_fake(f"{_LIB}::p2c_attention_proj")
    def _fake(x, c, q_weight, q_bias, k_weight, k_bias, v_weight, v_bias, proj_weight, proj_bias,
              num_heads, scale):
        return x.new_empty((*x.shape[:2], proj_weight.shape[0]))

    register_inference_only(
        "p2c_attention_proj", "PaCaAttention runs its q/k/v/proj modules and p2c_attention when gradients are needed"
    )

    @register_flop_formula(op)
    def _flops(x_shape, c_shape, wq_shape, bq_shape, wk_shape, bk_shape, wv_shape, bv_shape, wp_shape,
               *args, **kwargs) -> int:
        return attention_proj_flops(x_shape, c_shape[1], wq_shape, wp_shape)

    return True


def attention_proj_flops(x_shape, m: int, wq_shape, wp_shape) -> int:
    """What FlopCounterMode counts for the q, k, v linears (k and v over m cluster tokens), the
    attention's two matmuls and the output projection."""
    b, n, c = x_shape
    hd = wq_shape[0]
    return 2 * b * (n + 2 * m) * c * hd + 4 * b * n * m * hd + 2 * b * n * hd * wp_shape[0]


REGISTERED = _register()


def p2c_attention_proj(layer: nn.Module, x: Tensor, c: Tensor) -> Tensor:
    """``layer.proj(p2c_attention(q(x), k(c), v(c)))`` for a :class:`~paca_kernels.nn.PaCaAttention`
    ``layer``, patch tokens x (B, N, C) and cluster tokens c (B, M, C), through the fused kernel (no
    autograd, dropout not applied). Returns (B, N, C)."""
    return torch.ops.paca_kernels.p2c_attention_proj(
        x, c, layer.q.weight, layer.q.bias, layer.k.weight, layer.k.bias, layer.v.weight, layer.v.bias,
        layer.proj.weight, layer.proj.bias, layer.num_heads, 1.0 / math.sqrt(layer.head_dim),
    )


def fused_attention_applies(layer: nn.Module, x: Tensor) -> bool:
    """Whether ``layer``'s q/k/v projections, attention and output projection may run as the fused
    kernel on x: fusable modules (see :func:`attention_is_fusable`), a backend that resolves to
    "cpu", CPU tensors outside autocast, no gradient wanted, and no forward hooks on the projections
    or the dropout (which the kernel would skip)."""
    if not attention_is_fusable(layer):
        return False
    linears = (layer.q, layer.k, layer.v, layer.proj)
    return fusable_in_inference(x, *linears, layer.proj_drop) and backend_is_cpu(layer.backend, x)


def attention_is_fusable(layer: nn.Module) -> bool:
    """Whether the kernel computes what ``layer``'s attention does (structure only, no input): the
    extension loaded, plain ``nn.Linear`` projections (a subclass could compute something else) and
    inactive dropouts. Reads the module dict directly (nn.Module.__getattr__ is slow), as it runs on
    every inference call."""
    mods = layer._modules
    if not (REGISTERED and type(mods["q"]) is nn.Linear and type(mods["k"]) is nn.Linear
            and type(mods["v"]) is nn.Linear and type(mods["proj"]) is nn.Linear):
        return False
    return not (layer.training and (layer.attn_drop > 0.0 or mods["proj_drop"].p > 0.0))
