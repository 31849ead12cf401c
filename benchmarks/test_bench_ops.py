"""Op-level benchmarks: cluster_pool and p2c_attention, forward and forward + backward.

One group per op, mode and shape; one test per provider: the reference in eager PyTorch, the reference
under torch.compile (default; and max-autotune on CUDA), SDPA and xformers for the attention, and
every paca_kernels backend that can serve the call. A provider that cannot run is skipped with why.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from shapes import Shape, stage_shapes

from paca_kernels import ops, reference

MODES = ["fwd", "fwd+bwd"]
BACKENDS = [n for n in ops.backend_names() if n != "reference"]
POOL_PROVIDERS = ["reference", "reference-compiled", "reference-max-autotune", *BACKENDS]
ATTN_PROVIDERS = ["reference", "reference-compiled", "reference-max-autotune", "sdpa", "xformers",
                  *BACKENDS]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "shape" in metafunc.fixturenames:
        smoke = bool(metafunc.config.getoption("benchmark_disable", default=False))
        dev = metafunc.config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")
        shapes = stage_shapes(torch.device(dev).type, smoke)
        metafunc.parametrize("shape", shapes, ids=[s.id for s in shapes])


def _compiled(fn: Callable, provider: str, device: torch.device, compile_fn: Callable) -> Callable:
    if provider == "reference":
        return fn
    if provider == "reference-max-autotune":
        if device.type != "cuda":
            pytest.skip("max-autotune is benchmarked on CUDA only")
        return compile_fn(fn, mode="max-autotune-no-cudagraphs")
    return compile_fn(fn)


def _bench(run, fn: Callable, inputs: list[torch.Tensor], mode: str, provider: str,
           flops_fwd: int, bytes_fwd: int, bytes_bwd: int) -> None:
    if mode == "fwd":
        def step() -> None:
            with torch.no_grad():
                fn(*inputs)
        run(step, provider=provider, flops=flops_fwd, min_bytes=bytes_fwd)
        return
    for t in inputs:
        t.requires_grad_(True)
    grad = torch.randn_like(fn(*inputs))

    def step() -> None:
        for t in inputs:
            t.grad = None
        fn(*inputs).backward(grad)
    run(step, provider=provider, flops=3 * flops_fwd, min_bytes=bytes_fwd + bytes_bwd)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", POOL_PROVIDERS)
def test_cluster_pool(benchmark, run, shape: Shape, provider: str, mode: str, device, dtype, compile_fn):
    benchmark.group = f"cluster_pool-{mode}-{shape.id}"
    s = shape
    logits = torch.randn(s.B, s.M, s.N, device=device, dtype=dtype) * 3
    x = torch.randn(s.B, s.N, s.C, device=device, dtype=dtype)
    w = torch.randn(s.C, device=device, dtype=dtype)
    b = torch.randn(s.C, device=device, dtype=dtype)
    if provider in BACKENDS:
        reasons = ops.get_backend(provider).not_supported_reasons("cluster_pool", (logits, x))
        if reasons:
            pytest.skip(f"{provider}: {'; '.join(reasons)}")
        fn = lambda lg, xx, ww, bb: ops.cluster_pool(lg, xx, ww, bb, backend=provider)
    else:
        fn = _compiled(reference.cluster_pool, provider, device, compile_fn)
    e = logits.element_size()
    flops = 2 * s.B * s.M * s.N * s.C
    bytes_fwd = e * (s.B * s.M * s.N + s.B * s.N * s.C + s.B * s.M * s.C)
    # backward: read dZ, logits, x; write dlogits, dx
    bytes_bwd = e * (s.B * s.M * s.C + 2 * s.B * s.M * s.N + 2 * s.B * s.N * s.C)
    _bench(run, fn, [logits, x, w, b], mode, provider, flops, bytes_fwd, bytes_bwd)


def _sdpa(q, k, v):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", ATTN_PROVIDERS)
def test_p2c_attention(benchmark, run, shape: Shape, provider: str, mode: str, device, dtype, compile_fn):
    benchmark.group = f"p2c_attention-{mode}-{shape.id}"
    s = shape
    q = torch.randn(s.B, s.N, s.h, s.d, device=device, dtype=dtype)
    k = torch.randn(s.B, s.M, s.h, s.d, device=device, dtype=dtype)
    v = torch.randn(s.B, s.M, s.h, s.d, device=device, dtype=dtype)
    if provider in BACKENDS:
        reasons = ops.get_backend(provider).not_supported_reasons("p2c_attention", (q, k, v))
        if reasons:
            pytest.skip(f"{provider}: {'; '.join(reasons)}")
        fn = lambda a, b, c: ops.p2c_attention(a, b, c, backend=provider)
    elif provider == "sdpa":
        fn = _sdpa
    elif provider == "xformers":
        xops = pytest.importorskip("xformers.ops", reason="xformers is not installed")
        if device.type != "cuda":
            pytest.skip("xformers memory_efficient_attention is benchmarked on CUDA only")
        fn = xops.memory_efficient_attention
    else:
        fn = _compiled(reference.p2c_attention, provider, device, compile_fn)
    e = q.element_size()
    flops = 4 * s.B * s.h * s.N * s.M * s.d
    qn, kn = s.B * s.N * s.C, s.B * s.M * s.C
    bytes_fwd = e * (2 * qn + 2 * kn)
    bytes_bwd = e * (4 * qn + 4 * kn)  # read q, out, dout, k, v; write dq, dk, dv
    _bench(run, fn, [q, k, v], mode, provider, flops, bytes_fwd, bytes_bwd)
