"""Data-parallel training of a PaCa-ViT with torchrun: DDP or FSDP2, optional torch.compile and activation
checkpointing, on synthetic images (no dataset to download).

Each process draws its own batches of synthetic images whose class is written into them (a per-class
pattern under noise), so the loss falls within a few dozen steps and a broken gradient shows. DDP
averages the gradients of the processes; FSDP2 (``--fsdp``) also shards the parameters, one unit per
PaCa block (``paca_kernels.distributed.fully_shard_paca``).

Usage (one machine):
    # CPUs, gloo, 2 processes, a toy model:
    .venv/bin/torchrun --nproc_per_node=2 examples/train_distributed.py --device cpu --model toy --backend cpu
    # every GPU of the machine, NCCL, the Tiny model with FSDP2 and torch.compile:
    torchrun --nproc_per_node=gpu examples/train_distributed.py --device cuda \\
        --model pacavit_tiny_p2cconv_100_0 --fsdp --compile --batch-size 64
    # one process, no torchrun: python examples/train_distributed.py ...

--model takes "toy" (four stages, embed dims 16-40, 32×32 images: a smoke test) or any official variant
(paca_kernels.list_models()). --backend picks the PaCa ops backend (cpu: the fused C++ kernels; triton on
CUDA; reference; default: automatic). The teacher variants (pacavit_convmixer_*) contain BatchNorm:
--sync-bn converts it to SyncBatchNorm (CUDA only: PyTorch's SyncBatchNorm does not train on CPU tensors).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

import paca_kernels
from paca_kernels import PaCaViT

TOY = {
    "arch_cfg": {"embed_dims": [16, 24, 32, 40], "num_heads": [1, 2, 2, 2], "mlp_ratios": [2] * 4,
                 "depths": [1, 2, 1, 1]},
    "paca_cfg": {"clusters": [4, 5, 3, 0]},
}


def progress(it: Iterable[Any], total: int, desc: str, enabled: bool) -> Iterator[Any]:
    """tqdm when installed, else a counter printed every tenth of the run (and at the end)."""
    if not enabled:
        yield from it
        return
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None:
        yield from tqdm(it, total=total, desc=desc, file=sys.stderr)
        return
    every = max(1, total // 10)
    for i, item in enumerate(it, 1):
        yield item
        if i % every == 0 or i == total:
            print(f"{desc}: {i}/{total}", file=sys.stderr, flush=True)


def setup_distributed(device_kind: str) -> tuple[int, int, torch.device]:
    """Join the torchrun group (NCCL on CUDA, gloo on the CPU); without torchrun, a group of one.

    Returns (rank, world size, this process's device).
    """
    if device_kind == "cuda":
        if not torch.cuda.is_available():
            sys.exit("--device cuda: no CUDA device is visible")
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if local_rank >= torch.cuda.device_count():
            sys.exit(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA devices")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        pg_backend = "nccl"
    else:
        device = torch.device("cpu")
        pg_backend = "gloo"
    if "RANK" not in os.environ:  # plain `python examples/train_distributed.py`: a one-process group
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29511")
    dist.init_process_group(pg_backend, timeout=datetime.timedelta(minutes=5),
                            device_id=device if device.type == "cuda" else None)
    return dist.get_rank(), dist.get_world_size(), device


def build_model(args: argparse.Namespace) -> PaCaViT:
    """The same initial weights on every rank (seeded before construction)."""
    torch.manual_seed(args.seed)
    common = {"num_classes": args.num_classes, "img_size": args.img_size, "backend": args.backend,
              "drop_path_rate": args.drop_path}
    if args.model == "toy":
        return PaCaViT(**TOY, **common)
    if args.model not in paca_kernels.list_models():
        sys.exit(f"unknown --model {args.model!r}; choose toy or one of {', '.join(paca_kernels.list_models())}")
    return paca_kernels.create_model(args.model, **common)


def synthetic_batch(gen: torch.Generator, patterns: Tensor, batch: int) -> tuple[Tensor, Tensor]:
    """Images (batch, 3, S, S): the class's fixed pattern plus unit noise; labels (batch,)."""
    labels = torch.randint(0, patterns.shape[0], (batch,), generator=gen)
    noise = torch.randn(batch, *patterns.shape[1:], generator=gen)
    return patterns[labels] + noise, labels


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="toy", help='"toy" or an official variant name')
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=8, help="images per process and step")
    p.add_argument("--img-size", type=int, default=None, help="default: 32 for toy, else 224")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--backend", default=None, help="paca_kernels ops backend (cpu, triton, reference, ...)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: NCCL, cpu: gloo")
    p.add_argument("--fsdp", action="store_true", help="FSDP2 (fully_shard per PaCa block) instead of DDP")
    p.add_argument("--compile", action="store_true", help="torch.compile the wrapped model")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute block activations")
    p.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm in the teacher (CUDA only)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--drop-path", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1:
        p.error("--steps and --batch-size must be positive")
    if args.img_size is None:
        args.img_size = 32 if args.model == "toy" else 224
    if args.img_size % 32:
        p.error(f"--img-size {args.img_size} must be divisible by 32 (patch 4 × 2^3 downsamplings)")
    if args.sync_bn and args.device != "cuda":
        p.error("--sync-bn needs --device cuda (PyTorch's SyncBatchNorm does not train on CPU tensors)")

    rank, world, device = setup_distributed(args.device)
    try:
        model = build_model(args).to(device)
        n_params = sum(t.numel() for t in model.parameters())
        if args.grad_checkpointing:
            model.set_grad_checkpointing(True)
        if args.sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        if args.fsdp:
            from paca_kernels.distributed import fully_shard_paca

            # PaCa blocks return the cluster logits, a view; FSDP2 warns that an in-place op on it would
            # skip its hook. PaCaViT never modifies block outputs in place, so the warning is noise here.
            warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPPaCaBlock\) returned a view")
            wrapped: nn.Module = fully_shard_paca(model)
        else:
            from torch.nn.parallel import DistributedDataParallel as DDP

            wrapped = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        if args.compile:
            wrapped = torch.compile(wrapped, backend=args.compile_backend)
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
        if rank == 0:
            print(f"{args.model}: {n_params:,} parameters; {world} process(es) on {args.device} "
                  f"({dist.get_backend()}), {'FSDP2' if args.fsdp else 'DDP'}"
                  f"{', compiled' if args.compile else ''}"
                  f"{', grad checkpointing' if args.grad_checkpointing else ''}; "
                  f"global batch {args.batch_size * world}; ops backend {args.backend or 'auto'}", flush=True)

        # Class patterns are shared (seeded alike on every rank); the batches differ per rank.
        patterns = torch.randn(args.num_classes, 3, args.img_size, args.img_size,
                               generator=torch.Generator().manual_seed(args.seed))
        gen = torch.Generator().manual_seed(args.seed + 1 + rank)
        wrapped.train()
        losses: list[float] = []
        t0 = time.perf_counter()
        for _ in progress(range(args.steps), args.steps, "train", enabled=rank == 0 and not args.no_progress):
            img, target = synthetic_batch(gen, patterns, args.batch_size)
            img, target = img.to(device, non_blocking=True), target.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
                loss = F.cross_entropy(wrapped(img), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            # The mean loss over the ranks, for the log (one small all-reduce per step).
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            losses.append(mean.item() / world)
        seconds = time.perf_counter() - t0
        if rank == 0:
            k = max(1, len(losses) // 5)
            first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
            mem = (f", peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
                   if device.type == "cuda" else "")
            print(f"done: {args.steps} steps in {seconds:.1f} s "
                  f"({args.steps * args.batch_size * world / seconds:.1f} images/s), "
                  f"loss {first:.3f} (first {k} steps) -> {last:.3f} (last {k}){mem}", flush=True)
        # Every rank done with its collectives before the group is torn down: a gloo peer that
        # closes while the other still has work in flight can abort the process at exit
        # ("terminate called without an active exception", seen once in CI).
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
