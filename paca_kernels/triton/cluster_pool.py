"""Fused cluster pooling in Triton: ``Z = LayerNorm(softmax(logits over N)·x)``.

Shapes: logits (B, M, N), x (B, N, C), weight/bias (C,) or None; out (B, M, C) in x's dtype,
pooled (B, M, C) fp32 (softmax·x before the LayerNorm) and stats (B, M, 2) fp32 (the row max m and the
row sum l = Σ exp(logits − m)), kept for the backward.

Forward: a program owns BLOCK_M clusters of one batch element and the whole (padded) C, and streams
over N in BLOCK_K tiles with an online softmax (running max m, running sum l, rescaled accumulator):

    m' = max(m, rowmax(t))    α = exp(m − m')    p = exp(t − m')
    l' = α·l + rowsum(p)      acc' = α·acc + p·x_tile

then pooled = acc / l, stats = (m, l), and the LayerNorm runs in the epilogue. When B·⌈M/BLOCK_M⌉ is
too small to fill the GPU, N is split across programs (flash-decoding style): each writes its partial
(m, l, acc) and one merge kernel rescales them the same way, then applies the LayerNorm. Tiles, warps,
splits and the (1-D) grid come from :mod:`.plan`, the code the resource gate compiles for sm_90.

Backward (one streaming pass over N): the LayerNorm backward runs in torch on the small (B, M, C)
tensors and gives dP; then per N tile, looping over cluster blocks, with S = exp(logits − m) / l (exact
logits − m: a rounded lse = m + log l of 1e4 would put 2e-4 relative error into S):

    dS = dP·xᵀ        dlogits = S ∘ (dS − rowdot),  rowdot = Σ_c dP ∘ pooled = rowsum(S ∘ dS)
    dx = Σ_m Sᵀ·dP
"""

from __future__ import annotations

import ctypes

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..reference import layer_norm_stats
from . import plan
from ._launch import device_guard, device_of

__all__ = ["cluster_pool_bwd", "cluster_pool_fwd"]


@triton.jit
def _round_tf32(a):
    """a (fp32) rounded to TF32 (10 explicit mantissa bits, to nearest, ties away from zero, as
    cvt.rna.tf32.f32): what the GPU's TF32 tensor cores see. ±inf stays ±inf (bit 12 is masked off)."""
    bits = a.to(tl.uint32, bitcast=True)
    return ((bits + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def _dot(a, b, DOT: tl.constexpr):
    """a·b with fp32 accumulation, on fp32 operands. DOT: "ieee" for fp32 inputs, "tf32" for fp16/bf16
    inputs on the GPU, "emulate" for fp16/bf16 under the interpreter (operands rounded to TF32, then
    fp32 products: the GPU's arithmetic up to the order of the sums).

    The probabilities and dP stay fp32 instead of being rounded to the input's half precision: both
    kernels are bound by memory traffic, and with bf16-rounded operands the saved pooled tokens were
    off enough to triple the dlogits/dx error (the backward subtracts rowdot = Σ_c dP·pooled)."""
    if DOT == "tf32":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="tf32")
    elif DOT == "emulate":
        return tl.dot(_round_tf32(a.to(tl.float32)), _round_tf32(b.to(tl.float32)), input_precision="ieee")
    else:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")


@triton.jit
def _layer_norm_scale(amax, eps):
    """The power of two each pooled row is divided by before its LayerNorm statistics, so that the squares
    neither overflow (a row of 1e20) nor underflow (1e-20): the rule of paca_kernels.reference.layer_norm_stats
    and csrc/cpu/math/layernorm.h. amax (R,) is the rows' largest magnitude: scale = 2^floor(log2 amax) (its
    exponent bits), clamped to [max(2^floor(log2 sqrt(eps))·2⁻⁴⁰, 2⁻⁹⁵), 2¹⁰⁰]; 1 for a zero, inf or NaN row."""
    pow2 = (amax.to(tl.uint32, bitcast=True) & 0x7F800000).to(tl.float32, bitcast=True)
    root = tl.zeros_like(amax) + tl.sqrt(eps)
    lo = (root.to(tl.uint32, bitcast=True) & 0x7F800000).to(tl.float32, bitcast=True) * 9.094947017729282e-13  # 2^-40
    lo = tl.maximum(lo, 2.524354896707238e-29)  # 2^-95
    scale = tl.minimum(tl.maximum(pow2, lo), 1.2676506002282294e30)  # 2^100
    return tl.where((amax > 0) & (amax <= 3.4028234663852886e38), scale, 1.0)


@triton.jit
def _layer_norm_store(pooled, row_max, row_sum, rows, mask_r, offs_c, mask_c, C, eps, w_ptr, b_ptr, s_w, s_b,
                      has_w, has_b, out_ptr, pooled_ptr, stats_ptr):  # fmt: skip
    """Store pooled (R, BLOCK_C) fp32, stats (R, 2) = (row_max, row_sum) and LayerNorm(pooled) over the C
    valid channels."""
    mask_rc = mask_r[:, None] & mask_c[None, :]
    tl.store(pooled_ptr + rows[:, None] * C + offs_c[None, :], pooled, mask=mask_rc)
    tl.store(stats_ptr + 2 * rows, row_max, mask=mask_r)
    tl.store(stats_ptr + 2 * rows + 1, row_sum, mask=mask_r)
    # Statistics of the row divided by a power of two (exact) near its largest magnitude: no overflow of
    # the squares at 1e20, no underflow at 1e-20 (_layer_norm_scale); eps is scaled alike.
    q = tl.where(mask_c[None, :], pooled, 0.0)
    inv = 1.0 / _layer_norm_scale(tl.max(tl.abs(q), axis=1), eps)
    q = q * inv[:, None]
    mean = tl.sum(q, axis=1) / C
    diff = tl.where(mask_c[None, :], q - mean[:, None], 0.0)
    var = tl.sum(diff * diff, axis=1) / C
    eps_q = tl.maximum(eps * inv * inv, 1.1754943508222875e-38)  # floored: see _layer_norm_scale's rule
    y = diff * (1.0 / tl.sqrt(var + eps_q))[:, None]
    if has_w != 0:
        y = y * tl.load(w_ptr + offs_c * s_w, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    if has_b != 0:
        y = y + tl.load(b_ptr + offs_c * s_b, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * C + offs_c[None, :], y.to(out_ptr.dtype.element_ty), mask=mask_rc)


# The flags (weight, bias and their strides, number of splits) are runtime arguments, never specialised: one compiled
# kernel serves them all (fewer variants to compile and to budget, see triton/plan.py).
@triton.jit(do_not_specialize=["n_splits", "s_w", "s_b", "has_w", "has_b"])
def _cluster_pool_fwd_kernel(
    logits_ptr, x_ptr, w_ptr, b_ptr, out_ptr, pooled_ptr, stats_ptr,
    part_m_ptr, part_l_ptr, part_acc_ptr,
    M, N, C, chunk, n_splits, m_blocks, eps,
    sl_b, sl_m, sl_n,
    sx_b, sx_n, sx_c,
    s_w, s_b, has_w, has_b,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, DOT: tl.constexpr,
):  # fmt: skip
    """One program: BLOCK_M clusters of batch element b over patches [split·chunk, (split+1)·chunk).

    The 1-D grid is (m_blocks · n_splits · B): program id = (b · n_splits + split) · m_blocks + m block.
    Outputs are contiguous. n_splits = 1: out (B, M, C), pooled (B, M, C), stats (B, M, 2).
    n_splits > 1: partials part_m, part_l (B, S, M) and part_acc (B, S, M, C), merged by the merge kernel.
    """
    pid = tl.program_id(0).to(tl.int64)
    pid_m = pid % m_blocks
    split = (pid // m_blocks) % n_splits
    b = pid // m_blocks // n_splits
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.arange(0, BLOCK_C)
    mask_m = offs_m < M
    mask_c = offs_c < C

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    # Loop bounds in int32 (N < 2^31); the offsets are widened to int64 before meeting the strides.
    n_lo = split.to(tl.int32) * chunk
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
        acc = acc * alpha[:, None] + _dot(p, xt, DOT)
        m_i = m_new

    if n_splits > 1:
        row = (b * n_splits + split) * M + offs_m
        tl.store(part_m_ptr + row, m_i, mask=mask_m)
        tl.store(part_l_ptr + row, l_i, mask=mask_m)
        tl.store(part_acc_ptr + row[:, None] * C + offs_c[None, :], acc,
                 mask=mask_m[:, None] & mask_c[None, :])
    else:
        # Padded rows (l = 0) divide by 1 instead: no NaN/inf is produced where nothing is stored.
        l_i = tl.where(mask_m, l_i, 1.0)
        _layer_norm_store(acc / l_i[:, None], m_i, l_i, b * M + offs_m, mask_m, offs_c, mask_c, C, eps,
                          w_ptr, b_ptr, s_w, s_b, has_w, has_b, out_ptr, pooled_ptr, stats_ptr)


@triton.jit(do_not_specialize=["n_splits", "s_w", "s_b", "has_w", "has_b"])
def _cluster_pool_merge_kernel(
    part_m_ptr, part_l_ptr, part_acc_ptr, w_ptr, b_ptr, out_ptr, pooled_ptr, stats_ptr,
    BM, M, C, n_splits, eps, s_w, s_b, has_w, has_b,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """The split-N merge in one pass: BLOCK_R rows (b, m) of the B·M, each rescaling its n_splits partial
    softmaxes (m, l, acc) onto a running maximum, then pooled, stats and the LayerNorm."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = rows < BM
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    b = rows // M
    mm = rows % M
    m_run = tl.full((BLOCK_R,), float("-inf"), dtype=tl.float32)
    l_run = tl.zeros((BLOCK_R,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for s in range(n_splits):
        part = (b * n_splits + s) * M + mm
        m_s = tl.load(part_m_ptr + part, mask=mask_r, other=float("-inf"))
        l_s = tl.load(part_l_ptr + part, mask=mask_r, other=0.0)
        a_s = tl.load(part_acc_ptr + part[:, None] * C + offs_c[None, :], mask=mask_r[:, None] & mask_c[None, :],
                      other=0.0)
        # A split that saw only -inf logits has m = -inf and l = 0: its weight must be 0, not NaN.
        m_new = tl.maximum(m_run, m_s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_run - m_safe)
        beta = tl.exp(m_s - m_safe)
        l_run = l_run * alpha + l_s * beta
        acc = acc * alpha[:, None] + a_s * beta[:, None]
        m_run = m_new
    l_run = tl.where(mask_r, l_run, 1.0)
    _layer_norm_store(acc / l_run[:, None], m_run, l_run, rows, mask_r, offs_c, mask_c, C, eps,
                      w_ptr, b_ptr, s_w, s_b, has_w, has_b, out_ptr, pooled_ptr, stats_ptr)


@triton.jit
def _cluster_pool_bwd_kernel(
    logits_ptr, x_ptr, stats_ptr, dp_ptr, rowdot_ptr, dlogits_ptr, dx_ptr,
    M, N, C, n_blocks,
    sl_b, sl_m, sl_n,
    sx_b, sx_n, sx_c,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, DOT: tl.constexpr,
):  # fmt: skip
    """One program: BLOCK_K patches of batch element b, all clusters (loop over cluster blocks).

    1-D grid (n_blocks · B): program id = b · n_blocks + N block.
    stats (B, M, 2), rowdot (B, M) and dP (B, M, C) are fp32 contiguous; dlogits (B, M, N) and dx (B, N, C) are
    written contiguous. Each program owns its dlogits columns and dx rows: no atomics.
    """
    pid = tl.program_id(0).to(tl.int64)
    pid_n = pid % n_blocks
    b = pid // n_blocks
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
        row_max = tl.load(stats_ptr + 2 * row, mask=mask_m, other=0.0)
        row_sum = tl.load(stats_ptr + 2 * row + 1, mask=mask_m, other=1.0)
        rowdot = tl.load(rowdot_ptr + row, mask=mask_m, other=0.0)
        dp = tl.load(dp_ptr + row[:, None] * C + offs_c[None, :], mask=mask_m[:, None] & mask_c[None, :],
                     other=0.0)
        # t − row_max is exact: S is as accurate as torch.softmax's. An all -inf row (max −inf, sum 0)
        # gives NaN, like the reference.
        s = tl.where(mask_mn, tl.exp(t - row_max[:, None]) * (1.0 / row_sum)[:, None], 0.0)  # (BLOCK_M, BLOCK_K)
        ds = _dot(dp, tl.trans(xt), DOT)  # (BLOCK_M, BLOCK_K)
        dl = s * (ds - rowdot[:, None])
        tl.store(dlogits_ptr + row[:, None] * N + offs_n[None, :], dl.to(dlogits_ptr.dtype.element_ty),
                 mask=mask_mn)
        dx += _dot(tl.trans(s), dp, DOT)
    tl.store(dx_ptr + (b * N + offs_n[:, None]) * C + offs_c[None, :], dx.to(dx_ptr.dtype.element_ty),
             mask=mask_nc)


def _fp32(v: float) -> float:
    """v rounded to float32, as the C++ and CUDA kernels take eps: Triton would type a float outside
    float32's range (an eps of 1e-60) as fp64, and compile another kernel variant."""
    return ctypes.c_float(v).value


def cluster_pool_fwd(
    logits: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    num_splits: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Launch the forward on x's device; any strides. ``num_splits`` forces the split-N path (None:
    the plan's choice, :func:`plan.cluster_pool_fwd_plan`).

    Returns out (B, M, C) in x's dtype, pooled (B, M, C) fp32 and stats (B, M, 2) fp32 (row max, row sum).
    """
    bsz, m, n = logits.shape
    c = x.shape[2]
    dev = x.device
    out = torch.empty((bsz, m, c), dtype=x.dtype, device=dev)
    pooled = torch.empty((bsz, m, c), dtype=torch.float32, device=dev)
    stats = torch.empty((bsz, m, 2), dtype=torch.float32, device=dev)
    if n == 0:
        # A softmax over no patches is undefined (0/0); the C++ kernels refuse it too, and ops.cluster_pool
        # raises ValueError before any backend runs.
        raise ValueError(f"cluster_pool needs at least one patch (N >= 1), got logits of shape {tuple(logits.shape)}")
    if bsz * m * c == 0:
        # Nothing to launch: out and pooled are empty. With C = 0 the rows' softmax statistics are still
        # defined (and the backward's dlogits is 0 whatever they are); the C++ kernels compute them alike.
        if bsz * m > 0:
            row_max = logits.float().amax(-1)
            row_sum = torch.exp(logits.float() - row_max.unsqueeze(-1)).sum(-1)
            stats[..., 0] = row_max
            stats[..., 1] = row_sum.masked_fill(row_max == float("-inf"), 0.0)  # all -inf: s = 0, as the kernels
        return out, pooled, stats
    dtype = plan.dtype_name(x.dtype)
    launch = plan.cluster_pool_fwd_plan(bsz, m, n, c, dtype, device_of(x), num_splits)
    launch.check_grid()
    splits, chunk = launch.get("splits"), launch.get("chunk")
    block_m = launch.consts["BLOCK_M"]
    if splits > 1:
        part_m = torch.empty((bsz, splits, m), dtype=torch.float32, device=dev)
        part_l = torch.empty((bsz, splits, m), dtype=torch.float32, device=dev)
        part_acc = torch.empty((bsz, splits, m, c), dtype=torch.float32, device=dev)
    else:
        part_m = part_l = part_acc = stats  # unused placeholders (one split never touches them)
    w = weight if weight is not None else x
    bb = bias if bias is not None else x
    s_w = weight.stride(0) if weight is not None else 0
    s_b = bias.stride(0) if bias is not None else 0
    has_w, has_b = int(weight is not None), int(bias is not None)
    with device_guard(dev):
        _cluster_pool_fwd_kernel[launch.grid](
            logits, x, w, bb, out, pooled, stats, part_m, part_l, part_acc,
            m, n, c, chunk, splits, triton.cdiv(m, block_m), _fp32(eps),
            *logits.stride(), *x.stride(), s_w, s_b, has_w, has_b,
            **launch.consts, num_warps=launch.num_warps, num_stages=launch.num_stages,
        )  # fmt: skip
        if splits > 1:
            merge = plan.cluster_pool_merge_plan(bsz, m, c, splits, dtype, device_of(x))
            merge.check_grid()
            _cluster_pool_merge_kernel[merge.grid](
                part_m, part_l, part_acc, w, bb, out, pooled, stats,
                bsz * m, m, c, splits, _fp32(eps), s_w, s_b, has_w, has_b,
                **merge.consts, num_warps=merge.num_warps, num_stages=merge.num_stages,
            )  # fmt: skip
    return out, pooled, stats


def cluster_pool_bwd(
    grad_out: Tensor,
    logits: Tensor,
    x: Tensor,
    weight: Tensor | None,
    pooled: Tensor,
    stats: Tensor,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Launch the backward on x's device; any strides (a stride-0 grad_out included).

    Returns dlogits (B, M, N) in logits' dtype, dx (B, N, C) in x's dtype, dweight and dbias (C,) in
    the dtype of weight (x's dtype when there is no weight).
    """
    bsz, m, n = logits.shape
    c = x.shape[2]
    dev = x.device
    pdtype = weight.dtype if weight is not None else x.dtype
    dlogits = torch.empty((bsz, m, n), dtype=logits.dtype, device=dev)
    dx = torch.empty((bsz, n, c), dtype=x.dtype, device=dev)
    if bsz * n * c == 0 or m == 0:  # nothing flows back (C = 0: out is empty, dlogits 0)
        zeros = torch.zeros(c, dtype=pdtype, device=dev)
        return dlogits.zero_(), dx.zero_(), zeros, zeros.clone()
    # LayerNorm backward on the small (B, M, C) tensors, in fp32:
    #   dP = rstd · (g − mean_c g − x̂ · mean_c(g ∘ x̂)),  g = grad_out ∘ weight
    pooled = pooled.float()
    g_out = grad_out.float()
    # Overflow-free statistics (the forward's rule): x̂ from the scaled rows, rstd of pooled = rstd_q / scale.
    inv_scale, mean, rstd_q = layer_norm_stats(pooled, eps)
    xhat = (pooled * inv_scale - mean) * rstd_q
    rstd = rstd_q * inv_scale
    dweight = (g_out * xhat).sum((0, 1)).to(pdtype)
    dbias = g_out.sum((0, 1)).to(pdtype)
    g = g_out * weight.float() if weight is not None else g_out
    dp = (rstd * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))).contiguous()
    rowdot = (dp * pooled).sum(-1).contiguous()  # (B, M) = rowsum(S ∘ dS)
    stats = stats.float().contiguous()

    launch = plan.cluster_pool_bwd_plan(bsz, m, n, c, plan.dtype_name(x.dtype), device_of(x))
    launch.check_grid()
    with device_guard(dev):
        _cluster_pool_bwd_kernel[launch.grid](
            logits, x, stats, dp, rowdot, dlogits, dx,
            m, n, c, triton.cdiv(n, launch.consts["BLOCK_K"]),
            *logits.stride(), *x.stride(),
            **launch.consts, num_warps=launch.num_warps, num_stages=launch.num_stages,
        )  # fmt: skip
    return dlogits, dx, dweight, dbias
