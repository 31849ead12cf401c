"""Forward + backward of the MLP and of the conv clustering head through the fused CPU kernels
(``mlp_dwconv`` with its backward ``mlp_dwconv_bwd``; ``conv_cluster_logits_train``) against the same
modules on the reference backend, at PaCa-ViT-Tiny's stage shapes, in interleaved rounds.

One torch thread and the calling thread's CPU time by default (``time.thread_time``: the machine is
shared, and other processes slow a single-threaded call's CPU time far less than its wall time).
Prints per case the median time of each path and the median and IQR of the per-round ratio
(reference time / fused time: > 1 is faster). The "model" case times a whole training step of a
model on the cpu backend with and without the MLP/head training fusions.

    PYTHONPATH=. python benchmarks/interleaved_trainfuse.py --rounds 15
"""

from __future__ import annotations

import argparse
import time

import torch

from paca_kernels import create_model, timing
from paca_kernels.nn import _fusion
from paca_kernels.nn.block import Mlp
from paca_kernels.nn.clustering import P2CConv2d
from paca_kernels.ops.fused import conv_cluster_logits as head_op
from paca_kernels.ops.fused import mlp_dwconv as dwconv_op

#: PaCa-ViT-Tiny: (C, H = W) per stage at 224², MLP hidden 4·C, 100 clusters in stages 1-3 (k = 7).
TINY_STAGES = [(96, 56), (192, 28), (320, 14), (384, 7)]


def _mlp_case(B: int, C: int, H: int) -> dict[str, object]:
    torch.manual_seed(0)
    fused = Mlp(C, 4 * C, with_dwconv=True, with_shortcut=True, backend="cpu")
    ref = Mlp(C, 4 * C, with_dwconv=True, with_shortcut=True, backend="reference")
    ref.load_state_dict(fused.state_dict())
    x = torch.randn(B, H * H, C, requires_grad=True)
    gy = torch.randn(B, H * H, C)
    assert _fusion.plan_mlp(fused, x) == "dwconv" and _fusion.plan_mlp(ref, x) == "modules"

    def run(m: Mlp):
        def f() -> None:
            m(x, H, H).backward(gy)
        return f

    return {"reference": run(ref), "fused": run(fused)}


def _head_case(B: int, C: int, H: int, M: int = 100, k: int = 7) -> dict[str, object]:
    torch.manual_seed(0)
    head = P2CConv2d(C, M, kernel_size=k)
    tensors = _fusion.conv_head_tensors(head.clustering)
    x = torch.randn(B, H * H, C, requires_grad=True)
    gy = torch.randn(B, M, H * H)

    def ref() -> None:
        head(x, H, H).backward(gy)

    def fused() -> None:
        head_op.conv_cluster_logits_train(x, H, H, *tensors).backward(gy)

    return {"reference": ref, "fused": fused}


def _model_case(B: int, name: str, res: int) -> dict[str, object]:
    """A whole training step (forward, backward of the logits' sum) of a model on the cpu backend,
    with the MLPs and conv heads training through the fused ops ("fused") or through their modules
    ("reference": the plans' training branches switched off, as before this change; the attention's
    differentiable ops run in both)."""
    torch.manual_seed(0)
    model = create_model(name, backend="cpu").train()
    x = torch.randn(B, 3, res, res)
    flags = (dwconv_op.DIFFERENTIABLE, head_op.DIFFERENTIABLE)

    def step(fused: bool):
        def f() -> None:
            dwconv_op.DIFFERENTIABLE = head_op.DIFFERENTIABLE = fused
            try:
                model.zero_grad(set_to_none=True)
                torch.manual_seed(1)  # the same DropPath masks on both paths
                model(x).sum().backward()
            finally:
                dwconv_op.DIFFERENTIABLE, head_op.DIFFERENTIABLE = flags
        return f

    return {"reference": step(False), "fused": step(True)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--wall", action="store_true", help="wall time instead of the thread's CPU time")
    ap.add_argument("--only", choices=["mlp", "head", "model"], default=None)
    ap.add_argument("--model", default="pacavit_tiny_p2cconv_100_0", help="model of the 'model' case")
    ap.add_argument("--model-batch", type=int, default=8)
    ap.add_argument("--model-res", type=int, default=224)
    ap.add_argument("--model-rounds", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.wall else time.thread_time
    print(f"B={args.batch} threads={args.threads} clock={'wall' if args.wall else 'thread CPU'} "
          f"rounds={args.rounds} (model step: {args.model_rounds}) cpu={timing.cpu_model()} "
          f"isa={torch.ops.paca_kernels.cpu_isa()}")
    cases = []
    for C, H in TINY_STAGES:
        if args.only in (None, "mlp"):
            cases.append((f"Mlp  C={C:3d} {H}x{H} hidden={4 * C}", _mlp_case(args.batch, C, H)))
        if args.only in (None, "head") and H > 7:
            cases.append((f"head C={C:3d} {H}x{H} M=100 k=7", _head_case(args.batch, C, H)))
    if args.only in (None, "model"):
        label = f"step {args.model} B={args.model_batch} {args.model_res}px (cpu backend; reference: MLP/head modules)"
        cases.append((label,
                      _model_case(args.model_batch, args.model, args.model_res)))
    for name, fns in cases:
        n = args.model_rounds if name.startswith("step") else args.rounds
        rounds = timing.interleave(fns, rounds=n, clock=clock)
        cmp = timing.compare(rounds.samples, "reference")
        ref_t, fused = cmp["reference"].time, cmp["fused"]
        sp = fused.speedup
        warn = f"  ({fused.warning})" if fused.warning else ""
        print(f"{name}: reference {ref_t.median * 1e3:8.2f} ms, fused {fused.time.median * 1e3:8.2f} ms, "
              f"ratio {sp.median:.2f}x (IQR {sp.q1:.2f}-{sp.q3:.2f}){warn}", flush=True)


if __name__ == "__main__":
    main()
