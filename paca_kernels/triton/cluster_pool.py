"""Fused cluster pooling in Triton: ``Z = LayerNorm(softmax(logits over N)·x)``.

Shapes: logits (B, M, N), x (B, N, C), weight/bias (C,) or None; out (B, M, C) in x's dtype,
pooled (B, M, C) fp32 (softmax·x before the LayerNorm) and lse (B, M) fp32, kept for the backward.

Forward: a program owns BLOCK_M clusters of one batch element and the whole (padded) C, and streams
over N in BLOCK_K tiles with an online softmax (running max m, running sum l, rescaled accumulator):

    m' = max(m, rowmax(t))    α = exp(m − m')    p = exp(t − m')
    l' = α·l + rowsum(p)      acc' = α·acc + p·x_tile

then pooled = acc / l, lse = m + log l, and the LayerNorm runs in the epilogue. When B·⌈M/BLOCK_M⌉ is
too small to fill the GPU, N is split across programs (flash-decoding style): each writes its partial
(m, l, acc) and a few torch ops merge them with the same rescaling, then apply the LayerNorm.

Backward (one streaming pass over N): the LayerNorm backward runs in torch on the small (B, M, C)
tensors and gives dP; then per N tile, looping over cluster blocks, with S = exp(logits − lse):

    dS = dP·xᵀ        dlogits = S ∘ (dS − rowdot),  rowdot = Σ_c dP ∘ pooled = rowsum(S ∘ dS)
    dx = Σ_m Sᵀ·dP
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from . import interpreted

__all__ = ["cluster_pool_bwd", "cluster_pool_fwd"]


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """a·b on fp32 operands: "ieee" for fp32 inputs (and the interpreter), TF32 for fp16/bf16 inputs.

    The probabilities and dP stay fp32 instead of being rounded to the input's half precision: both
    kernels are bound by memory traffic, and with bf16-rounded operands the saved pooled tokens were
    off enough to triple the dlogits/dx error (the backward subtracts rowdot = Σ_c dP·pooled)."""
    if IEEE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="tf32")


@triton.jit
def _cluster_pool_fwd_kernel(
    logits_ptr, x_ptr, w_ptr, b_ptr, out_ptr, pooled_ptr, lse_ptr,
    part_m_ptr, part_l_ptr, part_acc_ptr,
    M, N, C, chunk, eps,
    sl_b, sl_m, sl_n,
    sx_b, sx_n, sx_c,
    s_w, s_b,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, FP32: tl.constexpr,
):  # fmt: skip
    """One program: BLOCK_M clusters of batch element b over patches [split·chunk, (split+1)·chunk).

    Outputs are contiguous. SPLIT=False: out (B, M, C), pooled (B, M, C), lse (B, M).
    SPLIT=True: partials part_m, part_l (B, S, M) and part_acc (B, S, M, C), S = number of splits.
    """
    pid_m = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.arange(0, BLOCK_C)
    mask_m = offs_m < M
    mask_c = offs_c < C

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    # Loop bounds in int32 (N < 2^31); the offsets are widened to int64 before meeting the strides.
    n_lo = tl.program_id(2) * chunk
    n_hi = tl.minimum(n_lo + chunk, N)
    for start in range(n_lo, n_hi, BLOCK_K):
        offs_n = tl.arange(0, BLOCK_K).to(tl.int64) + start
        mask_n = offs_n < n_hi
        t = tl.load(
            logits_ptr + b * sl_b + offs_m[:, None] * sl_m + offs_n[None, :] * sl_n,
            mask=mask_m[:, None] & mask_n[None, :], other=float("-inf"),
        ).to(tl.float32)
        xt = tl.load(
            x_ptr + b * sx_b + offs_n[:, None] * sx_n + offs_c[None, :] * sx_c,
            mask=mask_n[:, None] & mask_c[None, :], other=0.0,
        )
        m_new = tl.maximum(m_i, tl.max(t, axis=1))
        # A row that has seen only -inf so far (padding, or a cluster masked to -inf on these patches)
        # would give exp(-inf − (-inf)) = NaN: shift by 0 instead, so p and α are exactly 0.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(t - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p, xt, FP32)
        m_i = m_new

    if SPLIT:
        n_splits = tl.num_programs(2)
        row = (b * n_splits + split) * M + offs_m
        tl.store(part_m_ptr + row, m_i, mask=mask_m)
        tl.store(part_l_ptr + row, l_i, mask=mask_m)
        tl.store(part_acc_ptr + row[:, None] * C + offs_c[None, :], acc,
                 mask=mask_m[:, None] & mask_c[None, :])
    else:
        # Padded rows (l = 0) divide by 1 instead: no NaN/inf is produced where nothing is stored.
        l_i = tl.where(mask_m, l_i, 1.0)
        pooled = acc / l_i[:, None]
        row = b * M + offs_m
        mask_mc = mask_m[:, None] & mask_c[None, :]
        tl.store(pooled_ptr + row[:, None] * C + offs_c[None, :], pooled, mask=mask_mc)
        tl.store(lse_ptr + row, m_i + tl.log(l_i), mask=mask_m)
        # LayerNorm over the C valid channels (padding excluded from both moments).
        mean = tl.sum(tl.where(mask_c[None, :], pooled, 0.0), axis=1) / C
        diff = tl.where(mask_c[None, :], pooled - mean[:, None], 0.0)
        var = tl.sum(diff * diff, axis=1) / C
        y = diff * (1.0 / tl.sqrt(var + eps))[:, None]
        if HAS_W:
            y = y * tl.load(w_ptr + offs_c * s_w, mask=mask_c, other=0.0).to(tl.float32)[None, :]
        if HAS_B:
            y = y + tl.load(b_ptr + offs_c * s_b, mask=mask_c, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + row[:, None] * C + offs_c[None, :], y.to(out_ptr.dtype.element_ty), mask=mask_mc)


@triton.jit
def _cluster_pool_bwd_kernel(
    logits_ptr, x_ptr, lse_ptr, dp_ptr, rowdot_ptr, dlogits_ptr, dx_ptr,
    M, N, C,
    sl_b, sl_m, sl_n,
    sx_b, sx_n, sx_c,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, FP32: tl.constexpr,
):  # fmt: skip
    """One program: BLOCK_K patches of batch element b, all clusters (loop over cluster blocks).

    lse, rowdot (B, M) and dP (B, M, C) are fp32 contiguous; dlogits (B, M, N) and dx (B, N, C) are
    written contiguous. Each program owns its dlogits columns and dx rows: no atomics.
    """
    pid_n = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_c = tl.arange(0, BLOCK_C)
    mask_n = offs_n < N
    mask_c = offs_c < C
    mask_nc = mask_n[:, None] & mask_c[None, :]
    xt = tl.load(x_ptr + b * sx_b + offs_n[:, None] * sx_n + offs_c[None, :] * sx_c, mask=mask_nc, other=0.0)
    dx = tl.zeros((BLOCK_K, BLOCK_C), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        mask_mn = mask_m[:, None] & mask_n[None, :]
        row = b * M + offs_m
        t = tl.load(logits_ptr + b * sl_b + offs_m[:, None] * sl_m + offs_n[None, :] * sl_n,
                    mask=mask_mn, other=float("-inf")).to(tl.float32)
        lse = tl.load(lse_ptr + row, mask=mask_m, other=0.0)
        rowdot = tl.load(rowdot_ptr + row, mask=mask_m, other=0.0)
        dp = tl.load(dp_ptr + row[:, None] * C + offs_c[None, :], mask=mask_m[:, None] & mask_c[None, :],
                     other=0.0)
        s = tl.where(mask_mn, tl.exp(t - lse[:, None]), 0.0)  # (BLOCK_M, BLOCK_K)
        ds = _dot(dp, tl.trans(xt), FP32)  # (BLOCK_M, BLOCK_K)
        dl = s * (ds - rowdot[:, None])
        tl.store(dlogits_ptr + row[:, None] * N + offs_n[None, :], dl.to(dlogits_ptr.dtype.element_ty),
                 mask=mask_mn)
        dx += _dot(tl.trans(s), dp, FP32)
    tl.store(dx_ptr + (b * N + offs_n[:, None]) * C + offs_c[None, :], dx.to(dx_ptr.dtype.element_ty),
             mask=mask_nc)


def _use_fp32_dot(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 or interpreted()


def _fwd_blocks(m: int, n: int, c: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_K, BLOCK_C, num_warps); powers of two >= 16 (tl.dot's minimum)."""
    block_c = max(16, triton.next_power_of_2(c))
    if interpreted():
        return min(64, max(16, triton.next_power_of_2(m))), min(128, max(16, triton.next_power_of_2(n))), \
            block_c, 4
    # The fp32 accumulator BLOCK_M × BLOCK_C stays in registers: fewer clusters per program as C grows.
    block_m = 64 if block_c <= 64 else 32 if block_c <= 256 else 16
    block_m = min(block_m, max(16, triton.next_power_of_2(m)))
    block_k = 64 if block_c <= 256 else 32
    return block_m, block_k, block_c, 8 if block_c >= 256 else 4


def _num_splits(programs: int, n: int, block_k: int, device: torch.device) -> int:
    """How many programs share one cluster block's N range, to give small batches enough programs."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    if programs >= sms:
        return 1
    # Aim at ~2 waves of programs, but keep >= 4 tiles of N per split so the merge stays cheap.
    return max(1, min(triton.cdiv(2 * sms, programs), triton.cdiv(n, 4 * block_k)))


def cluster_pool_fwd(
    logits: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    num_splits: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Launch the forward; any strides. ``num_splits`` forces the split-N path (None: heuristic).

    Returns out (B, M, C) in x's dtype, pooled (B, M, C) fp32 and lse (B, M) fp32.
    """
    bsz, m, n = logits.shape
    c = x.shape[2]
    dev = x.device
    out = torch.empty((bsz, m, c), dtype=x.dtype, device=dev)
    pooled = torch.empty((bsz, m, c), dtype=torch.float32, device=dev)
    lse = torch.empty((bsz, m), dtype=torch.float32, device=dev)
    if bsz * m * c == 0 or n == 0:
        # Nothing to launch. With zero patches the (empty) softmax pools to zeros, as in the reference's
        # matmul, and logsumexp of nothing is -inf.
        pooled.zero_()
        lse.fill_(float("-inf"))
        w32 = weight.float() if weight is not None else None
        b32 = bias.float() if bias is not None else None
        out.copy_(F.layer_norm(pooled, (c,), w32, b32, eps))
        return out, pooled, lse
    block_m, block_k, block_c, warps = _fwd_blocks(m, n, c)
    m_blocks = triton.cdiv(m, block_m)
    splits = num_splits if num_splits is not None else _num_splits(bsz * m_blocks, n, block_k, dev)
    splits = max(1, min(splits, triton.cdiv(n, block_k)))
    chunk = triton.cdiv(triton.cdiv(n, splits), block_k) * block_k  # a whole number of N tiles per split
    splits = triton.cdiv(n, chunk)
    if splits > 1:
        part_m = torch.empty((bsz, splits, m), dtype=torch.float32, device=dev)
        part_l = torch.empty((bsz, splits, m), dtype=torch.float32, device=dev)
        part_acc = torch.empty((bsz, splits, m, c), dtype=torch.float32, device=dev)
    else:
        part_m = part_l = part_acc = lse  # unused placeholders (SPLIT=False never touches them)
    w = weight if weight is not None else x
    bb = bias if bias is not None else x
    _cluster_pool_fwd_kernel[(m_blocks, bsz, splits)](
        logits, x, w, bb, out, pooled, lse, part_m, part_l, part_acc,
        m, n, c, chunk, float(eps),
        *logits.stride(), *x.stride(),
        weight.stride(0) if weight is not None else 0, bias.stride(0) if bias is not None else 0,
        HAS_W=weight is not None, HAS_B=bias is not None, SPLIT=splits > 1,
        BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_C=block_c, FP32=_use_fp32_dot(x.dtype), num_warps=warps,
    )  # fmt: skip
    if splits == 1:
        return out, pooled, lse
    # Merge the partial softmaxes (same rescaling as the online update): a split that saw only -inf
    # logits has m = -inf and l = 0, and its weight must be 0, not exp(-inf − (-inf)) = NaN.
    m_max = part_m.amax(1, keepdim=True)  # (B, 1, M)
    m_safe = torch.where(torch.isinf(m_max) & (m_max < 0), torch.zeros_like(m_max), m_max)
    scale = torch.exp(part_m - m_safe)  # (B, S, M)
    l_tot = (scale * part_l).sum(1)  # (B, M)
    acc = (scale.unsqueeze(-1) * part_acc).sum(1)  # (B, M, C)
    pooled = acc / l_tot.unsqueeze(-1)
    lse = m_max.squeeze(1) + torch.log(l_tot)
    w32 = weight.float() if weight is not None else None
    b32 = bias.float() if bias is not None else None
    out = F.layer_norm(pooled, (c,), w32, b32, eps).to(x.dtype)
    return out, pooled, lse


def cluster_pool_bwd(
    grad_out: Tensor,
    logits: Tensor,
    x: Tensor,
    weight: Tensor | None,
    pooled: Tensor,
    lse: Tensor,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Launch the backward; any strides (a stride-0 grad_out included).

    Returns dlogits (B, M, N) in logits' dtype, dx (B, N, C) in x's dtype, dweight and dbias (C,) in
    the dtype of weight (x's dtype when there is no weight).
    """
    bsz, m, n = logits.shape
    c = x.shape[2]
    dev = x.device
    # LayerNorm backward on the small (B, M, C) tensors, in fp32:
    #   dP = rstd · (g − mean_c g − x̂ · mean_c(g ∘ x̂)),  g = grad_out ∘ weight
    pooled = pooled.float()
    g_out = grad_out.float()
    mean = pooled.mean(-1, keepdim=True)
    rstd = torch.rsqrt(pooled.var(-1, unbiased=False, keepdim=True) + eps)
    xhat = (pooled - mean) * rstd
    pdtype = weight.dtype if weight is not None else x.dtype
    dweight = (g_out * xhat).sum((0, 1)).to(pdtype)
    dbias = g_out.sum((0, 1)).to(pdtype)
    g = g_out * weight.float() if weight is not None else g_out
    dp = (rstd * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))).contiguous()
    rowdot = (dp * pooled).sum(-1).contiguous()  # (B, M) = rowsum(S ∘ dS)
    lse = lse.float().contiguous()

    dlogits = torch.empty((bsz, m, n), dtype=logits.dtype, device=dev)
    dx = torch.empty((bsz, n, c), dtype=x.dtype, device=dev)
    if bsz * n * c == 0 or m == 0:
        return dlogits.zero_(), dx.zero_(), dweight, dbias
    block_c = max(16, triton.next_power_of_2(c))
    if interpreted():
        block_m, block_k = min(64, max(16, triton.next_power_of_2(m))), min(128, max(16, triton.next_power_of_2(n)))
    else:
        block_m = min(32 if block_c <= 256 else 16, max(16, triton.next_power_of_2(m)))
        block_k = 64 if block_c <= 128 else 32
    warps = 8 if block_c >= 256 else 4
    _cluster_pool_bwd_kernel[(triton.cdiv(n, block_k), bsz)](
        logits, x, lse, dp, rowdot, dlogits, dx,
        m, n, c,
        *logits.stride(), *x.stride(),
        BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_C=block_c, FP32=_use_fp32_dot(x.dtype), num_warps=warps,
    )  # fmt: skip
    return dlogits, dx, dweight, dbias
