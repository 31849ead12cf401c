"""benchmarks/official_code.py: the stand-ins for timm/mmcv/mmengine compute what the originals do, and
(where a checkout of iVMCL/PaCaViT is at hand: PACA_OFFICIAL_SRC) the official code's model takes
paca_kernels' weights with strict=True and gives its logits."""

from __future__ import annotations

import os
from pathlib import Path

import official_code as oc
import pytest
import torch
import torch.nn.functional as F


def test_layernorm2d_is_channel_layernorm():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3, 4)
    ln = oc._LayerNorm2d(5, eps=1e-6)
    torch.nn.init.normal_(ln.weight)
    torch.nn.init.normal_(ln.bias)
    want = F.layer_norm(x.permute(0, 2, 3, 1), (5,), ln.weight, ln.bias, 1e-6).permute(0, 3, 1, 2)
    torch.testing.assert_close(ln(x), want)
    assert not torch.allclose(ln(x), F.layer_norm(x, (3, 4)))  # not the spatial LayerNorm


def test_registry_and_builders():
    reg = oc._Registry()
    reg.register_module("A", module=int)

    @reg.register_module()
    class B:
        pass

    assert "A" in reg and "B" in reg and "C" not in reg
    name, ln = oc._build_norm_layer({"type": "LN", "eps": 1e-6}, 7)
    assert name == "ln" and isinstance(ln, torch.nn.LayerNorm) and ln.eps == 1e-6
    assert isinstance(oc._build_norm_layer({"type": "LayerNorm2d"}, 7)[1], oc._LayerNorm2d)
    assert isinstance(oc._build_activation_layer({"type": "GELU"}), torch.nn.GELU)
    with pytest.raises(KeyError, match="Foo"):
        oc._build_norm_layer({"type": "Foo"}, 3)
    cm = oc._ConvModule(3, 8, 3, 2, 1, norm_cfg={"type": "BN"}, act_cfg={"type": "ReLU"})
    assert sorted(k for k in cm.state_dict() if not k.startswith("bn.num")) == [
        "bn.bias", "bn.running_mean", "bn.running_var", "bn.weight", "conv.weight"]  # bias="auto": none


def test_drop_path_scales_kept_samples():
    torch.manual_seed(0)
    dp = oc._DropPath(0.5).train()
    y = dp(torch.ones(400, 3))
    kept = y[:, 0] != 0
    assert 120 < int(kept.sum()) < 280 and torch.all(y[kept] == 2.0)
    assert torch.equal(dp.eval()(torch.ones(4, 3)), torch.ones(4, 3))


def test_official_model_matches(tmp_path):
    src = os.environ.get("PACA_OFFICIAL_SRC")
    if not src or not (Path(src) / "models" / "paca_vit.py").is_file():
        pytest.skip("no checkout of iVMCL/PaCaViT: set PACA_OFFICIAL_SRC to one to run this check")
    pytest.importorskip("einops")
    from paca_kernels import create_model

    torch.manual_seed(0)
    official = oc.create_official(src, "pacavit_tiny_p2cconv_100_0")
    ours = create_model("pacavit_tiny_p2cconv_100_0", backend="reference")
    assert oc.check_against(official, ours, torch.randn(1, 3, 224, 224)) <= 1e-4
