"""paca_kernels::layer_norm (csrc/cpu/fused/layer_norm.cpp: the dispatched 8-lane LayerNorm rows),
the pre-norm block's first LayerNorm under CPU autocast, against torch's layer_norm in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from paca_kernels import testing
from paca_kernels.ops.fused import layer_norm as ln_op

pytestmark = pytest.mark.skipif(not ln_op.REGISTERED, reason="C++ extension not built")


def _exact(x, w, b, eps):
    d = None if w is None else w.double()
    e = None if b is None else b.double()
    return F.layer_norm(x.double(), (x.shape[-1],), d, e, eps)


# Widths that leave 8-lane tails (13, 37), one lane group (8), PaCa-ViT's (96, 320), one channel.
@pytest.mark.parametrize("C", [1, 8, 13, 37, 96, 320])
@pytest.mark.parametrize("affine", ["both", "weight", "bias", "none"])
def test_float32_against_float64(C, affine):
    x = torch.randn(3, 197, C) * 4 + 2
    w = 1 + 0.3 * torch.randn(C) if affine in ("both", "weight") else None
    b = 0.3 * torch.randn(C) if affine in ("both", "bias") else None
    with testing.poisoned_outputs():
        out = ln_op.layer_norm(x, w, b, 1e-5)
    assert out.dtype == torch.float32 and out.is_contiguous()
    testing.assert_close(out.double(), _exact(x, w, b, 1e-5), rtol=2e-5, atol=2e-5, name=f"C={C}")


def test_strided_input_and_float64():
    x = torch.randn(2, 37, 50).transpose(1, 2)  # (2, 50, 37), last dim strided
    w, b = torch.randn(37), torch.randn(37)
    testing.assert_close(ln_op.layer_norm(x, w, b, 1e-6).double(), _exact(x, w, b, 1e-6), rtol=2e-5,
                         atol=2e-5, name="strided")
    xd = x.double()
    testing.assert_close(ln_op.layer_norm(xd, w.double(), b.double(), 1e-6), _exact(x, w, b, 1e-6),
                         rtol=1e-12, atol=1e-12, name="float64")


def test_each_row_gets_the_bits_it_gets_alone():
    """The kernel normalises rows four at a time (interleaved dependency chains): a row's result
    does not depend on its neighbours, a bad row (inf, NaN, 1e30) included, nor on the row count."""
    x = torch.randn(2, 23, 37) * 3 + 1
    x[0, 1, 5] = float("nan")
    x[1, 2] *= 1e30
    x[1, 6, 0] = float("inf")
    w, b = torch.randn(37), torch.randn(37)
    out = ln_op.layer_norm(x, w, b, 1e-6)
    for i in range(2):
        for r in range(23):
            alone = ln_op.layer_norm(x[i, r : r + 1], w, b, 1e-6)[0]
            assert torch.equal(out[i, r].view(torch.int32), alone.view(torch.int32)), (i, r)


def test_rows_of_any_magnitude_and_bad_rows():
    """No overflow or underflow in the statistics (rows of 1e30, 1e-30), a constant row gives the
    bias, a row with inf or NaN gives NaN (as torch's)."""
    x = torch.randn(6, 29)
    x[0] *= 1e30
    x[1] *= 1e-30
    x[2] = 3.0
    x[3, 4] = float("inf")
    x[4, 7] = float("nan")
    w, b = torch.randn(29), torch.randn(29)
    out = ln_op.layer_norm(x, w, b, 1e-6)
    exact = _exact(x, w, b, 1e-6)
    assert out[3:5].isnan().all()
    testing.assert_close(out[[0, 1, 2, 5]].double(), exact[[0, 1, 2, 5]], rtol=2e-5, atol=2e-5)
    testing.assert_close(out[2], b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_float32_into_low_precision_is_the_rounded_float32_result(dtype):
    """dtype for float32 x: the float32 LayerNorm rounded once (autocast's cast fused)."""
    x = torch.randn(4, 100, 96) * 3
    w, b = torch.randn(96), torch.randn(96)
    out = ln_op.layer_norm(x, w, b, 1e-6, dtype)
    f32 = ln_op.layer_norm(x, w, b, 1e-6)
    assert out.dtype == dtype
    assert torch.equal(out, f32.to(dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_within_flash_attention_rule(dtype):
    x = (torch.randn(4, 100, 96) * 3).to(dtype)
    w, b = torch.randn(96).to(dtype), torch.randn(96).to(dtype)
    out = ln_op.layer_norm(x, w, b, 1e-6)
    ref = F.layer_norm(x, (96,), w, b, 1e-6)
    assert out.dtype == dtype
    testing.assert_low_precision_ok(out, ref, _exact(x, w, b, 1e-6), name="out")


def test_deterministic_across_thread_counts():
    x = torch.randn(3, 1000, 40)
    w, b = torch.randn(40), torch.randn(40)
    testing.assert_same_bits_across_thread_counts(lambda: ln_op.layer_norm(x, w, b, 1e-6))


def test_errors():
    x = torch.randn(2, 5, 8)
    with pytest.raises(RuntimeError, match="weight of shape"):
        ln_op.layer_norm(x, torch.randn(7), None, 1e-6)
    with pytest.raises(RuntimeError, match="bfloat16 / float16 for float32 x"):
        ln_op.layer_norm(x.bfloat16(), None, None, 1e-6, torch.float32)
    with pytest.raises(RuntimeError, match="C > 0"):
        ln_op.layer_norm(torch.randn(2, 0), None, None, 1e-6)
    with pytest.raises(RuntimeError, match="float64, float32, float16 or bfloat16"):
        ln_op.layer_norm(x.int(), None, None, 1e-6)


def test_opcheck():
    testing.opcheck_inference_only(torch.ops.paca_kernels.layer_norm.default,
                                   (torch.randn(2, 7, 13), torch.randn(13), torch.randn(13), 1e-5, torch.bfloat16))
