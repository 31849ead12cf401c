"""paca_kernels.explain: recorded assignments and attention against explicit formulas, outputs
unchanged, hooks removed, importance masks, PNG overlays."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import paca_kernels
from paca_kernels import explain as E
from paca_kernels.nn import PaCaAttention, PaCaSegHead


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


class _OneLayer(nn.Module):
    """Images (B, C, H, W) -> one PaCaAttention over the pixels as tokens."""

    def __init__(self, dim: int = 8, heads: int = 2, clusters: int = 5) -> None:
        super().__init__()
        self.attn = PaCaAttention(dim, heads, clusters, clustering="mlp")

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.attn(self.tokens(x), x.shape[2], x.shape[3])
        return out


@pytest.fixture(scope="module")
def tiny() -> nn.Module:
    torch.manual_seed(0)
    return paca_kernels.create_model("pacavit_tiny_p2cconv_100_0", num_classes=7).eval()


def test_one_layer_against_explicit_formulas() -> None:
    model = _OneLayer().eval()
    x = torch.randn(2, 8, 4, 6)
    with torch.no_grad():
        ex = E.explain(model, x, attention=True)
        t = model.tokens(x)
        a = model.attn
        logits = a.clustering(t, 4, 6)  # (B, M, N)
        s = torch.softmax(logits, dim=-1)
        c = F.layer_norm(s @ t, (8,), a.cluster_norm.weight, a.cluster_norm.bias, 1e-6)
        q = a.q(t).reshape(2, 24, 2, 4).transpose(1, 2)  # (B, h, N, d)
        k = a.k(c).reshape(2, 5, 2, 4).transpose(1, 2)  # (B, h, M, d)
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(4), dim=-1)  # (B, h, N, M)
    assert list(ex.cluster_logits) == ["attn"] and ex.grids["attn"] == (4, 6)
    torch.testing.assert_close(ex.assignment("attn"), s.reshape(2, 5, 4, 6))
    torch.testing.assert_close(ex.attention["attn"], attn)
    torch.testing.assert_close(ex.attention_maps("attn"), attn.transpose(2, 3).reshape(2, 2, 5, 4, 6))
    # importance: (N/M)·Σ_m S[m, n], mean 1 per image
    imp = ex.importance("attn")
    torch.testing.assert_close(imp, s.sum(1).reshape(2, 4, 6) * 24 / 5)
    torch.testing.assert_close(imp.mean(dim=(1, 2)), torch.ones(2))
    assert torch.equal(ex.hard_assignment("attn"), s.argmax(1).reshape(2, 4, 6))


def test_outputs_unchanged_and_hooks_removed(tiny: nn.Module) -> None:
    x = torch.randn(2, 3, 64, 64)
    before = _hook_count(tiny)
    with torch.no_grad():
        ref = tiny(x)
        ex = E.explain(tiny, x)
        # Clustering hooks only read; but a hooked conv head runs as its modules instead of the
        # fused CPU kernel (which would bypass the hooks): same math, rounding-level differences.
        torch.testing.assert_close(ex.output, ref, rtol=1e-5, atol=1e-6)
        ex_attn = E.explain(tiny, x, attention=True)
        # attention maps switch the layers to the explicit path: same math, so close
        torch.testing.assert_close(ex_attn.output, ref, rtol=1e-5, atol=1e-5)
    assert _hook_count(tiny) == before == 0
    assert not any(m.attn_viz._forward_hooks for m in tiny.modules() if isinstance(m, PaCaAttention))
    # stage-wise clustering: one assignment per stage with clusters (stage 4 is plain MHSA)
    assert {k: tuple(v.shape) for k, v in ex.clusters.items()} == {
        "stage1.0.attn": (2, 100, 16, 16), "stage2.0.attn": (2, 100, 8, 8), "stage3.0.attn": (2, 100, 4, 4)}
    for maps in ex.clusters.values():
        torch.testing.assert_close(maps.sum(dim=(2, 3)), torch.ones(maps.shape[:2]))
    assert ex_attn.attention["stage1.1.attn"].shape == (2, 2, 256, 100)
    assert ex_attn.attention["stage4.0.attn"].shape == (2, 16, 4, 4)  # M = 0: over the patches
    assert ex_attn.grids["stage3.2.attn"] == (4, 4)  # inferred from the image for sharing layers


def test_hooks_removed_on_error(tiny: nn.Module) -> None:
    with pytest.raises(ValueError, match="divisible"):
        E.explain(tiny, torch.randn(1, 3, 40, 40), attention=True)
    assert _hook_count(tiny) == 0


def test_layers_filter_and_to_cpu(tiny: nn.Module) -> None:
    with torch.no_grad():
        ex = E.explain(tiny, torch.randn(1, 3, 64, 64), attention=True, layers=["stage2"], to_cpu=True)
    assert list(ex.cluster_logits) == ["stage2.0.attn"]
    assert set(ex.attention) == {"stage2.0.attn", "stage2.1.attn"}
    assert ex.cluster_logits["stage2.0.attn"].device.type == "cpu"


def test_importance_mask_and_masked_images() -> None:
    model = _OneLayer().eval()
    x = torch.randn(3, 8, 4, 6)
    with torch.no_grad():
        ex = E.explain(model, x)
    imp = ex.importance()  # default: the first recorded layer
    mask = ex.importance_mask(keep_ratio=0.25, size=(8, 12))
    assert mask.shape == (3, 1, 8, 12)
    small = mask[:, 0, ::2, ::2]  # nearest upsampling by 2: every 2×2 block is one patch
    for b in range(3):
        top = imp[b].flatten().topk(6).indices  # 25 % of 24 patches
        expected = torch.zeros(24)
        expected[top] = 1
        assert torch.equal(small[b].flatten(), expected)
    images = torch.randn(3, 3, 8, 12)
    masked = ex.masked_images(images, keep_ratio=0.25)
    assert torch.equal(masked, images * mask)
    with pytest.raises(ValueError, match="keep_ratio"):
        ex.importance_mask(keep_ratio=0.0)
    with pytest.raises(KeyError, match="no cluster assignment recorded for 'nope'"):
        ex.assignment("nope")
    with pytest.raises(KeyError, match="attention=True"):
        ex.attention_maps("attn")


def test_teacher_and_seg_head_recorded() -> None:
    teacher = paca_kernels.create_model("pacavit_convmixer_tiny_100", num_classes=3).eval()
    with torch.no_grad():
        ex = E.explain(teacher, torch.randn(1, 3, 64, 64))
    assert list(ex.cluster_logits) == [f"paca_teacher.to_clusters{i}" for i in range(1, 5)]
    assert ex.assignment("paca_teacher.to_clusters4").shape == (1, 100, 2, 2)

    class Seg(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = PaCaSegHead([4, 6], num_classes=3, channels=8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head([x[:, :4], F.avg_pool2d(x[:, :6], 2)])[0]

    seg = Seg().eval()
    x = torch.randn(2, 6, 8, 8)
    with torch.no_grad():
        ex = E.explain(seg, x)
        _, c_raw = seg.head([x[:, :4], F.avg_pool2d(x[:, :6], 2)])
    torch.testing.assert_close(ex.assignment("head.clustering"),
                               torch.softmax(c_raw.flatten(2), -1).reshape(2, 3, 8, 8))


def test_infer_grid() -> None:
    assert E._infer_grid(3136, (224, 224)) == (56, 56)
    assert E._infer_grid(16 * 20, (512, 640)) == (16, 20)
    assert E._infer_grid(49, None) == (7, 7)
    with pytest.raises(ValueError, match="cannot infer"):
        E._infer_grid(7, None)


def test_explain_rejects_bad_inputs(tiny: nn.Module) -> None:
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        E.explain(tiny, torch.randn(3, 64, 64))
    with pytest.raises(TypeError, match="nn.Module"):
        E.PaCaRecorder("model")  # type: ignore[arg-type]


def test_save_overlays_writes_pngs(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    model = _OneLayer(dim=3, heads=1, clusters=4).eval()
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        ex = E.explain(model, x)
    paths = E.save_overlays(ex, x, tmp_path / "png", num_clusters=2, mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2))
    assert [p.name for p in paths] == ["paca_img0_attn.png", "paca_img1_attn.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 1000
