"""The layers' decision points: which path serves one call of a layer.

:func:`plan_attention` (for :class:`~paca_kernels.nn.PaCaAttention`), :func:`plan_mlp` (for
:class:`~paca_kernels.nn.block.Mlp`), :func:`plan_mlp_residual` (for the second half of a
:class:`~paca_kernels.nn.block.PaCaBlock`) and :func:`plan_downsample` (for
:class:`~paca_kernels.nn.downsample.DownsampleV1`) look at every condition once (gradient wanted, autocast, hooks, the
layer's backend setting, module structure) and return the path; the layer's ``forward`` then runs it
straight through. A fused inference op (:mod:`paca_kernels.ops.fused`) bypasses the modules it
replaces, so it may only replace them where nothing could tell.

Everything here reads module structure and tensor metadata only. It runs on every call of a layer,
so it reads the module dicts directly (``nn.Module.__getattr__`` and a Sequential's ``__getitem__``
cost about a microsecond per access) and walks them with plain loops.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.modules.module import (
    _global_backward_hooks,
    _global_backward_pre_hooks,
    _global_forward_hooks,
    _global_forward_pre_hooks,
)

from ..ops import preferred_backend
from ..ops.fused import cached_linear as _cached_linear_op
from ..ops.fused import conv_cluster_logits as _head_op
from ..ops.fused import conv_paca_layer as _layer_op
from ..ops.fused import layer_norm as _ln_op
from ..ops.fused import linear as _linear_op
from ..ops.fused import mlp_dwconv as _dwconv_op
from ..ops.fused import mlp_fused as _mlp_op
from ..ops.fused import p2c_attention_proj as _attention_op
from ..ops.fused import patch_embed as _embed_op
from .clustering import P2CConv2d
from .layers import DropPath, DWConv, LayerNorm2d

__all__ = [
    "BLOCK_PARTS",
    "AttentionPlan",
    "MlpPath",
    "conv_head_tensors",
    "cpu_inference",
    "cpu_training",
    "exact_gelu",
    "global_hooks",
    "has_backward_hooks",
    "has_hooks",
    "linear_tensors",
    "plan_attention",
    "plan_attention_residual",
    "plan_block",
    "plan_downsample",
    "plan_layer_norm",
    "plan_linear",
    "plan_mlp",
    "plan_mlp_residual",
    "same_depthwise",
]


def _hooked(m: nn.Module) -> bool:
    if m._forward_hooks or m._forward_pre_hooks:
        return True
    # No memo of visited modules (as named_modules keeps): a shared submodule is merely checked twice,
    # and a module nested in itself already breaks state_dict() and repr(). A plain loop, not any()
    # over a generator: this walk runs on every inference call of a layer (about 20 modules).
    for c in m._modules.values():
        if c is not None and _hooked(c):
            return True
    return False


def _backward_hooked(m: nn.Module) -> bool:
    if m._backward_hooks or m._backward_pre_hooks:
        return True
    for c in m._modules.values():
        if c is not None and _backward_hooked(c):
            return True
    return False


def has_backward_hooks(*modules: nn.Module | None) -> bool:
    """Whether any of ``modules`` or their submodules has (full) backward (pre-)hooks, which fire
    from the module's call and so would not fire for a differentiable fused op that bypasses it."""
    for m in modules:
        if m is not None and _backward_hooked(m):
            return True
    return False


def global_hooks() -> bool:
    """Whether global forward (pre-)hooks are registered (``register_module_forward_hook``; also
    FlopCounterMode's module tracker): they would fire for every submodule a kernel replaces."""
    return bool(_global_forward_hooks or _global_forward_pre_hooks)


def has_hooks(*modules: nn.Module | None) -> bool:
    """Whether any of ``modules`` or their submodules has forward (pre-)hooks (which a fused kernel
    would skip). Global hooks are :func:`global_hooks`' concern."""
    for m in modules:
        if m is not None and _hooked(m):
            return True
    return False


#: The CPU autocast dtypes under which the fused ops run (in that dtype).
_AUTOCAST_DTYPES = (torch.bfloat16, torch.float16)


def cpu_inference(backend: str | None, x: Tensor, module: nn.Module, *extra: Tensor | None) -> bool:
    """The conditions every fused inference op shares, for ``module`` run on x: x on the CPU (under
    CPU autocast only to bfloat16 or float16, which the fused ops then run in, as the modules they
    replace would: :func:`paca_kernels.ops.fused._common.autocast_input`), the
    ``backend`` setting resolving to "cpu", no global hooks, and no gradient wanted through x, the
    ``extra`` tensors or any parameter of ``module``."""
    if x.device.type != "cpu" or global_hooks():
        return False
    if torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") not in _AUTOCAST_DTYPES:
        return False
    if torch.is_grad_enabled():
        if x.requires_grad:
            return False
        for t in extra:
            if t is not None and t.requires_grad:
                return False
        for p in module.parameters():
            if p.requires_grad:
                return False
    return preferred_backend(backend, "cpu") == "cpu"


#: The dtypes the fused ops' backward kernels take (mlp_dwconv_bwd).
_TRAINING_DTYPES = (torch.float32, torch.float64)


def cpu_training(backend: str | None, x: Tensor, module: nn.Module) -> bool:
    """The conditions under which a differentiable fused op (``mlp_dwconv``, and through it the conv
    head) may serve ``module`` run on x with gradients wanted: x on the CPU in float32 or float64 with
    ``module``'s parameters in x's dtype (what the backward kernels take, as the modules would see
    them), no CPU autocast (the modules would run in bf16 there), no global hooks, the ``backend``
    setting resolving to "cpu", and a gradient wanted through x or a parameter (else
    :func:`cpu_inference` decides). No global backward hooks either (they fire from the module
    calls a fused op bypasses); the modules' own are the plans' concern (:func:`has_backward_hooks`)."""
    if x.device.type != "cpu" or x.dtype not in _TRAINING_DTYPES or global_hooks():
        return False
    if _global_backward_hooks or _global_backward_pre_hooks:
        return False
    if not torch.is_grad_enabled() or torch.is_autocast_enabled("cpu"):
        return False
    wanted = x.requires_grad
    for p in module.parameters():
        if p.dtype != x.dtype:
            return False
        wanted = wanted or p.requires_grad
    return wanted and preferred_backend(backend, "cpu") == "cpu"


def exact_gelu(m: nn.Module) -> bool:
    """An ``nn.GELU`` (not a subclass) with the erf form, which the kernels compute."""
    return type(m) is nn.GELU and m.approximate == "none"


def same_depthwise(conv: nn.Module) -> bool:
    """A depthwise Conv2d with an odd square kernel, stride 1, no dilation and zero "same" padding:
    what the fused kernels' depthwise stage computes."""
    if not isinstance(conv, nn.Conv2d):
        return False
    k = conv.kernel_size[0]
    return (
        conv.kernel_size == (k, k) and k % 2 == 1 and conv.padding == ((k - 1) // 2,) * 2
        and conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.groups == conv.in_channels
        and conv.in_channels == conv.out_channels and conv.padding_mode == "zeros"
    )


def _pointwise(conv: nn.Module) -> bool:
    return (type(conv) is nn.Conv2d and conv.kernel_size == (1, 1) and conv.stride == (1, 1)
            and conv.groups == 1)


def conv_head_tensors(
    seq: nn.Module,
) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None, Tensor, Tensor | None] | None:
    """For the ``clustering`` Sequential of a P2CConv2d head, the tensors of
    :func:`paca_kernels.ops.fused.conv_cluster_logits.conv_cluster_logits` (dw_weight, dw_bias, w1,
    b1, w2, b2) when the kernel computes what it does (a "same" depthwise conv, exact GELUs, plain 1×1
    convs), else None. Structure only: the caller checks the head's class and hooks."""
    mods = list(seq._modules.values())
    if len(mods) < 5:
        return None
    dw, a1, c1, a2, c2 = mods[:5]
    if not (same_depthwise(dw) and exact_gelu(a1) and exact_gelu(a2) and _pointwise(c1)
            and _pointwise(c2)):
        return None
    dwp, p1, p2 = dw._parameters, c1._parameters, c2._parameters  # not __getattr__: hot path
    return dwp["weight"], dwp["bias"], p1["weight"], p1["bias"], p2["weight"], p2["bias"]


def linear_tensors(*linears: nn.Module) -> tuple[Tensor | None, ...] | None:
    """(weight, bias, weight, bias, ...) of plain ``nn.Linear`` modules (a subclass could compute
    something else), else None."""
    out: list[Tensor | None] = []
    for m in linears:
        if type(m) is not nn.Linear:
            return None
        params = m._parameters  # not __getattr__: hot path
        out.append(params["weight"])
        out.append(params["bias"])
    return tuple(out)


# -- the plans ---------------------------------------------------------------------------------------


class AttentionPlan(NamedTuple):
    """Which path serves one call of a PaCaAttention layer."""

    #: The whole forward as ``conv_paca_layer`` (with ``head`` and ``attention``).
    layer: bool
    #: The conv head's tensors for ``conv_cluster_logits``, or None: the head's modules run.
    head: tuple | None
    #: q/k/v/proj weights and biases for ``p2c_attention_proj``, or None: the modules and
    #: ``ops.p2c_attention`` run.
    attention: tuple | None
    #: Logits are pooled by ``ops.cluster_pool`` with the LayerNorm as its epilogue (else the
    #: probabilities' matmul, the position embedding and the norm module).
    fused_pool: bool
    #: The attention maps are wanted (``return_attn``, or a forward or forward pre-hook on ``attn_viz``).
    want_maps: bool


def _fused_attention(layer: nn.Module, want_maps: bool, hooked: bool | None = None) -> tuple | None:
    """The q/k/v/proj tensors for ``p2c_attention_proj`` in CPU inference, or None where the op
    would skip something: maps wanted, active dropouts, a hook on the projections or the dropout
    (``hooked``: whether the layer has any hook, when the caller already knows)."""
    mods = layer._modules
    if want_maps or not _attention_op.REGISTERED or (
        layer.training and (layer.attn_drop > 0.0 or mods["proj_drop"].p > 0.0)
    ):
        return None
    q, k, v, proj = mods["q"], mods["k"], mods["v"], mods["proj"]
    if hooked is None:
        hooked = has_hooks(layer)
    if hooked and has_hooks(q, k, v, proj, mods["proj_drop"]):
        return None
    return linear_tensors(q, k, v, proj)


def plan_attention(
    layer: nn.Module, x: Tensor, given: Tensor | None, return_attn: bool, checked: bool = False,
) -> AttentionPlan:
    """The path for one call of a PaCaAttention ``layer`` on x (B, N, C), with ``given`` the
    assignment passed in (logits or z, validated) or None. ``checked``: the caller
    (:func:`plan_block`) has found :func:`cpu_inference` true for x, ``given`` and the layer and no
    hook on the layer or any module in it.

    - pooling: ``ops.cluster_pool`` (LayerNorm epilogue) where the layer pools logits through a
      LayerNorm with no position embedding and no hook on the norm (the op would skip it);
    - fused parts, only in CPU inference on the cpu backend (:func:`cpu_inference`: no gradient
      wanted through x, ``given`` or any parameter, no autocast but to bf16/fp16, no global hooks):
      the conv head as ``conv_cluster_logits`` (a P2CConv2d the kernel computes exactly, no hooks in it), the attention
      as ``p2c_attention_proj`` (plain Linear projections, inactive dropouts, no maps wanted, no hooks
      on the projections or the dropout), also in the layers without clusters (self-attention
      over the patches: the keys are the patches, c = x);
    - the whole layer as ``conv_paca_layer`` where both parts and the pooling fuse, the norm is
      exactly an ``nn.LayerNorm`` and no module of the layer has a hook;
    - with gradients wanted on the cpu backend (:func:`cpu_training`: float32/float64, no autocast,
      no global hooks), the conv head (a P2CConv2d the kernels compute exactly, no hook in it) as
      the differentiable composition of ``conv_cluster_logits`` (``head`` set; the op's public
      function sees the gradient and composes), the rest as modules. Measured faster than the
      P2CConv2d modules at every shape it serves in PaCa-ViT-Tiny (head forward + backward, B = 8,
      M = 100, k = 7, one thread, CPU time, 15 interleaved rounds, median (IQR)): 56×56 C = 96:
      1.57x (1.53-1.65); 28×28 C = 192: 1.58x (1.56-1.60); 14×14 C = 320: 1.63x (1.62-1.66).
    """
    mods = layer._modules
    want_maps = return_attn or _hooked(mods["attn_viz"])
    if layer.num_clusters == 0:
        # Self-attention over the patches (the last stage): in CPU inference the same
        # p2c_attention_proj with the patches as the keys (c = x), one op for the four projections
        # and the attention.
        attention = None
        if checked or cpu_inference(layer.backend, x, layer):
            attention = _fused_attention(layer, want_maps, False if checked else None)
        return AttentionPlan(False, None, attention, False, want_maps)
    norm = mods["cluster_norm"]
    fused_pool = layer._ln_eps is not None and not layer.cluster_pos_embed and (checked or not has_hooks(norm))
    if not (checked or cpu_inference(layer.backend, x, layer, given)):
        # Training on the cpu backend: the conv head as conv_cluster_logits' differentiable
        # composition (mlp_dwconv's kernels and matrix products in token layout), where it is
        # exactly the P2CConv2d's modules, none hooked; the rest runs as modules and ops.
        head = None
        if (
            layer.onsite_clustering and _head_op.DIFFERENTIABLE and cpu_training(layer.backend, x, layer)
        ):
            clustering = mods["clustering"]
            if (type(clustering) is P2CConv2d and not has_hooks(clustering)
                    and not has_backward_hooks(clustering)):
                head = conv_head_tensors(clustering._modules["clustering"])
        return AttentionPlan(False, head, None, fused_pool, want_maps)
    hooked = not checked and has_hooks(layer)
    head = None
    if layer.onsite_clustering and _head_op.REGISTERED:
        clustering = mods["clustering"]
        if type(clustering) is P2CConv2d and not (hooked and has_hooks(clustering)):
            head = conv_head_tensors(clustering._modules["clustering"])
    attention = _fused_attention(layer, want_maps, hooked)
    whole = (
        _layer_op.REGISTERED and not hooked and head is not None and attention is not None
        and fused_pool and type(norm) is nn.LayerNorm
    )
    return AttentionPlan(whole, head, attention, fused_pool, want_maps)


#: The paths of an Mlp call: the whole MLP as ``mlp_fused``, ``mlp_dwconv`` between fc1's matrix
#: product and fc2, or the modules.
MlpPath = Literal["whole", "dwconv", "train", "modules"]


def plan_mlp(mlp: nn.Module, x: Tensor, checked: bool = False) -> MlpPath:
    """The path for one call of an :class:`~paca_kernels.nn.block.Mlp` on x (B, N, C). ``checked``:
    the caller (:func:`plan_block`) has found :func:`cpu_inference` true for x and the MLP and no
    hook on it or any module in it.

    The fused ops need the cpu backend, a :class:`DWConv` whose conv is a "same" odd square depthwise
    conv, an exact GELU or identity activation, a plain ``nn.Linear`` fc1 and no hooks on the modules
    they replace (fc1 still runs as ``F.linear`` on its weight, the dropout and fc2 as modules).

    - In CPU inference (:func:`cpu_inference`) the whole MLP runs as ``mlp_fused`` where fc2 is a
      plain ``nn.Linear``, the dropout inactive, fc2 and the dropout have no hooks and fc1's weight
      has at most :func:`~paca_kernels.ops.fused.mlp_fused.max_fused_weight` entries (where it
      beats the matrix products, measured: larger in bf16 on AMX); else "dwconv".
    - With gradients wanted (:func:`cpu_training`: float32/float64, no autocast) "train": the
      dwconv op, which has a backward (``mlp_dwconv_bwd``), between fc1 and fc2 as ``cached_linear``
      (their outputs, the step's largest tensors, in the CPU output cache rather than freshly
      mapped memory: a PaCa-ViT-Tiny training step at B = 8 about 6 % faster, in-process A/B), where
      fc2 is a plain ``nn.Linear`` with no hooks; else "dwconv" (fc2 as its module). Neither
      replaces a dropout, so the dropout's setting does not matter. The dwconv op was measured
      faster than the modules at every PaCa-ViT-Tiny stage, so it is taken at every shape: Mlp
      forward + backward, B = 8, one thread, CPU time, 15 interleaved rounds
      (benchmarks/interleaved_trainfuse.py), reference-backend time / this path's, median (IQR):
      56×56 C = 96: 1.29x (1.28-1.30); 28×28 C = 192: 1.04x (1.01-1.12); 14×14 C = 320: 1.06x
      (1.04-1.08); 7×7 C = 384: 1.05x (1.03-1.06). The matrix products, the same on both paths,
      are most of the later stages' time.
    """
    mods = mlp._modules
    # dwconv is a plain None attribute (not in _modules) when with_dwconv=False.
    dwconv, act, fc1 = mods.get("dwconv"), mods["act"], mods["fc1"]
    if not (_dwconv_op.REGISTERED and type(dwconv) is DWConv and type(fc1) is nn.Linear
            and same_depthwise(dwconv._modules["dwconv"])):
        return "modules"
    if not (type(act) is nn.Identity or exact_gelu(act)):
        return "modules"
    if not checked:
        if not cpu_inference(mlp.backend, x, mlp):
            if (
                _dwconv_op.DIFFERENTIABLE and cpu_training(mlp.backend, x, mlp)
                and not has_hooks(dwconv, act, fc1)
                and not has_backward_hooks(dwconv, act, fc1)
            ):
                fc2 = mods["fc2"]
                if (_cached_linear_op.REGISTERED and type(fc2) is nn.Linear and not has_hooks(fc2)
                        and not has_backward_hooks(fc2)):
                    return "train"
                return "dwconv"
            return "modules"
        if has_hooks(dwconv, act, fc1):
            return "modules"
    fc2, drop = mods["fc2"], mods["drop"]
    if (
        _mlp_op.REGISTERED and type(fc2) is nn.Linear and (not mlp.training or drop.p == 0.0)
        and fc1._parameters["weight"].numel() <= _mlp_op.max_fused_weight(x)
        and (checked or not has_hooks(fc2, drop))
    ):
        return "whole"
    return "dwconv"


def _identity_in_call(m: nn.Module) -> bool:
    """An ``nn.Identity``, or a :class:`DropPath` that is one in this call (eval mode or p = 0)."""
    return type(m) is nn.Identity or (type(m) is DropPath and (not m.training or m.drop_prob == 0.0))


def _pre_norm_half(block: nn.Module, half: int) -> tuple[nn.Module, nn.Module, nn.Module] | None:
    """(norm, after, drop_path) of a PaCaBlock's first or second half (``half`` 1 or 2) where it is
    the plain pre-norm form the fused halves compute: no layer scale, ``norm<half>_before`` exactly
    an ``nn.LayerNorm`` over C, ``norm<half>_after`` and ``drop_path<half>`` identities in this call,
    and no autocast other than to bfloat16 (where the kernels keep autocast's float32 residual
    stream; under fp16 autocast the modules run); else None."""
    mods = block._modules
    norm, after, dp = mods[f"norm{half}_before"], mods[f"norm{half}_after"], mods[f"drop_path{half}"]
    if block.layer_scale or type(norm) is not nn.LayerNorm or len(norm.normalized_shape) != 1:
        return None
    if not (type(after) is nn.Identity and _identity_in_call(dp)):
        return None
    if torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") != torch.bfloat16:
        return None
    return norm, after, dp


def plan_mlp_residual(block: nn.Module, x: Tensor) -> bool:
    """Whether the second half of a :class:`~paca_kernels.nn.block.PaCaBlock` call on x (B, N, C),
    ``x + drop_path2(norm2_after(mlp(norm2_before(x))))``, runs as one ``mlp_fused`` call with the
    LayerNorm as its prologue and the residual add as its epilogue (two PyTorch ops and their
    tensors fewer per block; under autocast also the cast of the LayerNorm's output).

    Needs: the plain pre-norm half (:func:`_pre_norm_half`), the MLP served whole (:func:`plan_mlp`
    gives "whole": CPU inference, the cpu backend...), the norm's parameters wanting no gradient,
    and no hooks on the norm, the Mlp module or what follows it (the fused call bypasses their
    ``__call__``)."""
    half = _pre_norm_half(block, 2)
    if half is None:
        return False
    norm, after, dp = half
    mlp = block._modules["mlp"]
    if not cpu_inference(mlp.backend, x, norm) or has_hooks(norm, mlp, after, dp):
        return False
    return plan_mlp(mlp, x) == "whole"


def plan_attention_residual(block: nn.Module, x: Tensor) -> bool:
    """Whether the first half of a :class:`~paca_kernels.nn.block.PaCaBlock` call on x (B, N, C),
    ``x + drop_path1(norm1_after(attn(norm1_before(x))))``, passes x to the attention as its
    ``residual`` (added by the attention's fused op as it writes its output: one PyTorch add and its
    tensor fewer per block), with ``norm1_before`` run by ``PaCaBlock._norm1_fused``.

    Needs: the plain pre-norm half (:func:`_pre_norm_half`), CPU inference on the cpu backend for x
    and the norm (:func:`cpu_inference`), no hooks on the norm, on what follows the attention, or on
    the attention module itself (its output now includes
    the residual; hooks inside it are its own plan's concern). Whichever path the attention then
    takes adds the residual (the modules' path with a PyTorch add)."""
    half = _pre_norm_half(block, 1)
    if half is None:
        return False
    norm, after, dp = half
    attn = block._modules["attn"]
    if attn._forward_hooks or attn._forward_pre_hooks:
        return False
    return cpu_inference(attn.backend, x, norm) and not has_hooks(norm, after, dp)


#: The attention and MLP classes whose private entry points a block fused by :func:`plan_block` calls
#: directly (``PaCaAttention._given`` and ``_planned``, ``Mlp.forward_residual``): exactly these
#: types (a subclass may compute something else). Filled by the modules that define them
#: (attention.py, block.py), which import this one.
BLOCK_PARTS: set[type] = set()


def plan_block(block: nn.Module, x: Tensor, return_attn: bool) -> AttentionPlan | None:
    """The path for a whole :class:`~paca_kernels.nn.block.PaCaBlock` call on validated x (B, N, C)
    in CPU inference, every condition checked once: the attention's plan (its half then runs as
    ``ops.fused.layer_norm`` and the attention's fused op with x as its residual, the second half as
    one ``mlp_fused`` call: what :func:`plan_attention_residual`, :func:`plan_attention`,
    :func:`plan_mlp_residual` and :func:`plan_mlp` would each decide), or None: the block's parts
    then plan one by one.

    Needs: grad mode off (``torch.no_grad``, ``torch.inference_mode``), x a CPU tensor, no maps
    wanted, no global hooks, no position embedding, both halves the plain pre-norm form
    (:func:`_pre_norm_half`: no layer scale, no autocast but to bf16...), no hook on the block or
    any module in it (one walk, where the part plans walk the same modules several times), the
    attention and the MLP of the :data:`BLOCK_PARTS` classes with no ``forward`` set on the
    attention instance, their backend settings resolving to "cpu", and the MLP served whole.
    The same kernels as the part plans (the same bits), with less Python per block: measured,
    PaCa-ViT-Tiny, B = 1, in-process A/B against the part plans (14 rounds), 1.4 % off the float32
    forward, 2.9 % off bf16, 2.5 % under bf16 autocast."""
    if return_attn or torch.is_grad_enabled() or x.device.type != "cpu":
        return None
    if global_hooks() or block.with_pos_embed:
        return None
    mods = block._modules
    attn, mlp = mods["attn"], mods["mlp"]
    if type(attn) not in BLOCK_PARTS or type(mlp) not in BLOCK_PARTS:
        return None
    d = attn.__dict__
    if "forward" in d or "forward_logits" in d:
        return None
    if _pre_norm_half(block, 1) is None or _pre_norm_half(block, 2) is None or _hooked(block):
        return None
    backend = attn.backend
    if preferred_backend(backend, "cpu") != "cpu" or (
        mlp.backend != backend and preferred_backend(mlp.backend, "cpu") != "cpu"
    ):
        return None
    if plan_mlp(mlp, x, True) != "whole":
        return None
    return plan_attention(attn, x, None, False, True)


def _plain_conv(conv: nn.Module) -> bool:
    """A plain ``nn.Conv2d`` that ``patch_embed`` computes: square kernel, equal strides, the same
    zero padding on every side (an int pair of equal values), no dilation, no groups, no hooks."""
    if type(conv) is not nn.Conv2d:
        return False
    k, s, p, d = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    return (
        k[0] == k[1] and s[0] == s[1] and not isinstance(p, str) and p[0] == p[1] and d == (1, 1)
        and conv.groups == 1 and conv.padding_mode == "zeros"
    )


def plan_downsample(
    module: nn.Module, x: Tensor
) -> tuple[list[nn.Conv2d], LayerNorm2d | None] | None:
    """The path for one call of a :class:`~paca_kernels.nn.downsample.DownsampleV1` on x (B, C, H, W):
    its convs and its norm (None: no norm, an ``nn.Identity``) for ``patch_embed``, or None for its
    modules.

    The fused op needs CPU inference (:func:`cpu_inference`), ``proj`` a plain conv or a Sequential of
    them (:func:`_plain_conv`), ``norm`` a :class:`~paca_kernels.nn.layers.LayerNorm2d` or Identity, no
    hooks on either. Taken at every size: measured faster than the modules in the whole model at
    B = 1 and 8 (:mod:`paca_kernels.ops.fused.patch_embed`).
    """
    if not _embed_op.REGISTERED or x.dim() != 4:
        return None
    mods = module._modules
    proj, norm = mods["proj"], mods["norm"]
    convs = list(proj._modules.values()) if type(proj) is nn.Sequential else [proj]
    if not convs:
        return None
    for conv in convs:
        if not _plain_conv(conv):
            return None
    if type(norm) is nn.Identity:
        ln = None
    elif type(norm) is LayerNorm2d and len(norm.normalized_shape) == 1:
        ln = norm
    else:
        return None
    if not cpu_inference(module.backend, x, module) or has_hooks(proj, norm):
        return None
    return convs, ln


def plan_linear(linear: nn.Module | None, backend: str | None, x: Tensor) -> tuple[Tensor, Tensor | None] | None:
    """(weight, bias) of a plain ``nn.Linear`` for ``ops.fused.linear`` on x (..., K) in CPU
    inference (:func:`cpu_inference`, with ``backend`` the owner's setting), no hook on it; else
    None (the module runs). For PaCaViT's classifier head: the PaCa-ViT-Tiny forward at B = 1,
    in-process A/B against the module (14 rounds), 1.5 % faster in a bf16 model, 3.8 % under bf16
    autocast, the same in float32 (the head alone in-model: 0.33 -> 0.08 ms in bf16, 0.47 -> 0.09
    ms under autocast, 0.17 -> 0.10 ms in float32)."""
    if type(linear) is not nn.Linear or not _linear_op.REGISTERED:
        return None
    if _hooked(linear) or not cpu_inference(backend, x, linear):
        return None
    params = linear._parameters
    return params["weight"], params["bias"]


def plan_layer_norm(norm: nn.Module, backend: str | None, x: Tensor) -> tuple[Tensor | None, Tensor | None, float] | None:
    """(weight, bias, eps) of a plain ``nn.LayerNorm`` over the last dimension for
    ``ops.fused.layer_norm`` on x (..., C) in CPU inference (:func:`cpu_inference`, with ``backend``
    the owner's setting; the output in x's dtype, as autocast's LayerNorm gives it), no hook on it;
    else None (the module runs). For PaCaViT's stage norms: the PaCa-ViT-Tiny forward at B = 1,
    in-process A/B against the modules (14 rounds), 1.8 % faster in bf16, 1.9 % under autocast, the
    same in float32."""
    if type(norm) is not nn.LayerNorm or len(norm.normalized_shape) != 1 or not _ln_op.REGISTERED:
        return None
    if _hooked(norm) or not cpu_inference(backend, x, norm):
        return None
    params = norm._parameters
    return params["weight"], params["bias"], norm.eps
