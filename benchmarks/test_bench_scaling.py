"""Scaling sweep: one stage-1 PaCa layer (Tiny: C = 96, h = 2, M = 100) against full multi-head
self-attention over the same patches (SDPA), from 224² to 1024² input (N = (S/4)²).

PaCa attention is linear in N, full self-attention quadratic; the report script plots time (and,
on CUDA, peak memory) against N.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from paca_kernels import PaCaAttention

SIZES = [224, 384, 512, 768, 1024]
PROVIDERS = ["paca", "full-sdpa"]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("size", SIZES, ids=[f"S{s}" for s in SIZES])
def test_scaling(benchmark, run, size: int, provider: str, device, dtype, smoke):
    if smoke and size != SIZES[0]:
        pytest.skip("smoke mode runs the smallest size only")
    benchmark.group = "scaling-stage1"
    side = (64 if smoke else size) // 4
    n, c, h, m = side * side, 96, 2, 100
    x = torch.randn(1, n, c, device=device, dtype=dtype)
    layer = PaCaAttention(c, h, m).to(device=device, dtype=dtype).eval()
    if provider == "paca":
        flops = 2 * m * n * c + 4 * n * m * c

        def step() -> None:
            with torch.no_grad():
                layer(x, side, side)
    else:
        flops = 4 * n * n * c
        q = x.view(1, n, h, c // h).transpose(1, 2)

        def step() -> None:
            with torch.no_grad():
                F.scaled_dot_product_attention(q, q, q)

    run(step, provider=provider, flops=flops, min_bytes=2 * x.numel() * x.element_size())
    benchmark.extra_info.update(N=n, image_size=size)
