"""The inference-only fused ops' autograd kernel (csrc/registration.cpp, ``inference_only_autograd``).

It runs on every call outside ``torch.inference_mode`` (also under ``torch.no_grad``, where the
layers call these ops), so it is C++: under no_grad the op gives a plain tensor, in grad mode with
an input that requires grad its outputs get a node whose backward raises a clear error.
"""

from __future__ import annotations

import pytest
import torch
from test_conv_paca_layer import _inputs as _layer_inputs  # tests/ops is on sys.path (pytest prepend)

from paca_kernels import _ext, testing

pytestmark = pytest.mark.skipif(not _ext.load(), reason="C++ extension not built")

INFERENCE_ONLY = ("conv_cluster_logits", "mlp_fused", "p2c_attention_proj", "patch_embed", "conv_paca_layer",
                  "layer_norm", "linear")


@pytest.mark.parametrize("name", INFERENCE_ONLY)
def test_autograd_kernel_is_the_cpp_one(name):
    """Not a Python formula (torch.library.register_autograd): that one cost 7 us per call under
    no_grad. The dispatcher names the file that registered each kernel."""
    table = torch._C._dispatch_dump(f"paca_kernels::{name}")
    line = next(s for s in table.splitlines() if s.startswith("Autograd"))
    assert "registration.cpp" in line, table


def _mlp_args(requires_grad: bool) -> tuple:
    hidden, C = 24, 16
    ts = [torch.randn(hidden, C) / 4, torch.randn(hidden), torch.randn(hidden, 1, 3, 3) / 3,
          torch.randn(hidden), torch.randn(C, hidden) / 5, torch.randn(C)]
    w1, b1, dw, db, w2, b2 = (t.requires_grad_(requires_grad) for t in ts)
    return (torch.randn(2, 12, C), 3, 4, w1, b1, dw, db, True, True, w2, b2)


def test_no_grad_gives_plain_tensors_with_the_kernels_bits():
    """Parameters that require grad, under no_grad: the kernel's output, no graph."""
    args = _mlp_args(requires_grad=True)
    op = torch.ops.paca_kernels.mlp_fused
    with torch.no_grad():
        out = op(*args)
    with torch.inference_mode():
        want = op(*args)
    assert out.grad_fn is None and not out.requires_grad
    assert torch.equal(out, want) and not out.isnan().any()


def test_grad_mode_defers_the_error_to_the_backward():
    """With grad mode on: no graph for inputs that need no grad; an input that does gives outputs
    whose backward raises, naming the op and what runs instead (the forward itself works, so
    a call with a module's parameters outside no_grad still gives the values)."""
    op = torch.ops.paca_kernels.mlp_fused
    plain = op(*_mlp_args(requires_grad=False))
    assert plain.grad_fn is None
    args = _mlp_args(requires_grad=True)
    out = op(*args)
    assert out.requires_grad and out.grad_fn is not None
    with torch.no_grad():
        assert torch.equal(out, op(*args))
    with pytest.raises(RuntimeError, match="mlp_fused is inference-only .* Mlp runs its modules"):
        out.sum().backward()


def test_every_output_of_a_two_output_op_refuses_the_backward():
    a = _layer_inputs((2, 3, 4, 12, 2, 5, 3))
    a = a._replace(x=a.x.clone().requires_grad_())
    out, assign = torch.ops.paca_kernels.conv_paca_layer(*a)
    for t in (out, assign):
        assert t.grad_fn is not None
        with pytest.raises(RuntimeError, match="conv_paca_layer is inference-only"):
            t.sum().backward()


def test_compile_under_no_grad_sees_the_op():
    """torch.compile traces through the C++ autograd kernel to the fake kernel."""
    args = _mlp_args(requires_grad=True)
    op = torch.ops.paca_kernels.mlp_fused
    with torch.no_grad():
        want = op(*args)
        got = torch.compile(lambda *a: op(*a), fullgraph=True, backend="aot_eager")(*args)
    testing.assert_close(got, want, rtol=0, atol=0)
