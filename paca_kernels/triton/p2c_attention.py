"""Fused patch-to-cluster attention in Triton: ``out = softmax(q·kᵀ·scale over M)·v`` per head.

Shapes: q (B, N, h, d), k and v (B, M, h, d), out (B, N, h, d), lse (B, h, N) fp32.

With few keys (M <= 256) every key and value of one (batch, head) fits on chip, so a program takes a
tile of BLOCK_N queries and does the whole row softmax in one pass (no online rescaling, no N×M
matrix in global memory). Parallelism comes from the query tiles, which is what small-B·h detection
and segmentation shapes need.

Backward, per query tile (P recomputed from q, k and the saved lse):

    P  = exp(q·kᵀ·scale − lse)          dP = dO·vᵀ          D = rowsum(dO ∘ O)
    dS = P ∘ (dP − D)                   dq = dS·k·scale
    dk = Σ_tiles dSᵀ·q·scale            dv = Σ_tiles Pᵀ·dO

dk and dv are reduced over the query tiles either with fp32 atomics (fast, order not fixed) or, in the
deterministic mode, through a (tiles, B, M, h, d) fp32 buffer of partial sums reduced by torch in a
fixed order.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import interpreted

__all__ = ["p2c_attention_bwd", "p2c_attention_fwd"]


@triton.jit
def _dot(a, b, FP32: tl.constexpr):
    """a·b with fp32 accumulation. FP32: multiply in fp32 ("ieee", no TF32 rounding), used for fp32
    inputs and under the interpreter, whose half-precision dot is wrong."""
    if FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _p2c_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,
    N, M, H, D, scale,
    sq_b, sq_n, sq_h, sq_d,
    sk_b, sk_m, sk_h, sk_d,
    sv_b, sv_m, sv_h, sv_d,
    so_b, so_n, so_h, so_d,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, FP32: tl.constexpr,
):  # fmt: skip
    """One program: BLOCK_N queries of one (batch, head) against all M keys."""
    pid_n = tl.program_id(0).to(tl.int64)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    hd = pid_bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < N
    mask_m = offs_m < M
    mask_d = offs_d < D

    q = tl.load(
        q_ptr + b * sq_b + hd * sq_h + offs_n[:, None] * sq_n + offs_d[None, :] * sq_d,
        mask=mask_n[:, None] & mask_d[None, :], other=0.0,
    )
    k = tl.load(
        k_ptr + b * sk_b + hd * sk_h + offs_m[:, None] * sk_m + offs_d[None, :] * sk_d,
        mask=mask_m[:, None] & mask_d[None, :], other=0.0,
    )
    v = tl.load(
        v_ptr + b * sv_b + hd * sv_h + offs_m[:, None] * sv_m + offs_d[None, :] * sv_d,
        mask=mask_m[:, None] & mask_d[None, :], other=0.0,
    )

    s = _dot(q, tl.trans(k), FP32) * scale  # (BLOCK_N, BLOCK_M) fp32
    # Padded keys get -inf so they take no probability; M >= 1 keeps every row max finite.
    s = tl.where(mask_m[None, :], s, float("-inf"))
    row_max = tl.max(s, axis=1)
    p = tl.exp(s - row_max[:, None])
    row_sum = tl.sum(p, axis=1)
    p = p / row_sum[:, None]
    o = _dot(p.to(v.dtype), v, FP32)  # (BLOCK_N, BLOCK_D) fp32

    tl.store(
        o_ptr + b * so_b + hd * so_h + offs_n[:, None] * so_n + offs_d[None, :] * so_d,
        o.to(o_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_d[None, :],
    )
    # lse is written contiguous (B, h, N) by the launcher.
    tl.store(lse_ptr + pid_bh * N + offs_n, row_max + tl.log(row_sum), mask=mask_n)


@triton.jit
def _p2c_bwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, do_ptr, lse_ptr, dq_ptr, dk_ptr, dv_ptr,
    N, M, H, D, B, scale,
    sq_b, sq_n, sq_h, sq_d,
    sk_b, sk_m, sk_h, sk_d,
    sv_b, sv_m, sv_h, sv_d,
    so_b, so_n, so_h, so_d,
    sdo_b, sdo_n, sdo_h, sdo_d,
    sdq_b, sdq_n, sdq_h, sdq_d,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, FP32: tl.constexpr,
    DETERMINISTIC: tl.constexpr,
):  # fmt: skip
    """One program: dq of BLOCK_N queries of one (batch, head), and their share of dk and dv.

    dk/dv buffers are fp32, contiguous: (B, M, h, d) for atomics, (tiles, B, M, h, d) when
    DETERMINISTIC (this program owns slice [pid_n] and writes it without atomics).
    """
    pid_n = tl.program_id(0).to(tl.int64)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    hd = pid_bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < N
    mask_m = offs_m < M
    mask_d = offs_d < D
    mask_nd = mask_n[:, None] & mask_d[None, :]
    mask_md = mask_m[:, None] & mask_d[None, :]

    q = tl.load(q_ptr + b * sq_b + hd * sq_h + offs_n[:, None] * sq_n + offs_d[None, :] * sq_d,
                mask=mask_nd, other=0.0)
    k = tl.load(k_ptr + b * sk_b + hd * sk_h + offs_m[:, None] * sk_m + offs_d[None, :] * sk_d,
                mask=mask_md, other=0.0)
    v = tl.load(v_ptr + b * sv_b + hd * sv_h + offs_m[:, None] * sv_m + offs_d[None, :] * sv_d,
                mask=mask_md, other=0.0)
    o = tl.load(o_ptr + b * so_b + hd * so_h + offs_n[:, None] * so_n + offs_d[None, :] * so_d,
                mask=mask_nd, other=0.0)
    do = tl.load(do_ptr + b * sdo_b + hd * sdo_h + offs_n[:, None] * sdo_n + offs_d[None, :] * sdo_d,
                 mask=mask_nd, other=0.0)
    lse = tl.load(lse_ptr + pid_bh * N + offs_n, mask=mask_n, other=0.0)

    s = _dot(q, tl.trans(k), FP32) * scale
    # Padded rows and keys must contribute nothing to dk/dv: zero their probabilities.
    valid = mask_n[:, None] & mask_m[None, :]
    p = tl.where(valid, tl.exp(s - lse[:, None]), 0.0)  # (BLOCK_N, BLOCK_M) fp32
    dp = _dot(do, tl.trans(v), FP32)  # (BLOCK_N, BLOCK_M)
    # D = rowsum(dO ∘ O) = rowsum(P ∘ dP): computed from O (d wide) rather than P (M wide).
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
    ds = p * (dp - delta[:, None])

    dq = _dot(ds.to(k.dtype), k, FP32) * scale
    tl.store(dq_ptr + b * sdq_b + hd * sdq_h + offs_n[:, None] * sdq_n + offs_d[None, :] * sdq_d,
             dq.to(dq_ptr.dtype.element_ty), mask=mask_nd)

    dv = _dot(tl.trans(p.to(do.dtype)), do, FP32)  # (BLOCK_M, BLOCK_D)
    dk = _dot(tl.trans(ds.to(q.dtype)), q, FP32) * scale
    # Contiguous (B, M, h, d) fp32 layout of the accumulators.
    acc_off = ((b * M + offs_m[:, None]) * H + hd) * D + offs_d[None, :]
    if DETERMINISTIC:
        acc_off += pid_n * B * M * H * D
        tl.store(dk_ptr + acc_off, dk, mask=mask_md)
        tl.store(dv_ptr + acc_off, dv, mask=mask_md)
    else:
        tl.atomic_add(dk_ptr + acc_off, dk, mask=mask_md)
        tl.atomic_add(dv_ptr + acc_off, dv, mask=mask_md)


def _blocks(n: int, m: int, d: int, backward: bool) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_M, BLOCK_D, num_warps). Every block is a power of two >= 16 (tl.dot's minimum).

    On the GPU the query tile shrinks as the on-chip key/value tiles grow (register budget); under the
    interpreter each program costs ~1 ms, so fewer, larger tiles are faster.
    """
    block_m = max(16, triton.next_power_of_2(m))
    block_d = max(16, triton.next_power_of_2(d))
    if interpreted():
        return min(128, max(16, triton.next_power_of_2(n))), block_m, block_d, 4
    kv = block_m * block_d
    if backward:
        block_n = 64 if kv <= 64 * 64 else 32 if kv <= 128 * 128 else 16
    else:
        block_n = 128 if kv <= 64 * 64 else 64 if kv <= 128 * 128 else 32
    block_n = min(block_n, max(16, triton.next_power_of_2(n)))
    return block_n, block_m, block_d, 8 if kv > 128 * 64 else 4


def _use_fp32_dot(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 or interpreted()


def p2c_attention_fwd(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Launch the forward. Any strides. Returns out (B, N, h, d) in q's dtype and lse (B, h, N) fp32."""
    bsz, n, h, d = q.shape
    m = k.shape[1]
    out = torch.empty((bsz, n, h, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((bsz, h, n), dtype=torch.float32, device=q.device)
    if bsz * n * h == 0 or d == 0:
        # Nothing to launch; with d = 0 every score is 0, so lse = log M.
        return out, lse.fill_(math.log(m))
    block_n, block_m, block_d, warps = _blocks(n, m, d, backward=False)
    grid = (triton.cdiv(n, block_n), bsz * h)
    _p2c_fwd_kernel[grid](
        q, k, v, out, lse,
        n, m, h, d, float(scale),
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_D=block_d, FP32=_use_fp32_dot(q.dtype),
        num_warps=warps,
    )  # fmt: skip
    return out, lse


def p2c_attention_bwd(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    scale: float,
    deterministic: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Launch the backward. Any strides (stride-0 grad_out included); lse contiguous (B, h, N) fp32.

    Returns dq (B, N, h, d), dk and dv (B, M, h, d), in the dtypes of q, k and v.
    """
    bsz, n, h, d = q.shape
    m = k.shape[1]
    lse = lse.contiguous()
    dq = torch.empty((bsz, n, h, d), dtype=q.dtype, device=q.device)
    if bsz * n * h == 0 or d == 0:
        return dq.zero_(), torch.zeros_like(k, memory_format=torch.contiguous_format), \
            torch.zeros_like(v, memory_format=torch.contiguous_format)
    block_n, block_m, block_d, warps = _blocks(n, m, d, backward=True)
    tiles = triton.cdiv(n, block_n)
    if deterministic:
        # Program (tile, b, head) writes its whole (M, d) block of slice [tile]; the grid covers every
        # (tile, b, head), so no element stays unwritten and empty is enough (the NaN-poison test checks).
        dk_acc = torch.empty((tiles, bsz, m, h, d), dtype=torch.float32, device=q.device)
        dv_acc = torch.empty((tiles, bsz, m, h, d), dtype=torch.float32, device=q.device)
    else:
        dk_acc = torch.zeros((bsz, m, h, d), dtype=torch.float32, device=q.device)
        dv_acc = torch.zeros((bsz, m, h, d), dtype=torch.float32, device=q.device)
    _p2c_bwd_kernel[(tiles, bsz * h)](
        q, k, v, out, grad_out, lse, dq, dk_acc, dv_acc,
        n, m, h, d, bsz, float(scale),
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *grad_out.stride(), *dq.stride(),
        BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_D=block_d, FP32=_use_fp32_dot(q.dtype),
        DETERMINISTIC=deterministic, num_warps=warps,
    )  # fmt: skip
    if deterministic:
        # torch's sum over a leading dim of a fixed-shape tensor runs in a fixed order: bitwise reproducible.
        dk_acc, dv_acc = dk_acc.sum(0), dv_acc.sum(0)
    return dq, dk_acc.to(k.dtype), dv_acc.to(v.dtype)
