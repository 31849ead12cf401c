"""PaCaSegHead / PaCaSegmentor: against a step-by-step functional computation, gradients, the official
parameter and MAC figures."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from paca_kernels import ops
from paca_kernels.models import PaCaSegmentor
from paca_kernels.nn import seg_head
from paca_kernels.nn.seg_head import PaCaSegHead, pool_clusters


def _available(name: str) -> bool:
    return ops.get_backend(name).unavailable_reason() is None


BACKENDS = [
    "reference",
    pytest.param("cpu", marks=pytest.mark.skipif(not _available("cpu"), reason="C++ extension not built")),
    pytest.param("triton", marks=pytest.mark.skipif(not _available("triton"), reason="Triton unavailable")),
]


def _bn(x: torch.Tensor, bn: torch.nn.Module, training: bool) -> torch.Tensor:
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, training=False) \
        if not training else F.batch_norm(x, None, None, bn.weight, bn.bias, training=True)


def _cba(x: torch.Tensor, mod: torch.nn.Module, training: bool) -> torch.Tensor:
    """conv (no bias) -> BN -> ReLU, written out."""
    return torch.relu(_bn(F.conv2d(x, mod.conv.weight), mod.bn, training))


def _expected(head: PaCaSegHead, feats: list[torch.Tensor], training: bool) -> tuple[torch.Tensor, ...]:
    """The official head, step by step (softmax, bmm, einsum), independent of the ops."""
    size = feats[0].shape[2:]
    ups = [F.interpolate(_cba(f, conv, training), size=size, mode="bilinear", align_corners=False)
           for f, conv in zip(feats, head.convs, strict=True)]
    x = torch.cat(ups, dim=1)
    b, ch, h, w = x.shape
    q = _cba(x, head.q[0], training).reshape(b, -1, h * w).permute(0, 2, 1)  # (B, N, D)
    c_raw = F.conv2d(_cba(x, head.clustering[0], training), head.clustering[1].weight,
                     head.clustering[1].bias)
    s = torch.softmax(c_raw.reshape(b, -1, h * w), dim=-1)  # (B, K, N)
    z = torch.bmm(s, x.reshape(b, ch, h * w).permute(0, 2, 1))  # (B, K, L·D), no norm

    def kv(seq: torch.nn.Sequential) -> torch.Tensor:
        t = F.linear(z, seq[0].weight, seq[0].bias)  # (B, K, D)
        return torch.relu(_bn(t.permute(0, 2, 1), seq[2], training).permute(0, 2, 1))

    k, v = kv(head.k), kv(head.v)
    heads, d = head.num_heads, head.channels // head.num_heads
    qh = q.reshape(b, h * w, heads, d)
    kh, vh = k.reshape(b, -1, heads, d), v.reshape(b, -1, heads, d)
    attn = torch.softmax(torch.einsum("bnhd,bmhd->bhnm", qh, kh) * head.scale, dim=-1)
    o = torch.einsum("bhnm,bmhd->bnhd", attn, vh).reshape(b, h, w, -1).permute(0, 3, 1, 2)
    o = _cba(o, head.proj, training)
    out = F.conv2d(o, head.conv_seg.weight, head.conv_seg.bias)
    return out, c_raw


def _randomise_bn(head: torch.nn.Module) -> None:
    """Non-trivial BN statistics and affines, so eval mode is a real test."""
    for m in head.modules():
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_()


def _feats(dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    return [torch.randn(2, 8, 8, 6, dtype=dtype), torch.randn(2, 16, 4, 3, dtype=dtype),
            torch.randn(2, 24, 2, 2, dtype=dtype)]


def test_pool_clusters_matches_softmax_matmul(monkeypatch: pytest.MonkeyPatch) -> None:
    logits = torch.randn(2, 5, 30, dtype=torch.float64) * 3
    x = torch.randn(2, 30, 13, dtype=torch.float64) + 2.0  # a mean offset: μ must be recovered too
    expected = torch.softmax(logits, -1) @ x
    torch.testing.assert_close(pool_clusters(logits, x, backend="reference"), expected)
    monkeypatch.setattr(seg_head, "_POOL_CHUNK", 4)  # 13 channels in 4 chunks
    torch.testing.assert_close(pool_clusters(logits, x, backend="reference"), expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_heads", [1, 2])
def test_head_matches_step_by_step(backend: str, num_heads: int) -> None:
    head = PaCaSegHead([8, 16, 24], num_classes=5, channels=12, num_heads=num_heads, backend=backend)
    _randomise_bn(head)
    head.eval()
    feats = _feats()
    with torch.no_grad():
        out, c_raw = head(feats)
        exp_out, exp_c = _expected(head, feats, training=False)
    assert out.shape == (2, 5, 8, 6) and c_raw.shape == (2, 5, 8, 6)
    torch.testing.assert_close(c_raw, exp_c, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out, exp_out, rtol=1e-4, atol=1e-4)


def test_head_training_mode_and_gradients_float64() -> None:
    """Train mode (batch statistics), float64: outputs and every parameter gradient agree."""
    head = PaCaSegHead([8, 16, 24], num_classes=5, channels=12, dropout=0.0, backend="reference").double()
    _randomise_bn(head)
    head.train()
    feats = [f.requires_grad_() for f in _feats(torch.float64)]
    out, c_raw = head(feats)
    w = torch.randn_like(out)
    wc = torch.randn_like(c_raw)
    loss = (out * w).sum() + (c_raw * wc).sum()
    params = [p for p in head.parameters()]
    grads = torch.autograd.grad(loss, params + feats)
    exp_out, exp_c = _expected(head, feats, training=True)
    torch.testing.assert_close(out, exp_out)
    exp_loss = (exp_out * w).sum() + (exp_c * wc).sum()
    exp_grads = torch.autograd.grad(exp_loss, params + feats)
    for g, e in zip(grads, exp_grads, strict=True):
        torch.testing.assert_close(g, e)
    assert all(g.abs().sum() > 0 for g in grads)


def test_head_rejects_bad_inputs() -> None:
    head = PaCaSegHead([8, 16], num_classes=3, channels=4)
    with pytest.raises(ValueError, match="2 feature maps"):
        head([torch.randn(1, 8, 4, 4)])
    with pytest.raises(ValueError, match=r"\(B, 16, H, W\)"):
        head([torch.randn(1, 8, 4, 4), torch.randn(1, 15, 2, 2)])
    with pytest.raises(TypeError, match="floating"):
        head([torch.randn(1, 8, 4, 4), torch.ones(1, 16, 2, 2, dtype=torch.long)])
    with pytest.raises(ValueError, match="divisible"):
        PaCaSegHead([8], num_classes=3, channels=10, num_heads=3)


def test_segmentor_forward_loss_backward() -> None:
    model = PaCaSegmentor.from_name("pacavit_tiny_p2cconv_100_0", num_classes=4, channels=16,
                                    downstream_cluster_num=(3, 3, 3, 0))
    assert [b.attn.num_clusters for b in (model.backbone.stage1[0], model.backbone.stage4[0])] == [3, 0]
    images = torch.randn(2, 3, 64, 64)
    labels = torch.randint(0, 4, (2, 64, 64))
    labels[0, :4] = 255  # ignored
    losses = model.loss(images, labels)
    assert set(losses) == {"loss", "loss_seg", "loss_aux"} and torch.isfinite(losses["loss"])
    losses["loss"].backward()
    assert model.decode_head.clustering[1].weight.grad.abs().sum() > 0
    assert model.backbone.stage1[0].attn.clustering.clustering[4].weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        seg = model(images)
        seg4, clusters = model(images, upsample=False, return_cluster_logits=True)
    assert seg.shape == (2, 4, 64, 64) and seg4.shape == clusters.shape == (2, 4, 16, 16)


def test_official_params_and_macs_tiny() -> None:
    """Tiny at 512×512 with 200 downstream clusters, 256 channels, 150 classes: the official table says
    13.3M parameters and 34.4G; FlopCounterMode counts matmuls/convs only (the official counter adds
    norms and upsampling, about 0.16G here), so the MACs must land just under."""
    model = PaCaSegmentor.from_name("pacavit_tiny_p2cconv_100_0").eval()
    params = sum(p.numel() for p in model.parameters())
    assert round(params / 1e6, 1) == 13.3
    model = model.to("meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.empty(1, 3, 512, 512, device="meta"), upsample=False)
    macs = counter.get_total_flops() / 2 / 1e9
    assert 34.4 * 0.985 < macs < 34.4, macs
