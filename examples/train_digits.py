"""Train a small PaCa model on scikit-learn's digits (8×8 images) with each clustering head, on the CPU.

The model: a 3×3 conv stem turning each pixel into a token (an 8×8 grid, N = 64), two PaCaBlocks that
share one clustering of the tokens into M clusters (the first block clusters, the second reuses its
logits, as PaCa-ViT's stage-wise clustering does), LayerNorm, mean pooling, a linear classifier. Only the
clustering head changes between runs: conv, mlp and linear (the official heads), kmeans, gmm,
hierarchical (rebuilt at every epoch) and density (paca_kernels.nn.clustering_variants). The script
prints a table of test accuracy and macro-F1 (the mean over the ten digits of each digit's F1, as the
PaCa-ViT student study reported) and writes, for each head, cluster heatmaps of a few test digits
(paca_kernels.explain.save_overlays).

Usage:
    .venv/bin/pip install scikit-learn matplotlib      # (tqdm optional: progress bars)
    .venv/bin/python examples/train_digits.py          # 7 heads × 10 epochs, a minute or two
    .venv/bin/python examples/train_digits.py --quick  # a smoke run, a few seconds of training
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from paca_kernels import explain as paca_explain
from paca_kernels.nn import PaCaBlock, rebuild_trees

VARIANTS = ("conv", "mlp", "linear", "kmeans", "gmm", "hierarchical", "density")


def progress(it: Iterable[Any], total: int, desc: str, enabled: bool = True) -> Iterator[Any]:
    """Progress on stderr: tqdm's bar (or a ``\\r`` counter without tqdm) on a terminal; when stderr
    is not a terminal (a log file, CI), a plain line at each quarter, so the log holds no carriage
    returns and no line of thousands of characters."""
    if not enabled:
        yield from it
        return
    if not sys.stderr.isatty():
        marks = {max(1, round(total * q / 4)) for q in (1, 2, 3, 4)}
        for i, item in enumerate(it, 1):
            yield item
            if i in marks:
                print(f"{desc}: {i}/{total}", file=sys.stderr, flush=True)
        return
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None:
        yield from tqdm(it, total=total, desc=desc, leave=False, file=sys.stderr)
        return
    for i, item in enumerate(it, 1):
        yield item
        print(f"\r{desc}: {i}/{total}", end="" if i < total else "\n", file=sys.stderr, flush=True)


class DigitsPaCa(nn.Module):
    """Images (B, 1, 8, 8) -> logits (B, 10) through two PaCa blocks sharing one clustering."""

    def __init__(self, clustering: str, dim: int = 32, heads: int = 2, clusters: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, dim, 3, padding=1), nn.GELU())
        cfg = {"type": clustering, "clusters": clusters, "clustering_kernel_size": 3}
        self.blocks = nn.ModuleList([
            PaCaBlock(dim, heads, paca_cfg={**cfg, "onsite_clustering": True}, mlp_ratio=2.0),
            PaCaBlock(dim, heads, paca_cfg={**cfg, "onsite_clustering": False}, mlp_ratio=2.0),
        ])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, images: Tensor) -> Tensor:
        x = self.stem(images)  # (B, C, 8, 8)
        _, _, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)  # (B, N, C)
        logits = None
        for block in self.blocks:
            x, logits = block.forward_logits(x, h, w, logits)  # the second block reuses the logits
        return self.head(self.norm(x).mean(dim=1))


def load_digits(quick: bool, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(train x, train y, test x, test y): images (·, 1, 8, 8) standardised, 80/20 split."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError:
        sys.exit("this example needs scikit-learn: .venv/bin/pip install scikit-learn")
    data = sk_load_digits()  # bundled with scikit-learn: no download
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    n_test = len(y) // 5
    xtr, ytr, xte, yte = x[n_test:], y[n_test:], x[:n_test], y[:n_test]
    if quick:
        xtr, ytr, xte, yte = xtr[:128], ytr[:128], xte[:64], yte[:64]
    mean, std = xtr.mean(), xtr.std()
    return (xtr - mean) / std, ytr, (xte - mean) / std, yte


def macro_f1(pred: Tensor, target: Tensor, num_classes: int = 10) -> float:
    """Mean over the classes of F1 = 2·TP / (2·TP + FP + FN) (a class absent from both counts as 0)."""
    f1 = []
    for c in range(num_classes):
        tp = ((pred == c) & (target == c)).sum().item()
        fp = ((pred == c) & (target != c)).sum().item()
        fn = ((pred != c) & (target == c)).sum().item()
        f1.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return sum(f1) / num_classes


def train_one(
    variant: str, data: tuple[Tensor, Tensor, Tensor, Tensor], epochs: int, batch: int, lr: float,
    seed: int, show_progress: bool,
) -> tuple[DigitsPaCa, float, float, float]:
    """Train one model; returns (model, test accuracy, test macro-F1, seconds)."""
    xtr, ytr, xte, yte = data
    torch.manual_seed(seed)
    model = DigitsPaCa(variant)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * ((len(ytr) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    model.train()
    batches = (
        (epoch, idx) for epoch in range(epochs)
        for idx in torch.randperm(len(ytr), generator=gen).split(batch)
    )
    current = 0
    for epoch, idx in progress(batches, steps, f"{variant:>12}", show_progress):
        if epoch != current:  # a new epoch: regroup the hierarchical head's prototypes (Ward tree)
            rebuild_trees(model)
            current = epoch
        loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    seconds = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        pred = model(xte).argmax(1)
    return model, (pred == yte).float().mean().item(), macro_f1(pred, yte), seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 1 epoch on 128 images, 1 PNG per head")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {VARIANTS}")
    p.add_argument("--out", default="digits_out", help="folder for the heatmap PNGs")
    p.add_argument("--num-images", type=int, default=3, help="test digits to draw per head")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (the model is tiny: one thread wastes least on synchronisation)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {VARIANTS}")
    epochs = 1 if args.quick else args.epochs
    num_images = 1 if args.quick else args.num_images
    data = load_digits(args.quick, args.seed)
    print(f"digits: {len(data[1])} train / {len(data[3])} test images, {epochs} epoch(s) per head")

    rows = []
    out = Path(args.out)
    for variant in variants:
        model, acc, f1, seconds = train_one(variant, data, epochs, args.batch, args.lr, args.seed,
                                            not args.no_progress)
        params = sum(t.numel() for t in model.parameters())
        head_params = sum(t.numel() for t in model.blocks[0].attn.clustering.parameters())
        images = data[2][:num_images]
        with torch.no_grad():
            ex = paca_explain.explain(model, images)
        try:
            pngs = paca_explain.save_overlays(ex, images, out, max_images=num_images, num_clusters=4,
                                              prefix=f"digits_{variant}")
        except ImportError as e:  # matplotlib is optional: the table still comes out
            print(f"no heatmaps: {e}", file=sys.stderr)
            pngs = []
        rows.append((variant, params, head_params, acc, f1, seconds, len(pngs)))

    print("\n| clustering | params | clustering-head params | test accuracy | macro-F1 | train time |")
    print("|---|---|---|---|---|---|")
    for variant, params, head_params, acc, f1, seconds, _ in rows:
        print(f"| {variant} | {params:,} | {head_params:,} | {acc:.2%} | {f1:.3f} | {seconds:.1f} s |")
    print(f"\nheatmaps: {sum(r[6] for r in rows)} PNGs in {out.resolve()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
