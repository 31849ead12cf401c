"""Input validation shared by the ops: clear ValueError/TypeError messages, metadata only.

Every check reads shapes, dtypes and devices, never values, so it costs nothing on the GPU and traces
cleanly under ``torch.compile``.
"""

from __future__ import annotations

import torch
from torch import Tensor

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_tensor(name: str, t: object, ndim: int, dims: str) -> Tensor:
    """``t`` is a floating tensor of rank ``ndim`` (``dims`` names the axes for the message)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape ({dims}), got {type(t).__name__}")
    if t.dtype not in _FLOATS:
        raise TypeError(
            f"{name} must be a floating tensor (float16, bfloat16, float32 or float64), "
            f"got {_dtype_name(t.dtype)}"
        )
    if t.dim() != ndim:
        raise ValueError(f"{name} must have shape ({dims}), got a {t.dim()}-d tensor {tuple(t.shape)}")
    return t


def check_same(names: list[str], tensors: list[Tensor]) -> None:
    """All tensors share one device and one dtype."""
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        desc = ", ".join(f"{n} on {t.device}" for n, t in zip(names, tensors, strict=True))
        raise ValueError(f"all inputs must be on the same device, got {desc}")
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) > 1:
        desc = ", ".join(f"{n} {_dtype_name(t.dtype)}" for n, t in zip(names, tensors, strict=True))
        raise TypeError(f"all inputs must have the same dtype, got {desc}")


def check_cluster_pool(
    logits: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> None:
    """Validate cluster_pool inputs: logits (B, M, N), x (B, N, C), weight/bias (C,) or None."""
    check_tensor("logits", logits, 3, "B, M, N")
    check_tensor("x", x, 3, "B, N, C")
    b, _, n = logits.shape
    if x.shape[0] != b or x.shape[1] != n:
        raise ValueError(
            f"logits (B, M, N) = {tuple(logits.shape)} and x (B, N, C) = {tuple(x.shape)} "
            f"disagree on B or N"
        )
    if n == 0:
        # softmax over no patches is 0/0 (an all -inf row gives NaN): refused on every backend alike.
        raise ValueError(
            f"logits and x must hold at least one patch (N >= 1): a softmax over no patches is undefined; "
            f"got logits {tuple(logits.shape)} and x {tuple(x.shape)}"
        )
    c = x.shape[2]
    names, tensors = ["logits", "x"], [logits, x]
    for pname, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        check_tensor(pname, p, 1, "C")
        if p.shape[0] != c:
            raise ValueError(f"{pname} must have shape (C,) = ({c},), got {tuple(p.shape)}")
        if p.device != x.device:
            raise ValueError(f"{pname} is on {p.device} but x is on {x.device}")
    check_same(names, tensors)
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")


def check_p2c_attention(q: Tensor, k: Tensor, v: Tensor) -> None:
    """Validate p2c_attention inputs: q (B, N, h, d), k and v (B, M, h, d)."""
    check_tensor("q", q, 4, "B, N, h, d")
    check_tensor("k", k, 4, "B, M, h, d")
    check_tensor("v", v, 4, "B, M, h, d")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape (B, M, h, d), got {tuple(k.shape)} "
                         f"and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(
            f"q (B, N, h, d) = {tuple(q.shape)} and k (B, M, h, d) = {tuple(k.shape)} "
            f"disagree on B, h or d"
        )
    if k.shape[1] == 0:
        raise ValueError("k and v must hold at least one cluster (M >= 1)")
    check_same(["q", "k", "v"], [q, k, v])
