"""Interleaved timing of the two differentiable ops, cpu backend against the reference, with and
without the backward: the measurement behind the automatic choice's table of slower regimes
(``paca_kernels/ops/backends/cpu.py``, ``SLOWER_THAN_REFERENCE``).

    python benchmarks/interleaved_ops.py [--rounds 15] [--shapes tiny-s1,...] [--ops p2c_attention] [--threads 2]
                                         [--cpu-time] [--out FILE.json]

Groups, one per op, mode and shape (``benchmarks/shapes.py``: the PaCa-ViT-Tiny stages, base-s3,
segmentation 512² and detection 800×1216 stage 1, fp32, B = 8 except detection's B = 2):

- ``cluster_pool-{fwd,fwd+bwd}``: logits (B, M, N) in the layout the clustering heads give them
  (strides (N·M, 1, M), a channels-last 1×1 convolution's output), x (B, N, C), affine LayerNorm;
  fwd+bwd asks for every gradient (logits, x, weight, bias).
- ``p2c_attention-{fwd,fwd+bwd}``: q (B, N, h, d), k and v (B, M, h, d), contiguous (the layer's views
  of its linear outputs), every gradient.

Each round runs both providers once in a rotating order (``paca_kernels.timing.interleave``); the ratio
printed is cpu's speed over the reference's, per round, median [q1, q3]. The JSON has the layout of
``benchmarks/interleaved.py`` (pytest-benchmark rows), FLOPs as the ops' registered formulas count them
(forward + backward = 3 × forward, as in test_bench_ops.py).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import interleaved
from interleaved import _ceilings, _print, _rows, write_results
from shapes import Shape, stage_shapes

from paca_kernels import ops, timing

PROVIDERS = ("reference", "cpu")


def pool_fns(s: Shape, train: bool) -> tuple[dict[str, Callable[[], object]], int]:
    """The cluster_pool call per provider, and its FLOPs (the pooling product; × 3 with the backward)."""
    logits = torch.randn(s.B, s.N, s.M).transpose(1, 2)  # the heads' layout, strides (N·M, 1, M)
    x = torch.randn(s.B, s.N, s.C)
    w, b = 1 + 0.1 * torch.randn(s.C), 0.1 * torch.randn(s.C)
    leaves = [t.requires_grad_(train) for t in (logits, x, w, b)]
    grad = torch.randn(s.B, s.M, s.C)

    def make(be: str) -> Callable[[], object]:
        if not train:
            return lambda: ops.cluster_pool(*leaves, 1e-5, backend=be)
        return lambda: torch.autograd.grad(ops.cluster_pool(*leaves, 1e-5, backend=be), leaves, grad)

    flops = 2 * s.B * s.M * s.N * s.C
    return {p: make(p) for p in PROVIDERS}, flops * (3 if train else 1)


def p2c_fns(s: Shape, train: bool) -> tuple[dict[str, Callable[[], object]], int]:
    """The p2c_attention call per provider, and its FLOPs (two products; × 3 with the backward)."""
    q = torch.randn(s.B, s.N, s.h, s.d)
    k, v = torch.randn(s.B, s.M, s.h, s.d), torch.randn(s.B, s.M, s.h, s.d)
    leaves = [t.requires_grad_(train) for t in (q, k, v)]
    grad = torch.randn_like(q)

    def make(be: str) -> Callable[[], object]:
        if not train:
            return lambda: ops.p2c_attention(*leaves, backend=be)
        return lambda: torch.autograd.grad(ops.p2c_attention(*leaves, backend=be), leaves, grad)

    flops = 4 * s.B * s.N * s.M * s.h * s.d
    return {p: make(p) for p in PROVIDERS}, flops * (3 if train else 1)


def op_groups(shapes: list[Shape], rounds: int, ceil: dict,
              ops_wanted: tuple[str, ...] = ("cluster_pool", "p2c_attention")) -> list[dict]:
    rows = []
    for s in shapes:
        for op, make in (("cluster_pool", pool_fns), ("p2c_attention", p2c_fns)):
            if op not in ops_wanted:
                continue
            for train in (True, False):
                torch.manual_seed(0)
                fns, flops = make(s, train)
                mode = "fwd+bwd" if train else "fwd"
                with torch.enable_grad() if train else torch.no_grad():
                    samples = timing.interleave(fns, rounds=rounds, warmup=2,
                                                clock=interleaved.CLOCK["clock"]).samples
                # _print and _rows read "reference" as the baseline of the per-round ratios.
                group = f"{op}-{mode}-{s.id} (interleaved, load {os.getloadavg()[0]:.1f})"
                rows += _rows(group, samples, dict.fromkeys(fns, flops), ceil)
                for r in rows[-len(fns):]:
                    r["extra_info"].update(op=op, mode=mode, shape=s.id, B=s.B, N=s.N, C=s.C, M=s.M, h=s.h)
                _print(group, samples)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--shapes", default="", help="comma-separated shape names (default: every CPU shape)")
    interleaved.add_clock_args(ap)
    ap.add_argument("--ops", default="cluster_pool,p2c_attention", help="comma-separated subset of the two ops")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default: print only)")
    args = ap.parse_args(argv)
    interleaved.apply_clock_args(args)
    shapes = stage_shapes("cpu", smoke=False)
    if args.shapes:
        wanted = args.shapes.split(",")
        shapes = [s for s in shapes if s.name in wanted]
    print(f"load average {os.getloadavg()}, {torch.get_num_threads()} threads, {timing.cpu_model()}", flush=True)
    ceil = _ceilings()
    print(f"ceilings: copy {ceil['copy'] / 1e9:.1f} GB/s, fp32 matmul 2048³ {ceil['matmul'] / 1e9:.0f} GF/s", flush=True)
    rows = op_groups(shapes, args.rounds, ceil, tuple(args.ops.split(",")))
    print(f"load average {os.getloadavg()}", flush=True)
    if args.out:
        write_results(args.out, rows, loadavg=os.getloadavg())
    return 0


if __name__ == "__main__":
    sys.exit(main())
