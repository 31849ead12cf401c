"""paca_kernels::linear (csrc/cpu/fused/linear.cpp: packed weights, the dispatched products), PaCaViT's
classifier head in CPU inference, against F.linear in float64; and the head's plan (plan_linear)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from paca_kernels import create_model, testing
from paca_kernels.nn._fusion import plan_linear
from paca_kernels.ops.fused import linear as lin_op

pytestmark = pytest.mark.skipif(not lin_op.REGISTERED, reason="C++ extension not built")


def _exact(x, w, b):
    return F.linear(x.double(), w.double(), None if b is None else b.double())


# Rows split by columns (<= 32 rows) and by row blocks (more); O with a partial 16-column panel, K
# odd; PaCa-ViT-Tiny's head (384 -> 1000).
@pytest.mark.parametrize("rows", [1, 3, 32, 33, 197])
@pytest.mark.parametrize("K,O", [(37, 19), (384, 1000), (1, 16)])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_float32_against_float64(rows, K, O, with_bias):
    x = torch.randn(rows, K)
    w = torch.randn(O, K) / K**0.5
    b = torch.randn(O) if with_bias else None
    with testing.poisoned_outputs():
        out = lin_op.linear(x, w, b)
    assert out.shape == (rows, O) and out.dtype == torch.float32 and out.is_contiguous()
    testing.assert_close(out.double(), _exact(x, w, b), rtol=2e-5, atol=2e-5, name=f"{rows}x{K}->{O}")


def test_strided_batched_input_and_float64():
    x = torch.randn(2, 37, 5).transpose(1, 2)  # (2, 5, 37), last dim strided
    w, b = torch.randn(21, 37)[:, ::1], torch.randn(21)
    wt = torch.randn(37, 21).t()  # a transposed (non-contiguous) weight
    for weight in (w, wt):
        out = lin_op.linear(x, weight, b)
        assert out.shape == (2, 5, 21)
        testing.assert_close(out.double(), _exact(x, weight, b), rtol=2e-5, atol=2e-5, name="strided")
        testing.assert_close(lin_op.linear(x.double(), weight.double(), b.double()), _exact(x, weight, b),
                             rtol=1e-12, atol=1e-12, name="float64")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("rows", [1, 40])
def test_low_precision_within_flash_attention_rule(dtype, rows):
    """bf16 / fp16 x with weights in x's dtype or float32 (autocast's case): the error against
    float64 at most twice F.linear's in the same precision (under autocast for float32 weights)."""
    x = torch.randn(rows, 384).to(dtype)
    w32, b32 = torch.randn(1000, 384) / 20, torch.randn(1000)
    for w, b in ((w32.to(dtype), b32.to(dtype)), (w32, b32)):
        out = lin_op.linear(x, w, b)
        assert out.dtype == dtype
        if w.dtype == dtype:
            ref = F.linear(x, w, b)
        else:
            with torch.autocast("cpu", dtype=dtype):
                ref = F.linear(x, w, b)
        testing.assert_low_precision_ok(out, ref, _exact(x, w, b), name=f"{dtype} weight {w.dtype}")


def test_autocast_runs_in_the_autocast_dtype():
    x, w, b = torch.randn(2, 64), torch.randn(48, 64), torch.randn(48)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lin_op.linear(x, w, b)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, lin_op.linear(x.bfloat16(), w, b))


def test_weight_updates_are_seen():
    """The packed weight is reused while the weight is unchanged (PackCache): an in-place update
    (an optimizer step) is seen on the next call."""
    x, w, b = torch.randn(1, 64), torch.randn(48, 64), torch.randn(48)
    with torch.no_grad():
        for _ in range(3):
            lin_op.linear(x, w, b)
        w.mul_(2.0)
        testing.assert_close(lin_op.linear(x, w, b).double(), _exact(x, w, b), rtol=2e-5, atol=2e-5)


def test_empty_shapes():
    w, b = torch.randn(5, 3), torch.randn(5)
    assert lin_op.linear(torch.randn(0, 3), w, b).shape == (0, 5)
    out = lin_op.linear(torch.randn(2, 0), torch.randn(5, 0), b)  # an empty sum: the bias
    assert torch.equal(out, b.expand(2, 5))
    assert torch.equal(lin_op.linear(torch.randn(2, 0), torch.randn(5, 0), None), torch.zeros(2, 5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_deterministic_across_thread_counts(dtype):
    for rows in (1, 100):
        x, w, b = torch.randn(rows, 384).to(dtype), torch.randn(1000, 384), torch.randn(1000)
        testing.assert_same_bits_across_thread_counts(lambda x=x, w=w, b=b: lin_op.linear(x, w, b))


def test_errors():
    x = torch.randn(2, 8)
    with pytest.raises(RuntimeError, match="weight of shape"):
        lin_op.linear(x, torch.randn(4, 7), None)
    with pytest.raises(RuntimeError, match="bias of shape"):
        lin_op.linear(x, torch.randn(4, 8), torch.randn(5))
    with pytest.raises(RuntimeError, match="float64, float32, float16 or bfloat16"):
        lin_op.linear(x.int(), torch.randn(4, 8), None)
    with pytest.raises(RuntimeError, match="0-d"):
        lin_op.linear(torch.tensor(1.0), torch.randn(4, 1), None)
    with pytest.raises(RuntimeError, match="inference-only"):
        lin_op.linear(x, torch.randn(4, 8, requires_grad=True), None).sum().backward()


def test_opcheck():
    testing.opcheck_inference_only(torch.ops.paca_kernels.linear.default,
                                   (torch.randn(3, 13), torch.randn(7, 13), torch.randn(7)))


def test_classifier_head_plan(spy):
    """PaCaViT's head runs as the op in CPU inference, as its module with a hook on it, with
    gradients wanted or on another backend; the logits agree."""
    calls = spy(lin_op, "linear")
    torch.manual_seed(0)
    model = create_model("pacavit_tiny_p2cconv_100_0", num_classes=10, img_size=64).eval()
    ref = create_model("pacavit_tiny_p2cconv_100_0", num_classes=10, img_size=64, backend="reference").eval()
    ref.load_state_dict(model.state_dict())
    img = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        got = model(img)
        assert calls == [(2, 384)]
        testing.assert_close(got, ref(img), rtol=1e-4, atol=1e-4, name="logits")
        feats = torch.randn(2, 384)
        assert plan_linear(model.head, model.backend, feats) is not None
        assert plan_linear(ref.head, ref.backend, feats) is None
        seen = []
        h = model.head.register_forward_hook(lambda m, i, o: seen.append(o))
        assert plan_linear(model.head, model.backend, feats) is None
        model(img)
        h.remove()
        assert len(seen) == 1 and len(calls) == 1
        assert plan_linear(None, None, feats) is None
        # bf16 both ways: a bf16 model, and the float32 model under autocast (logits in bf16).
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = model(img)
            assert plan_linear(model.head, model.backend, feats) is not None
        assert auto.dtype == torch.bfloat16 and len(calls) == 2
        low = model.to(torch.bfloat16)(img.to(torch.bfloat16))
        assert low.dtype == torch.bfloat16 and len(calls) == 3
        model.float()
    assert plan_linear(model.head, model.backend, feats) is None  # grad mode, parameters require grad
