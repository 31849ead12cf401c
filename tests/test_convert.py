"""convert_paca_layers on a model built from an official-style PaCaLayer (same attributes, same
forward path through F.multi_head_attention_forward), written here because the official package
needs timm/mmcv/einops."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from paca_kernels import PaCaAttention, convert_paca_layers
from paca_kernels.nn import P2CConv2d, P2CLinear, P2CMlp
from paca_kernels.testing import assert_close


class PaCaLayer(nn.Module):
    """Structure and eval forward of the official PaCaLayer (attribute names matter for conversion)."""

    def __init__(self, dim: int, num_heads: int, clusters: int, head: type[nn.Module] = P2CConv2d,
                 onsite: bool = True, norm: bool = True, pos: bool = False) -> None:
        super().__init__()
        self.num_heads, self.num_clusters, self.onsite_clustering = num_heads, clusters, onsite
        if clusters > 0:
            self.cluster_norm = nn.LayerNorm(dim, eps=1e-6) if norm else nn.Identity()
            if onsite:
                self.clustering = head(dim=dim, num_clusters=clusters, mlp_ratio=2.0, kernel_size=3)
            self.cluster_pos_embed = pos
            if pos:
                self.cluster_pos_enc = nn.Parameter(torch.randn(1, clusters, dim) * 0.02)
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.attn_drop = 0.0
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)
        self.attn_viz = nn.Identity()

    def forward(self, x, H, W, z):
        if self.num_clusters > 0:
            if self.onsite_clustering:
                z = self.clustering(x, H, W).softmax(dim=-1)
            c = torch.einsum("bmn,bnc->bmc", z, x)
            if self.cluster_pos_embed:
                c = c + self.cluster_pos_enc
            c = self.cluster_norm(c)
        else:
            c = x
        out, _ = F.multi_head_attention_forward(
            query=x.transpose(0, 1), key=c.transpose(0, 1), value=c.transpose(0, 1),
            embed_dim_to_check=x.shape[-1], num_heads=self.num_heads,
            q_proj_weight=self.q.weight, k_proj_weight=self.k.weight, v_proj_weight=self.v.weight,
            in_proj_weight=None, in_proj_bias=torch.cat([self.q.bias, self.k.bias, self.v.bias]),
            bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0,
            out_proj_weight=self.proj.weight, out_proj_bias=self.proj.bias,
            use_separate_proj_weight=True, training=self.training, need_weights=not self.training,
            average_attn_weights=False,
        )
        return self.proj_drop(out.transpose(0, 1)), z


class Holder(nn.Module):
    """Any model holding PaCa layers (two blocks sharing the first one's assignment)."""

    def __init__(self, first: nn.Module, second: nn.Module) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.ModuleDict({"attn": first}), nn.ModuleDict({"attn": second})])

    def forward(self, x, H, W):
        a, z = self.blocks[0]["attn"](x, H, W, None)
        b, z = self.blocks[1]["attn"](x + a, H, W, z)
        return b, z


def _randomize(m: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return m


@pytest.mark.parametrize("head", [P2CConv2d, P2CMlp, P2CLinear], ids=["conv", "mlp", "linear"])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_convert_model_matches_official(head, backend):
    first = _randomize(PaCaLayer(24, 2, 5, head=head))
    second = _randomize(PaCaLayer(24, 2, 5, onsite=False, pos=True))
    model = Holder(first, second).eval()
    x = torch.randn(2, 12, 24)
    with torch.no_grad():
        want = model(x, 3, 4)
        out = convert_paca_layers(model, backend=backend)
        assert out is model
        assert all(isinstance(blk["attn"], PaCaAttention) for blk in model.blocks)
        assert model.blocks[0]["attn"].backend == backend
        got = model(x, 3, 4)
    assert_close(got[0], want[0], rtol=1e-4, atol=1e-5)
    assert_close(got[1], want[1], rtol=1e-4, atol=1e-6)


def test_convert_fixture_layer_and_self_attention(compat_dir):
    data = torch.load(compat_dir / "paca_layer_conv.pt", weights_only=True)
    cfg = data["config"]
    official = PaCaLayer(cfg["dim"], cfg["num_heads"], cfg["clusters"])
    official.clustering = P2CConv2d(cfg["dim"], cfg["clusters"], kernel_size=cfg["clustering_kernel_size"])
    official.load_state_dict(data["state_dict"], strict=True)
    layer = convert_paca_layers(official.eval())
    assert isinstance(layer, PaCaAttention) and not layer.training
    with torch.no_grad():
        out, z = layer(data["input"], cfg["H"], cfg["W"])
    assert_close(out, data["output"], rtol=1e-5, atol=1e-5)
    assert_close(z, data["assignment"], rtol=1e-5, atol=1e-6)
    # M = 0: self-attention layers convert too.
    sa = _randomize(PaCaLayer(16, 4, 0)).eval()
    x = torch.randn(2, 6, 16)
    with torch.no_grad():
        want = sa(x, 2, 3, None)[0]
        got = convert_paca_layers(sa)(x, 2, 3)[0]
    assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_convert_keeps_attn_viz_hooks():
    official = _randomize(PaCaLayer(8, 2, 3)).eval()
    seen = []
    official.attn_viz.register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    layer = convert_paca_layers(official)
    with torch.no_grad():
        layer(torch.randn(1, 4, 8), 2, 2)
    assert seen == [torch.Size([1, 2, 4, 3])]
