"""Fused patch-to-cluster attention in Triton: ``out = softmax(q·kᵀ·scale over M)·v`` per head.

Shapes: q (B, N, h, d), k and v (B, M, h, d), out (B, N, h, d), lse (B, h, N) fp32.

With few keys (M <= 256) every key and value of one (batch, head) fits on chip, so a program takes a
tile of BLOCK_N queries and does the whole row softmax in one pass (no online rescaling, no N×M
matrix in global memory). Parallelism comes from the query tiles, which is what small-B·h detection
and segmentation shapes need.

Backward, per query tile, from q, k, v and dO alone (a tile's rows hold all M scores, so the softmax
is recomputed whole, as PyTorch's softmax backward has it; no saved lse, no forward output):

    s  = q·kᵀ·scale                     P = exp(s − rowmax s) / rowsum        dP = dO·vᵀ
    D  = rowsum(P ∘ dP)                 dS = P ∘ (dP − D)                     dq = dS·k·scale
    dk = Σ_tiles dSᵀ·q·scale            dv = Σ_tiles Pᵀ·dO

(exp(s − lse) with an fp32 lse put ~|s|·2⁻²⁴ relative error into P, and D = rowsum(dO ∘ O) from the
rounded output did not cancel dP in saturated rows: noise proportional to the scores' scale in dq/dk.)

dk and dv are reduced over the query tiles either with relaxed fp32 atomics whose result is unused (a
reduction: fast, order not fixed) or, in the
deterministic mode, through a (tiles, B, M, h, d) fp32 buffer of partial sums reduced by torch in a
fixed order. Tiles, warps and the (1-D) grid come from :mod:`.plan`.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import plan
from ._launch import device_guard, device_of

__all__ = ["p2c_attention_bwd", "p2c_attention_fwd"]


@triton.jit
def _dot(a, b, DOT: tl.constexpr):
    """a·b with fp32 accumulation. DOT "native": the operands' own precision (fp16/bf16 on the GPU);
    "ieee": fp32 products, no TF32 rounding (fp32 inputs); "emulate" (fp16/bf16 under the interpreter,
    whose half-precision dot is wrong): fp32 products of the half-precision operands, which is what the
    GPU computes: the kernels round P and dS to the inputs' dtype before their products either way."""
    if DOT == "native":
        return tl.dot(a, b)
    else:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")


@triton.jit
def _p2c_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,
    N, M, H, D, tiles, scale,
    sq_b, sq_n, sq_h, sq_d,
    sk_b, sk_m, sk_h, sk_d,
    sv_b, sv_m, sv_h, sv_d,
    so_b, so_n, so_h, so_d,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, DOT: tl.constexpr,
):  # fmt: skip
    """One program: BLOCK_N queries of one (batch, head) against all M keys. 1-D grid of
    tiles · B·h programs: program id = (b·h + head) · tiles + query tile."""
    pid = tl.program_id(0).to(tl.int64)
    pid_n = pid % tiles
    pid_bh = pid // tiles
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

    s = _dot(q, tl.trans(k), DOT) * scale  # (BLOCK_N, BLOCK_M) fp32
    # Padded keys get -inf so they take no probability; M >= 1 keeps every row max finite.
    s = tl.where(mask_m[None, :], s, float("-inf"))
    row_max = tl.max(s, axis=1)
    p = tl.exp(s - row_max[:, None])
    row_sum = tl.sum(p, axis=1)
    p = p / row_sum[:, None]
    o = _dot(p.to(v.dtype), v, DOT)  # (BLOCK_N, BLOCK_D) fp32

    tl.store(
        o_ptr + b * so_b + hd * so_h + offs_n[:, None] * so_n + offs_d[None, :] * so_d,
        o.to(o_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_d[None, :],
    )
    # lse is written contiguous (B, h, N) by the launcher.
    tl.store(lse_ptr + pid_bh * N + offs_n, row_max + tl.log(row_sum), mask=mask_n)


@triton.jit(do_not_specialize=["deterministic"])
def _p2c_bwd_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, dq_ptr, dk_ptr, dv_ptr,
    N, M, H, D, B, tiles, scale,
    sq_b, sq_n, sq_h, sq_d,
    sk_b, sk_m, sk_h, sk_d,
    sv_b, sv_m, sv_h, sv_d,
    sdo_b, sdo_n, sdo_h, sdo_d,
    sdq_b, sdq_n, sdq_h, sdq_d,
    deterministic,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, DOT: tl.constexpr,
):  # fmt: skip
    """One program: dq of BLOCK_N queries of one (batch, head), and their share of dk and dv.
    1-D grid as the forward's.

    dk/dv buffers are fp32, contiguous: (B, M, h, BLOCK_D) for atomics, (tiles, B, M, h, BLOCK_D) when
    ``deterministic`` (a runtime flag; this program owns slice [pid_n] and writes it without atomics).
    """
    pid = tl.program_id(0).to(tl.int64)
    pid_n = pid % tiles
    pid_bh = pid // tiles
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
    do = tl.load(do_ptr + b * sdo_b + hd * sdo_h + offs_n[:, None] * sdo_n + offs_d[None, :] * sdo_d,
                 mask=mask_nd, other=0.0)

    # The row softmax exactly as the forward computes it, from this program's own scores: s − max is
    # exact, so P carries only the rounding of s (not that of an fp32 lse at |s| ~ 1e4).
    s = _dot(q, tl.trans(k), DOT) * scale
    s = tl.where(mask_m[None, :], s, float("-inf"))  # padded keys: probability 0
    e = tl.exp(s - tl.max(s, axis=1)[:, None])
    # Padded rows (q = 0 there, so finite scores) must contribute nothing to dk/dv: P = 0.
    p = tl.where(mask_n[:, None], e / tl.sum(e, axis=1)[:, None], 0.0)  # (BLOCK_N, BLOCK_M) fp32
    dp = _dot(do, tl.trans(v), DOT)  # (BLOCK_N, BLOCK_M)
    # D = rowsum(P ∘ dP) from the same P and dP that dS combines, not rowsum(dO ∘ O) from the stored
    # (rounded) output: a one-hot row of P then gives dS = 0 exactly, as in PyTorch.
    delta = tl.sum(p * dp, axis=1)
    ds = p * (dp - delta[:, None])

    dq = _dot(ds.to(k.dtype), k, DOT) * scale
    tl.store(dq_ptr + b * sdq_b + hd * sdq_h + offs_n[:, None] * sdq_n + offs_d[None, :] * sdq_d,
             dq.to(dq_ptr.dtype.element_ty), mask=mask_nd)

    dv = _dot(tl.trans(p.to(do.dtype)), do, DOT)  # (BLOCK_M, BLOCK_D)
    dk = _dot(tl.trans(ds.to(q.dtype)), q, DOT) * scale
    # Contiguous (B, M, h, d) fp32 layout of the accumulators.
    # The accumulators' last dim is padded to BLOCK_D (a constant): rows are contiguous and unmasked
    # along d, so the stores and reductions vectorise whatever D is (with a per-element address and mask
    # they spilled registers at 128×128 and 256×64 tiles). Padded columns receive zeros.
    acc_off = ((b * M + offs_m[:, None]) * H + hd) * BLOCK_D + offs_d[None, :]
    mask_acc = mask_m[:, None] & (offs_d[None, :] < BLOCK_D)
    if deterministic != 0:
        acc_off += pid_n * B * M * H * BLOCK_D
        tl.store(dk_ptr + acc_off, dk, mask=mask_acc)
        tl.store(dv_ptr + acc_off, dv, mask=mask_acc)
    else:
        # A reduction: relaxed order, result unused (no acq_rel fences, no value returned).
        tl.atomic_add(dk_ptr + acc_off, dk, mask=mask_acc, sem="relaxed")
        tl.atomic_add(dv_ptr + acc_off, dv, mask=mask_acc, sem="relaxed")


def p2c_attention_fwd(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Launch the forward on q's device. Any strides. Returns out (B, N, h, d) in q's dtype and lse (B, h, N) fp32."""
    bsz, n, h, d = q.shape
    m = k.shape[1]
    out = torch.empty((bsz, n, h, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((bsz, h, n), dtype=torch.float32, device=q.device)
    if bsz * n * h == 0 or d == 0:
        # Nothing to launch; with d = 0 every score is 0, so lse = log M.
        return out, lse.fill_(math.log(m))
    launch = plan.p2c_fwd_plan(bsz, n, m, h, d, plan.dtype_name(q.dtype), device_of(q))
    launch.check_grid()
    with device_guard(q.device):
        _p2c_fwd_kernel[launch.grid](
            q, k, v, out, lse,
            n, m, h, d, launch.get("tiles"), float(scale),
            *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            **launch.consts, num_warps=launch.num_warps, num_stages=launch.num_stages,
        )  # fmt: skip
    return out, lse


def p2c_attention_bwd(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float,
    deterministic: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Launch the backward on q's device. Any strides (stride-0 grad_out included).

    Returns dq (B, N, h, d), dk and dv (B, M, h, d), in the dtypes of q, k and v.
    """
    bsz, n, h, d = q.shape
    m = k.shape[1]
    dq = torch.empty((bsz, n, h, d), dtype=q.dtype, device=q.device)
    if bsz * n * h == 0 or d == 0:
        return dq.zero_(), torch.zeros_like(k, memory_format=torch.contiguous_format), \
            torch.zeros_like(v, memory_format=torch.contiguous_format)
    launch = plan.p2c_bwd_plan(bsz, n, m, h, d, plan.dtype_name(q.dtype), device_of(q))
    launch.check_grid()
    tiles = launch.get("tiles")
    block_d = launch.consts["BLOCK_D"]
    if deterministic:
        # Program (tile, b, head) writes its whole (M, d) block of slice [tile]; the grid covers every
        # (tile, b, head), so no element stays unwritten and empty is enough (the NaN-poison test checks).
        dk_acc = torch.empty((tiles, bsz, m, h, block_d), dtype=torch.float32, device=q.device)
        dv_acc = torch.empty((tiles, bsz, m, h, block_d), dtype=torch.float32, device=q.device)
    else:
        dk_acc = torch.zeros((bsz, m, h, block_d), dtype=torch.float32, device=q.device)
        dv_acc = torch.zeros((bsz, m, h, block_d), dtype=torch.float32, device=q.device)
    with device_guard(q.device):
        _p2c_bwd_kernel[launch.grid](
            q, k, v, grad_out, dq, dk_acc, dv_acc,
            n, m, h, d, bsz, tiles, float(scale),
            *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dq.stride(),
            int(deterministic),
            **launch.consts, num_warps=launch.num_warps, num_stages=launch.num_stages,
        )  # fmt: skip
    if deterministic:
        # torch's sum over a leading dim of a fixed-shape tensor runs in a fixed order: bitwise reproducible.
        dk_acc, dv_acc = dk_acc.sum(0), dv_acc.sum(0)
    return dq, dk_acc[..., :d].to(k.dtype).contiguous(), dv_acc[..., :d].to(v.dtype).contiguous()
