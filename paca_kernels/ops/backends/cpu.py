"""The "cpu" backend: the C++ CPU kernels of ``paca_kernels._C`` (csrc/cpu).

Fused, differentiable cluster_pool and p2c_attention for every floating dtype (fp16/bf16 inputs
accumulate in fp32, float64 in float64), with no shape limits. The inference-only fusions of the
layers (csrc/cpu/fused, :mod:`paca_kernels.ops.fused`) run where this backend is the one a layer's
setting resolves to. Available when the extension is built and loads.

Tolerances: those the CPU kernel tests have held since the kernels landed (``testing.TOLERANCES``,
set from the error measured on the tests' shapes: other summation orders, fp32 accumulation), with
the gradients' looser where they sum over N or B·M rows.

Where the automatic choice passes it over: :data:`SLOWER_THAN_REFERENCE`, regimes (op, with or
without the backward, range of N and of the channels) where these kernels were measured slower than
the reference backend on the CPU, float32 (``benchmarks/interleaved_ops.py``, interleaved rounds; the
results file is named in each row). There the automatic choice takes the reference; ``backend="cpu"``
still runs the kernels. The table is a measurement of one machine and one build, not a law: re-measure
it (and update it with its results file) when the kernels or the machine change.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ... import _ext
from ..cluster_pool import cluster_pool_cpp
from ..dispatch import Backend
from ..p2c_attention import p2c_attention_cpp

__all__ = ["BACKEND", "SLOWER_THAN_REFERENCE", "SlowerRegime", "slower_regime"]


@dataclass(frozen=True)
class SlowerRegime:
    """A regime where the cpu backend's op ran slower than the reference's, measured.

    Attributes:
        op: "cluster_pool" or "p2c_attention".
        grad: True for calls that record a backward (training: forward + backward timed), False for
            calls that do not (inference: forward timed).
        n: the range of N (patches) it covers, inclusive.
        channels: the range of the channels, inclusive: C (x's last dimension) for cluster_pool,
            h·d for p2c_attention.
        speed: the cpu backend's speed over the reference's there (median of the per-round ratios).
        source: the results file under benchmarks/results/ that measured it.
    """

    op: str
    grad: bool
    n: tuple[int, int]
    channels: tuple[int, int]
    speed: float
    source: str

    def covers(self, op: str, n: int, channels: int, grad: bool) -> bool:
        return (op == self.op and grad == self.grad and self.n[0] <= n <= self.n[1]
                and self.channels[0] <= channels <= self.channels[1])


#: The measured regimes where the automatic choice on the CPU prefers the reference (see the module
#: docstring). cluster_pool: ``train-2026-12-06/ops-1thread.json``, from
#: ``benchmarks/interleaved_ops.py --threads 1 --rounds 10`` on the 2-core development
#: machine (Intel Xeon, AVX-512; one thread, because the machine was shared and two-thread rounds of
#: the reference's many small parallel ops varied tenfold), fp32, at the PaCa-ViT-Tiny stages (B = 8,
#: M = 100), segmentation 512² and detection 800×1216 (stage 1). cpu speed over the reference,
#: median [q1, q3] of the rounds:
#:
#: ==================  ============  ==================  ==================  ==================  ========  ========
#: op                  mode          tiny-s1 N3136 C96   tiny-s2 N784 C192   tiny-s3 N196 C320   seg512    det800
#: ==================  ============  ==================  ==================  ==================  ========  ========
#: cluster_pool        fwd+bwd       1.04 [0.92, 1.31]   1.06 [1.00, 1.26]   1.34 [1.19, 1.74]   1.42      1.71
#: cluster_pool        fwd           1.41 [1.08, 1.74]   0.80 [0.48, 2.11]   3.42 [1.07, 3.83]   2.51      3.20
#: ==================  ============  ==================  ==================  ==================  ========  ========
#:
#: p2c_attention, after its AVX-512 softmax rows and 3-vector tiles (issue #29):
#: ``train-2026-12-06/p2c-cputime-p2ctrain.json``, from ``interleaved_ops.py --cpu-time --ops
#: p2c_attention --rounds 15`` (one thread, the calling thread's CPU time, load 3; the kernels
#: before, measured the same way just after: ``p2c-cputime-before.json``):
#:
#: ==================  ============  ==================  ==================  ==================  ==================
#: op                  mode          tiny-s1 N3136 d48   tiny-s2 N784 d48    tiny-s3 N196 d40    base-s3 N196 d48
#: ==================  ============  ==================  ==================  ==================  ==================
#: p2c_attention       fwd+bwd       1.46 [1.22, 1.54]   1.11 [1.10, 1.15]   1.06 [0.91, 1.09]   1.00 [0.91, 1.02]
#: p2c_attention       fwd           1.39 [1.32, 1.45]   1.38 [1.36, 1.41]   1.22 [1.16, 1.28]   1.28 [1.25, 1.35]
#: (before)            fwd+bwd       1.23 [1.10, 1.27]   1.09 [1.06, 1.13]   0.96 [0.90, 0.99]   0.91 [0.85, 0.93]
#: ==================  ============  ==================  ==================  ==================  ==================
#:
#: No regime's whole middle half of rounds lies below 1 now, so the table is empty. The row it held,
#: p2c_attention with the backward at N <= 196, 320 channels (0.85 [0.77, 0.97] in ops-1thread.json,
#: wall time), measures 1.06 [0.91, 1.09] in CPU time (a wall-time run beside it,
#: ``ops-p2ctrain-1thread.json``: 0.89 [0.82, 1.05]): parity, where the kernels keep their
#: determinism and do not store the (B, h, N, M) probabilities for the backward. At N = 196 the
#: backward recomputes the scores and their exps (one of its five products) where the reference
#: reads the saved probabilities, which is what holds it at parity there. cluster_pool's forward at
#: stage 2 (median 0.80) had a middle half of [0.48, 2.11], which says nothing either way (a second
#: run: see benchmarks/NOTES.md).
#:
#: Re-measured after the attention's softmax rows, its saving training pair (``p2c_attention_saved_fwd``
#: / ``_bwd``: the backward reads the forward's numerators, no recompute) and the pooling's
#: patch-major backward: ``cpu-2026-12-07-ops-2thread.json`` (two threads, wall time, 5 rounds),
#: forward + backward: cluster_pool 1.29 / 1.15 / 1.47 at the Tiny stages, 2.26 / 2.56 at
#: segmentation / detection; p2c_attention 1.60 / 1.47 / 1.40, 3.09 / 3.33; forward alone 1.37-4.56.
#: Again after the pooling backward's vectorised LayerNorm part and fused softmax backward:
#: ``cpu-2026-12-07-ops-2thread-b.json`` (two threads, wall time, 15 rounds; its figures, and those
#: of runs of the same code beside it, in benchmarks/NOTES.md): every forward + backward median at
#: 1.2x or more, the forward alone at 1.4x or more. Every regime above parity: the table stays empty.
SLOWER_THAN_REFERENCE: tuple[SlowerRegime, ...] = ()


def _sizes(op: str, inputs: Sequence[torch.Tensor]) -> tuple[int, int]:
    """(N, channels) of a call: cluster_pool (logits (B, M, N), x (B, N, C)); p2c_attention (q (B, N, h, d), ...)."""
    if op == "cluster_pool":
        return inputs[1].shape[1], inputs[1].shape[2]
    q = inputs[0]
    return q.shape[1], q.shape[2] * q.shape[3]


def slower_regime(op: str, inputs: Sequence[torch.Tensor], grad: bool) -> SlowerRegime | None:
    """The row of :data:`SLOWER_THAN_REFERENCE` covering this call (float32 only: the table measured
    float32), or None."""
    if inputs[0].dtype != torch.float32:
        return None
    n, channels = _sizes(op, inputs)
    return next((r for r in SLOWER_THAN_REFERENCE if r.covers(op, n, channels, grad)), None)


def _auto_skip(op: str):
    def reason(inputs: Sequence[torch.Tensor], grad: bool) -> str | None:
        row = slower_regime(op, inputs, grad)
        if row is None:
            return None
        mode = "forward+backward" if grad else "forward"
        return (f"measured slower than the reference here ({op} {mode}, N in {row.n}, channels in "
                f"{row.channels}: {row.speed:.2f}x, benchmarks/results/{row.source})")
    return reason


BACKEND = Backend(
    name="cpu",
    description="C++ CPU kernels (paca_kernels._C): fused cluster_pool and p2c_attention",
    device_types=("cpu",),
    dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64),
    impls={"cluster_pool": cluster_pool_cpp, "p2c_attention": p2c_attention_cpp},
    availability=lambda: None if _ext.load() else _ext.unavailable_reason(),
    tolerances={torch.float64: (1e-10, 1e-12), torch.float32: (2e-5, 2e-5)},
    grad_tolerances={torch.float64: (1e-10, 1e-12), torch.float32: (3e-5, 3e-5)},
    auto_skip={"cluster_pool": _auto_skip("cluster_pool"), "p2c_attention": _auto_skip("p2c_attention")},
)
