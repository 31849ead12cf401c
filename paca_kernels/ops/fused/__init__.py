"""Inference-only fusions of the PaCa layers on the cpu backend (C++ kernels in csrc/cpu/fused).

One file per op, named as the op (``torch.ops.paca_kernels.<op>``):

- :mod:`.conv_cluster_logits`: the conv clustering head (depthwise k×k, GELU, 1×1, GELU, 1×1).
- :mod:`.p2c_attention_proj`: q/k/v projections, patch-to-cluster attention and the output projection.
- :mod:`.conv_paca_layer`: a whole PaCa layer (the two above with the pooling in between).
- :mod:`.mlp_dwconv`: the MLP's bias + depthwise conv + shortcut + GELU.
- :mod:`.mlp_fused`: the whole MLP (fc1, depthwise conv, GELU, fc2).
- :mod:`.patch_embed`: a stem or stage transition (strided conv, LayerNorm over channels).
- :mod:`.layer_norm`: LayerNorm over the last dimension (a block's norm1; under autocast into bf16).
- :mod:`.linear`: a linear layer on packed weights (PaCaViT's classifier head).
- :mod:`.cached_linear`: a differentiable linear layer writing into the CPU output cache (the MLP's fc1
  and fc2 in training on the cpu backend).

Each registers its fake kernel (``torch.compile`` traces it), a FLOP formula that counts like the ops
it replaces (``FlopCounterMode`` totals do not change); their autograd kernel, which gives outputs
whose backward raises, is one C++ function (csrc/registration.cpp, ``inference_only_autograd``), except
for ``mlp_dwconv``, which has a backward kernel (``mlp_dwconv_bwd``, float32/float64), and
``cached_linear``, whose backward is ATen's products: the MLP and, through
:func:`.conv_cluster_logits.conv_cluster_logits_train`, the conv head train through it on the cpu
backend. They take tensors and numbers only; which layer may use them, and when, is decided by the
layers (:mod:`paca_kernels.nn`, :mod:`paca_kernels.nn._fusion`), which run their modules wherever a
fused op would compute something else.
``REGISTERED`` in each module says whether the extension provides the op.

dtypes: float32, float64, bfloat16 and float16 activations, with parameters in that dtype or float32.
With bfloat16 activations the matrix products are bf16 products with float32 sums (AVX512-BF16
``vdpbf16ps`` on packed bf16 weights where the CPU has it), as the bf16 modules compute them, and
the rest (depthwise conv, GELU, softmax, LayerNorm) runs in float32. Under ``torch.autocast`` the
public functions here pass the activations in the autocast dtype
(:func:`._common.autocast_input`), so an fp32 model under CPU autocast runs them in bf16.
"""

from __future__ import annotations
