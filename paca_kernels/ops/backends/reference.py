"""The "reference" backend: the pure-PyTorch oracle (:mod:`paca_kernels.reference`).

Any device and floating dtype; no limits. It is what every other backend is tested against, so its
tolerances only cover itself (the same composition run twice).
"""

from __future__ import annotations

import torch

from ... import reference
from ..dispatch import Backend

__all__ = ["BACKEND"]

BACKEND = Backend(
    name="reference",
    description="pure PyTorch (paca_kernels.reference): the oracle, any device and dtype",
    device_types=("cpu", "cuda", "mps", "xpu", "meta"),
    dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64),
    impls={"cluster_pool": reference.cluster_pool, "p2c_attention": reference.p2c_attention},
    tolerances={torch.float64: (1e-12, 1e-12), torch.float32: (1e-6, 1e-6)},
    grad_tolerances={torch.float64: (1e-12, 1e-12), torch.float32: (1e-6, 1e-6)},
)
