"""Every paca_kernels op restated in standard ATen ops, for exporters (ONNX) that cannot call C++.

``torch.onnx.export(model, args, path, dynamo=True)`` captures the model with ``torch.export`` and then
runs ``ExportedProgram.run_decompositions`` with the table that
``torch.onnx._internal.exporter._decomp.create_onnx_friendly_decomposition_table`` builds, before
translating each ATen op with its ONNX function. Importing this module wraps that function so that
its table also holds one decomposition per paca_kernels op (:func:`install_onnx_decompositions`):
that is what lets the plain call export a paca_kernels model. Each op becomes the ATen ops below,
which the exporter's own ONNX library translates (Softmax, MatMul, LayerNormalization, Conv, Gelu with
the exact erf form, ...). Nothing here imports onnx or onnxscript.

Why not the global ``torch._decomp.decomposition_table`` (which the ONNX exporter also reads): Inductor
asks ``get_decompositions`` about every op it falls back on, and where the environment variable ``CI``
is set (GitHub Actions and most CI systems) it refuses, with "make_fallback(...): a decomposition
exists", to compile an op that has an entry there. ``torch.compile``, ``torch.export`` and AOTInductor
therefore see no decomposition of these ops and keep calling the C++ kernels as extern kernels.

The differentiable ops' ``*_fwd`` (and ``p2c_attention_saved_fwd``) also return statistics for their
backward (``pooled``/``lse``/the softmax numerators today).
An exported graph is an inference graph that reads only ``out``; the decompositions compute ``out``
and return the statistics as NaN-filled placeholders with the fake kernel's shapes (so they follow the
schema whatever the statistics are, and a graph that did read them would see NaN, not plausible
numbers). Decomposing a backward graph is not supported.

Each function below takes the op's arguments (schemas in csrc/registration.cpp) and computes in the
accumulation dtype (float64 for float64 inputs, float32 otherwise), as the kernels do; for float32
models every cast is a no-op and adds no node.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

try:  # the dynamo ONNX exporter's decomposition module (torch >= 2.5; private, so guarded)
    from torch.onnx._internal.exporter import _decomp as _onnx_decomp
except ImportError:  # pragma: no cover - a torch without it: ONNX export of the custom ops unavailable
    _onnx_decomp = None

from .. import _ext, reference
from ._registration import _p2c_fake_fwd, _p2c_fake_saved_fwd, _pool_fake_fwd, acc_dtype

__all__ = [
    "DECOMPOSITIONS",
    "cached_linear",
    "cluster_pool_fwd",
    "conv_cluster_logits",
    "conv_paca_layer",
    "install_onnx_decompositions",
    "layer_norm",
    "linear",
    "mlp_dwconv",
    "mlp_fused",
    "onnx_decomposition_table",
    "p2c_attention_fwd",
    "p2c_attention_proj",
    "p2c_attention_saved_fwd",
    "patch_embed",
]


def _acc(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dtype)


def _placeholders(fake: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    # The backward's statistics: NaN with the fake kernel's shapes and dtypes (module docstring).
    return tuple(torch.full_like(t, float("nan")) for t in fake[1:])


def _to_image(x: Tensor, H: int, W: int) -> Tensor:
    """Tokens (B, N, C), N = H·W in row-major order, as the (B, C, H, W) image they are."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], H, W)


def _depthwise(u: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Depthwise k×k convolution with "same" zero padding (k odd) of a (B, C, H, W) image."""
    return F.conv2d(u, weight, bias, padding=weight.shape[-1] // 2, groups=u.shape[1])


def cluster_pool_fwd(
    logits: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, ...]:
    """out (B, M, C) = LayerNorm_C(softmax(logits over N) · x) · weight + bias, for logits (B, M, N) and
    x (B, N, C); then the statistics placeholders."""
    acc = acc_dtype(x.dtype)
    out = reference.cluster_pool(logits.to(acc), x.to(acc), _acc(weight, acc), _acc(bias, acc), eps)
    return (out.to(x.dtype).contiguous(), *_placeholders(_pool_fake_fwd(logits, x, weight, bias, eps)))


def p2c_attention_fwd(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, ...]:
    """out (B, N, h, d) = softmax(scale · q·kᵀ over M) · v per head, for q (B, N, h, d) and k, v
    (B, M, h, d); then the statistics placeholders."""
    acc = acc_dtype(q.dtype)
    out = reference.p2c_attention(q.to(acc), k.to(acc), v.to(acc), scale)
    return (out.to(q.dtype).contiguous(), *_placeholders(_p2c_fake_fwd(q, k, v, scale)))


def p2c_attention_saved_fwd(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, ...]:
    """The CPU training forward (traced where gradients are enabled): out as ``p2c_attention_fwd``'s;
    the numerators and their sums as placeholders."""
    return p2c_attention_fwd(q, k, v, scale)[:1] + _placeholders(_p2c_fake_saved_fwd(q, k, v, scale))


def _conv_logits_acc(
    x: Tensor, H: int, W: int, dw_weight: Tensor, dw_bias: Tensor | None, w1: Tensor, b1: Tensor | None,
    w2: Tensor, b2: Tensor | None,
) -> Tensor:
    acc = x.dtype
    y = F.gelu(_depthwise(_to_image(x, H, W), dw_weight.to(acc), _acc(dw_bias, acc)))
    y = F.gelu(F.conv2d(y, w1.to(acc), _acc(b1, acc)))
    return F.conv2d(y, w2.to(acc), _acc(b2, acc)).flatten(2)  # (B, M, N)


def conv_cluster_logits(
    x: Tensor, H: int, W: int, dw_weight: Tensor, dw_bias: Tensor | None, w1: Tensor, b1: Tensor | None,
    w2: Tensor, b2: Tensor | None,
) -> Tensor:
    """logits (B, M, N) = conv1x1_w2(GELU(conv1x1_w1(GELU(dwconv(x) + dw_bias)) + b1)) + b2 on the H×W
    image of x (B, N, C), exact GELU."""
    acc = acc_dtype(x.dtype)
    return _conv_logits_acc(x.to(acc), H, W, dw_weight, dw_bias, w1, b1, w2, b2).to(x.dtype).contiguous()


def _mlp_dwconv_acc(
    x: Tensor, H: int, W: int, weight: Tensor, bias: Tensor | None, in_bias: Tensor | None,
    shortcut: bool, gelu: bool,
) -> Tensor:
    acc = x.dtype
    u = _to_image(x if in_bias is None else x + in_bias.to(acc), H, W)
    y = _depthwise(u, weight.to(acc), _acc(bias, acc))
    if shortcut:
        y = y + u
    if gelu:
        y = F.gelu(y)
    return y.flatten(2).transpose(1, 2)  # (B, N, C)


def mlp_dwconv(
    x: Tensor, H: int, W: int, weight: Tensor, bias: Tensor | None, in_bias: Tensor | None,
    shortcut: bool, gelu: bool,
) -> Tensor:
    """y (B, N, C) = act(dwconv(u) + bias + shortcut·u), u = x + in_bias, on the H×W image of x
    (B, N, C); act = exact GELU if ``gelu``."""
    acc = acc_dtype(x.dtype)
    y = _mlp_dwconv_acc(x.to(acc), H, W, weight, bias, in_bias, shortcut, gelu)
    return y.to(x.dtype).contiguous()


def mlp_fused(
    x: Tensor, H: int, W: int, fc1_weight: Tensor, fc1_bias: Tensor | None, dw_weight: Tensor,
    dw_bias: Tensor | None, shortcut: bool, gelu: bool, fc2_weight: Tensor, fc2_bias: Tensor | None,
    norm: bool = False, norm_weight: Tensor | None = None, norm_bias: Tensor | None = None,
    eps: float = 1e-5, residual: bool = False, bf16_products: bool = False,
) -> Tensor:
    """out (B, N, Co) = [x +] round(fc2(act(dwconv(u) + dw_bias + shortcut·u))), u = fc1(round(a)),
    a = LayerNorm(x) if ``norm`` else x, for x (B, N, C); round: to bf16 if ``bf16_products``, else
    to x's dtype."""
    acc = acc_dtype(x.dtype)
    mid = torch.bfloat16 if bf16_products else x.dtype
    a = x.to(acc)
    if norm:
        a = F.layer_norm(a, (a.shape[-1],), _acc(norm_weight, acc), _acc(norm_bias, acc), eps)
    u = F.linear(a.to(mid).to(acc), fc1_weight.to(acc), _acc(fc1_bias, acc))
    g = _mlp_dwconv_acc(u, H, W, dw_weight, dw_bias, None, shortcut, gelu)
    m = F.linear(g, fc2_weight.to(acc), _acc(fc2_bias, acc)).to(mid).to(acc)
    return (x.to(acc) + m if residual else m).to(x.dtype).contiguous()


def _attention_proj_acc(
    x: Tensor, c: Tensor, q_weight: Tensor, q_bias: Tensor | None, k_weight: Tensor, k_bias: Tensor | None,
    v_weight: Tensor, v_bias: Tensor | None, proj_weight: Tensor, proj_bias: Tensor | None,
    num_heads: int, scale: float,
) -> Tensor:
    acc = x.dtype
    b, n, m = x.shape[0], x.shape[1], c.shape[1]
    d = q_weight.shape[0] // num_heads
    q = F.linear(x, q_weight.to(acc), _acc(q_bias, acc)).reshape(b, n, num_heads, d)
    k = F.linear(c, k_weight.to(acc), _acc(k_bias, acc)).reshape(b, m, num_heads, d)
    v = F.linear(c, v_weight.to(acc), _acc(v_bias, acc)).reshape(b, m, num_heads, d)
    o = reference.p2c_attention(q, k, v, scale).reshape(b, n, num_heads * d)
    return F.linear(o, proj_weight.to(acc), _acc(proj_bias, acc))


def p2c_attention_proj(
    x: Tensor, c: Tensor, q_weight: Tensor, q_bias: Tensor | None, k_weight: Tensor, k_bias: Tensor | None,
    v_weight: Tensor, v_bias: Tensor | None, proj_weight: Tensor, proj_bias: Tensor | None,
    num_heads: int, scale: float, residual: Tensor | None = None,
) -> Tensor:
    """out (B, N, Co) = proj(softmax(scale · q·kᵀ over M) · v) per head, with q = x·Wqᵀ + bq (x (B, N, C))
    and k, v from the cluster tokens c (B, M, C); plus ``residual`` (in its dtype) when given."""
    acc = acc_dtype(x.dtype)
    out = _attention_proj_acc(x.to(acc), c.to(acc), q_weight, q_bias, k_weight, k_bias, v_weight, v_bias,
                              proj_weight, proj_bias, num_heads, scale)
    return _plus_residual(out.to(x.dtype), residual)


def _plus_residual(out: Tensor, residual: Tensor | None) -> Tensor:
    """residual + out (out already rounded to x's dtype), summed in the accumulation dtype and
    returned contiguous in the residual's dtype; out itself without one."""
    if residual is None:
        return out.contiguous()
    acc = acc_dtype(residual.dtype)
    return (residual.to(acc) + out.to(acc)).to(residual.dtype).contiguous()


def conv_paca_layer(
    x: Tensor, H: int, W: int, dw_weight: Tensor, dw_bias: Tensor | None, w1: Tensor, b1: Tensor | None,
    w2: Tensor, b2: Tensor | None, norm_weight: Tensor | None, norm_bias: Tensor | None, eps: float,
    q_weight: Tensor, q_bias: Tensor | None, k_weight: Tensor, k_bias: Tensor | None, v_weight: Tensor,
    v_bias: Tensor | None, proj_weight: Tensor, proj_bias: Tensor | None, num_heads: int, scale: float,
    probs: bool, residual: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """A whole PaCa layer: logits = conv_cluster_logits(x) (B, M, N), c = LayerNorm(softmax(logits) · x)
    (B, M, C), out = p2c_attention_proj(x, c) (B, N, Co); returns (out, softmax(logits over N) if
    ``probs`` else logits)."""
    acc = acc_dtype(x.dtype)
    xa = x.to(acc)
    logits = _conv_logits_acc(xa, H, W, dw_weight, dw_bias, w1, b1, w2, b2)
    c = reference.cluster_pool(logits, xa, _acc(norm_weight, acc), _acc(norm_bias, acc), eps)
    out = _attention_proj_acc(xa, c, q_weight, q_bias, k_weight, k_bias, v_weight, v_bias, proj_weight,
                              proj_bias, num_heads, scale)
    assign = reference.cluster_assign(logits) if probs else logits
    return _plus_residual(out.to(x.dtype), residual), assign.to(x.dtype).contiguous()


def patch_embed(
    x: Tensor, weight: Tensor, bias: Tensor | None, stride: int, padding: int, norm: bool,
    norm_weight: Tensor | None, norm_bias: Tensor | None, eps: float,
) -> Tensor:
    """out (B, Ho, Wo, Co) = LayerNorm over Co (if ``norm``) of conv2d(x) for channels-last x (B, H, W, C)."""
    acc = acc_dtype(x.dtype)
    y = F.conv2d(x.to(acc).permute(0, 3, 1, 2), weight.to(acc), _acc(bias, acc), stride, padding)
    y = y.permute(0, 2, 3, 1)
    if norm:
        y = F.layer_norm(y, (y.shape[-1],), _acc(norm_weight, acc), _acc(norm_bias, acc), eps)
    return y.to(x.dtype).contiguous()


def layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
               dtype: torch.dtype | None = None) -> Tensor:
    """out (..., C) = LayerNorm over C of x, in ``dtype`` (x's by default), contiguous."""
    acc = acc_dtype(x.dtype)
    y = F.layer_norm(x.to(acc), (x.shape[-1],), _acc(weight, acc), _acc(bias, acc), eps)
    return y.to(dtype if dtype is not None else x.dtype).contiguous()


def linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """out (..., O) = x Wᵀ + b in x's dtype, contiguous (summed in the accumulation dtype)."""
    acc = acc_dtype(x.dtype)
    return F.linear(x.to(acc), weight.to(acc), _acc(bias, acc)).to(x.dtype).contiguous()


def cached_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """out (..., O) = x Wᵀ + b (``F.linear``, as the kernel computes it), contiguous."""
    return F.linear(x, weight, bias).contiguous()


#: Op name (``torch.ops.paca_kernels.<name>``) -> its decomposition.
DECOMPOSITIONS: dict[str, Callable[..., object]] = {
    "cluster_pool_fwd": cluster_pool_fwd,
    "p2c_attention_fwd": p2c_attention_fwd,
    "p2c_attention_saved_fwd": p2c_attention_saved_fwd,
    "conv_cluster_logits": conv_cluster_logits,
    "mlp_dwconv": mlp_dwconv,
    "mlp_fused": mlp_fused,
    "p2c_attention_proj": p2c_attention_proj,
    "conv_paca_layer": conv_paca_layer,
    "patch_embed": patch_embed,
    "layer_norm": layer_norm,
    "linear": linear,
    "cached_linear": cached_linear,
    # The Triton twins (defined where Triton imports; ops/<op>.py) compute the same and return the same
    # outputs: a model exported from a GPU on the triton backend needs them.
    "cluster_pool_fwd_triton": cluster_pool_fwd,
    "p2c_attention_fwd_triton": p2c_attention_fwd,
}


def onnx_decomposition_table() -> dict[torch._ops.OpOverload, Callable[..., object]]:
    """``{op overload: decomposition}`` for the ops that exist: the extension's (none without it: a
    model then runs on the reference backend or, on a GPU, Triton) and the Triton twins where Triton
    imports. Looked up at each export, so ops defined after this module imports are included."""
    _ext.load()
    table = {}
    for name, fn in DECOMPOSITIONS.items():
        packet = getattr(torch.ops.paca_kernels, name, None)
        if packet is not None:
            table[packet.default] = fn
    return table


def install_onnx_decompositions() -> list[str]:
    """Wrap the ONNX exporter's decomposition-table builder so that its table includes
    :func:`onnx_decomposition_table` (idempotent); returns the op names it adds. The exporter looks the
    builder up on its module at each export (``_fx_passes.decompose_with_registry``), so the wrapper
    serves every later ``torch.onnx.export`` call."""
    builder = getattr(_onnx_decomp, "create_onnx_friendly_decomposition_table", None)
    if builder is None:  # a torch whose exporter is laid out otherwise: nothing to wrap
        return []
    if not getattr(builder, "_paca_kernels", False):
        def create_onnx_friendly_decomposition_table(onnx_registered_ops):  # type: ignore[no-untyped-def]
            table = builder(onnx_registered_ops)
            for op, fn in onnx_decomposition_table().items():
                if op not in onnx_registered_ops:
                    table.setdefault(op, fn)
            return table

        create_onnx_friendly_decomposition_table._paca_kernels = True  # type: ignore[attr-defined]
        create_onnx_friendly_decomposition_table.__wrapped__ = builder  # type: ignore[attr-defined]
        _onnx_decomp.create_onnx_friendly_decomposition_table = create_onnx_friendly_decomposition_table
    return [op.name().split("::")[1].split(".")[0] for op in onnx_decomposition_table()]


REGISTERED = install_onnx_decompositions()
