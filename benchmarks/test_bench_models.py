"""Model-level benchmarks: PaCa-ViT Tiny, Small and Base, inference (images/s) and a training step
(forward, backward, AdamW step), per backend, eager and compiled."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from paca_kernels import create_model, ops

MODELS = ["pacavit_tiny_p2cconv_100_0", "pacavit_small_p2cconv_100_0", "pacavit_base_p2cconv_100_0"]
PROVIDERS = [f"{b}{suffix}" for b in ops.backend_names() for suffix in ("", "-compiled")]


def _setup(name: str, provider: str, device, dtype, smoke: bool, train: bool, compile_fn):
    backend = provider.removesuffix("-compiled")
    probe = torch.randn(1, 2, 3, device=device, dtype=dtype)
    reasons = ops.get_backend(backend).not_supported_reasons("cluster_pool", (probe, probe))
    reasons += ops.get_backend(backend).not_supported_reasons("p2c_attention", (probe[None], probe[None]))
    if reasons:
        pytest.skip(f"{backend}: {'; '.join(dict.fromkeys(reasons))}")
    if smoke and name != MODELS[0]:
        pytest.skip("smoke mode runs the tiny model only")
    batch = 2 if smoke else (64 if device.type == "cuda" else 8)
    size = 64 if smoke else 224
    model = create_model(name, backend=backend).to(device=device, dtype=dtype)
    model.train(train)
    images = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(images[:1])
    flops = fc.get_total_flops() * batch * (3 if train else 1)
    fwd = compile_fn(model) if provider.endswith("-compiled") else model
    return model, fwd, images, flops


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("name", MODELS)
def test_inference(benchmark, run, name: str, provider: str, device, dtype, smoke, compile_fn):
    benchmark.group = f"inference-{name}"
    _, fwd, images, flops = _setup(name, provider, device, dtype, smoke, train=False, compile_fn=compile_fn)

    def step() -> None:
        with torch.no_grad():
            fwd(images)

    run(step, provider=provider, flops=flops, min_bytes=images.numel() * images.element_size())
    if benchmark.stats:
        benchmark.extra_info["images_per_s"] = images.shape[0] / benchmark.stats.stats.median


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("name", MODELS)
def test_train_step(benchmark, run, name: str, provider: str, device, dtype, smoke, compile_fn):
    benchmark.group = f"train-step-{name}"
    model, fwd, images, flops = _setup(name, provider, device, dtype, smoke, train=True, compile_fn=compile_fn)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    target = torch.randint(0, 1000, (images.shape[0],), device=device)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(fwd(images).float(), target).backward()
        opt.step()

    run(step, provider=provider, flops=flops, min_bytes=images.numel() * images.element_size())
    if benchmark.stats:
        benchmark.extra_info["images_per_s"] = images.shape[0] / benchmark.stats.stats.median
