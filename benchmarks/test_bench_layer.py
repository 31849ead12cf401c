"""Layer-level benchmarks: a whole PaCaAttention (conv clustering) against the official layer's path.

Providers: "official" (the official PaCaLayer's eval forward: softmax, einsum, LayerNorm, then
F.multi_head_attention_forward with the per-head attention weights returned), "official-compiled",
and PaCaAttention with each paca_kernels backend, eager and compiled. Same weights everywhere.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from shapes import Shape, stage_shapes

from paca_kernels import PaCaAttention, ops

PROVIDERS = ["official", "official-compiled"] + [
    f"paca-{b}{suffix}" for b in ops.backend_names() for suffix in ("", "-compiled")
]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "shape" in metafunc.fixturenames:
        smoke = bool(metafunc.config.getoption("benchmark_disable", default=False))
        dev = metafunc.config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")
        shapes = stage_shapes(torch.device(dev).type, smoke)[:3 if not smoke else 1]
        metafunc.parametrize("shape", shapes, ids=[s.id for s in shapes])


def official_forward(layer: PaCaAttention, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """The official PaCaLayer.forward in eval mode, on ``layer``'s weights."""
    z = layer.clustering(x, H, W).softmax(dim=-1)
    c = layer.cluster_norm(torch.einsum("bmn,bnc->bmc", z, x))
    out, _ = F.multi_head_attention_forward(
        query=x.transpose(0, 1), key=c.transpose(0, 1), value=c.transpose(0, 1),
        embed_dim_to_check=x.shape[-1], num_heads=layer.num_heads,
        q_proj_weight=layer.q.weight, k_proj_weight=layer.k.weight, v_proj_weight=layer.v.weight,
        in_proj_weight=None, in_proj_bias=torch.cat([layer.q.bias, layer.k.bias, layer.v.bias]),
        bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0,
        out_proj_weight=layer.proj.weight, out_proj_bias=layer.proj.bias,
        use_separate_proj_weight=True, training=False, need_weights=True, average_attn_weights=False,
    )
    return out.transpose(0, 1)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_paca_attention_layer(benchmark, run, shape: Shape, provider: str, device, dtype, compile_fn):
    benchmark.group = f"PaCaAttention-fwd-{shape.id}"
    s = shape
    layer = PaCaAttention(s.C, s.h, s.M, clustering="conv").to(device=device, dtype=dtype).eval()
    x = torch.randn(s.B, s.N, s.C, device=device, dtype=dtype)
    if provider.startswith("official"):
        fn = lambda t: official_forward(layer, t, s.H, s.W)
    else:
        backend = provider.removeprefix("paca-").removesuffix("-compiled")
        reasons = (ops.get_backend(backend).not_supported_reasons("cluster_pool", (x, x))
                   + ops.get_backend(backend).not_supported_reasons("p2c_attention", (x, x)))
        if reasons:
            pytest.skip(f"{backend}: {'; '.join(dict.fromkeys(reasons))}")
        layer.backend = backend
        fn = lambda t: layer(t, s.H, s.W)[0]
    if provider.endswith("-compiled"):
        fn = compile_fn(fn)
    with torch.no_grad():
        ref = official_forward(layer, x, s.H, s.W)
        torch.testing.assert_close(fn(x), ref, rtol=2e-2, atol=2e-2)

    def step() -> None:
        with torch.no_grad():
            fn(x)

    # FLOPs of the attention core (pooling and the two attention matmuls) plus the four projections.
    flops = 2 * s.B * s.M * s.N * s.C + 4 * s.B * s.N * s.M * s.C + 2 * s.C * s.C * (2 * s.B * s.N + 2 * s.B * s.M)
    run(step, provider=provider, flops=flops, min_bytes=x.element_size() * 2 * x.numel())
