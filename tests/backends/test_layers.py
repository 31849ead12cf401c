"""PaCaAttention on the GPU-capable backends (triton, cuda) against the same layer on the reference
backend: output, dx and every parameter gradient (the triton case also through torch.compile)."""

from __future__ import annotations

import pytest
import torch

from paca_kernels import PaCaAttention, ops
from paca_kernels.testing import assert_close, backend_device

# (backend, C, h, M, clustering kernel, H, W, compiled, (out, dx, parameter) tolerances)
CASES = [
    pytest.param("triton", 32, 2, 7, 3, 3, 5, True, (1e-5, 3e-5, 1e-4), id="triton-C32-h2-M7-k3-3x5-compiled"),
    pytest.param("cuda", 96, 2, 49, 7, 14, 14, False, (1e-4, 1e-4, 1e-3), id="cuda-C96-h2-M49-k7-14x14"),
]


@pytest.mark.parametrize(("name", "C", "h", "M", "k", "H", "W", "compiled", "tols"), CASES)
def test_paca_attention_matches_the_reference_backend(name, C, h, M, k, H, W, compiled, tols):
    reason = ops.get_backend(name).unavailable_reason()
    if reason is not None:
        pytest.skip(f"{name}: {reason}")
    device = backend_device(name)
    layer = PaCaAttention(C, h, M, clustering="conv", clustering_kernel_size=k, backend=name).to(device)
    ref = PaCaAttention(C, h, M, clustering="conv", clustering_kernel_size=k, backend="reference").to(device)
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(2, H * W, C, device=device)

    def step(mod, fn):
        mod.zero_grad()
        xx = x.clone().requires_grad_(True)
        out, z = fn(xx)
        (out.square().sum() + z.sum()).backward()
        return out.detach(), xx.grad, [p.grad.clone() for p in mod.parameters()]

    torch._dynamo.reset()
    fn = (lambda t: layer(t, H, W))
    if compiled:
        fn = torch.compile(fn, fullgraph=True, backend="aot_eager")
    got = step(layer, fn)
    want = step(ref, lambda t: ref(t, H, W))
    out_tol, dx_tol, p_tol = tols
    assert_close(got[0], want[0], rtol=out_tol, atol=out_tol, name="out")
    assert_close(got[1], want[1], rtol=dx_tol, atol=dx_tol, name="dx")
    for (pname, _), g, w in zip(layer.named_parameters(), got[2], want[2], strict=True):
        assert_close(g, w, rtol=p_tol, atol=p_tol, name=f"d{pname}")
