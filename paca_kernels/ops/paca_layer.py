"""A whole PaCa layer in inference as one op: ``torch.ops.paca_kernels.conv_paca_layer``.

With the conv clustering head, a LayerNorm on the cluster tokens and plain projections, a PaCa layer
in inference on the cpu backend is three fused kernels in sequence::

    logits = conv_cluster_logits(x)                            (B, M, N)   ops.clustering_head
    c      = cluster_pool(logits, x) (LayerNorm epilogue)      (B, M, C)   ops.cluster_pool
    out    = p2c_attention_proj(x, c) (q/k/v, attention, proj) (B, N, C)   ops.attention_proj

plus z = softmax(logits over N), which the official layer returns. The C++ op
(csrc/cpu/paca_layer.cpp) calls the three kernels directly and computes z in one parallel pass
over the logits, as torch.softmax does (exp(l − max), times 1 / sum). The Python between the
kernels (module walks, backend selection, three dispatches and a torch.softmax) ran on the calling
thread while the other threads waited, 2-3.5 % of the layer's time at PaCa-ViT-Tiny's stages 2-3.

It has no backward: :class:`~paca_kernels.nn.PaCaAttention` uses it only when no gradient is needed
(see :func:`fused_layer_applies`), and its modules and autograd ops otherwise. The fake kernel makes
it traceable by ``torch.compile``; the FLOP formula counts it like the ops it replaces, so
``FlopCounterMode`` totals do not change.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import register_flop_formula

from .. import _ext
from ._inference import backend_is_cpu, fusable_in_inference, register_inference_only
from .attention_proj import attention_is_fusable, attention_proj_flops
from .clustering_head import head_flops, head_is_fusable

__all__ = ["REGISTERED", "conv_paca_layer", "fused_layer_applies"]

_LIB = "paca_kernels"


def _register() -> bool:
    if not _ext.load() or not hasattr(torch.ops.paca_kernels, "conv_paca_layer"):
        return False
    op = torch.ops.paca_kernels.conv_paca_layer

    @torch.library.register_fake(f"{_LIB}::conv_paca_layer")
    def _fake(x, H, W, dw_weight, dw_bias, w1, b1, w2, b2, norm_weight, norm_bias, eps, q_weight,
              q_bias, k_weight, k_bias, v_weight, v_bias, proj_weight, proj_bias, num_heads, scale,
              probs):
        b, n = x.shape[:2]
        return x.new_empty((b, n, proj_weight.shape[0])), x.new_empty((b, w2.shape[0], n))

    register_inference_only(
        "conv_paca_layer", "PaCaAttention runs its modules and autograd ops when gradients are needed"
    )

    @register_flop_formula(op)
    def _flops(x_shape, H, W, dw_shape, dwb_shape, w1_shape, b1_shape, w2_shape, b2_shape,
               nw_shape, nb_shape, eps, wq_shape, bq_shape, wk_shape, bk_shape, wv_shape, bv_shape,
               wp_shape, *args, **kwargs) -> int:
        # What FlopCounterMode counts for the ops it replaces: the head's convolutions, the
        # pooling's bmm (2·B·M·N·C, as cluster_pool's formula), and the attention with projections.
        b, n, c = x_shape
        m = w2_shape[0]
        return (head_flops(x_shape, dw_shape, w1_shape, w2_shape) + 2 * b * m * n * c
                + attention_proj_flops(x_shape, m, wq_shape, wp_shape))

    return True


REGISTERED = _register()


def conv_paca_layer(layer: nn.Module, x: Tensor, H: int, W: int, probs: bool) -> tuple[Tensor, Tensor]:
    """The inference forward of a :class:`~paca_kernels.nn.PaCaAttention` ``layer`` for which
    :func:`fused_layer_applies` holds, on patch tokens x (B, N, C) of an H×W grid, as one op (no
    autograd, dropout not applied). Returns (out (B, N, C), z (B, M, N) if ``probs`` else the logits)."""
    # The Sequential's modules as a list: its __getitem__ costs about 1.4 us per index.
    dw, _, c1, _, c2 = list(layer.clustering.clustering._modules.values())[:5]
    norm = layer.cluster_norm
    return torch.ops.paca_kernels.conv_paca_layer(
        x, H, W, dw.weight, dw.bias, c1.weight, c1.bias, c2.weight, c2.bias, norm.weight, norm.bias,
        norm.eps, layer.q.weight, layer.q.bias, layer.k.weight, layer.k.bias, layer.v.weight,
        layer.v.bias, layer.proj.weight, layer.proj.bias, layer.num_heads,
        1.0 / math.sqrt(layer.head_dim), probs,
    )


def fused_layer_applies(layer: nn.Module, x: Tensor) -> bool:
    """Whether ``layer`` (a PaCaAttention) may run as :func:`conv_paca_layer` on x: clusters computed
    on site by a fusable conv head (see ``head_is_fusable``), a plain LayerNorm on the cluster
    tokens and no cluster position embedding, fusable projections and inactive dropouts (see
    ``attention_is_fusable``), a backend that resolves to "cpu", CPU tensors outside autocast, no
    gradient wanted, and no forward hook anywhere in the layer (which the op would skip; a hook on
    ``attn_viz`` asks for the attention maps)."""
    if not (REGISTERED and layer.num_clusters > 0 and layer.onsite_clustering
            and not layer.cluster_pos_embed and type(layer.cluster_norm) is nn.LayerNorm):
        return False
    if not (head_is_fusable(layer.clustering) and attention_is_fusable(layer)):
        return False
    return fusable_in_inference(x, layer) and backend_is_cpu(layer.backend, x)
