"""PaCaBlock's first half in CPU inference (nn/_fusion.py, plan_attention_residual): x is passed to
the attention as its residual (added by the fused op as it writes its output), norm1 as
ops.fused.layer_norm (under bf16 autocast into bf16); every other case runs the modules and
PyTorch's add.
(The second half, x + mlp(norm2(x)) in mlp_fused: tests/ops/test_mlp_fused.py.)"""

from __future__ import annotations

import pytest
import torch

import paca_kernels.ops.fused.layer_norm as ln_op
from paca_kernels import _ext, create_model, testing
from paca_kernels.nn import PaCaBlock, _fusion
from paca_kernels.nn import block as block_mod
from paca_kernels.nn._fusion import plan_attention_residual, plan_block

pytestmark = pytest.mark.skipif(not _ext.load(), reason="C++ extension not built")


def _pair(**kw) -> tuple[PaCaBlock, PaCaBlock]:
    torch.manual_seed(0)
    cfg = kw.pop("paca_cfg", None)
    fused = PaCaBlock(24, 2, paca_cfg=cfg, backend="cpu", **kw).eval()
    ref = PaCaBlock(24, 2, paca_cfg=cfg, backend="reference", **kw).eval()
    with torch.no_grad():
        for p in fused.parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.dim() == 1 else 0.0))
    ref.load_state_dict(fused.state_dict())
    return fused, ref


# On-site conv clustering (the whole-layer op), a given assignment (cluster_pool + attention op),
# no clusters (self-attention: the attention op with c = x).
CFGS = {"onsite": None, "given": {"onsite_clustering": False}, "self": {"clusters": 0}}


@pytest.mark.parametrize("cfg", list(CFGS), ids=list(CFGS))
def test_block_output_and_residual_path(cfg, monkeypatch, spy):
    calls = spy(ln_op, "layer_norm")
    fused, ref = _pair(paca_cfg=CFGS[cfg])
    x = torch.randn(2, 6 * 5, 24)
    z = torch.softmax(torch.randn(2, 100, 30), -1) if cfg == "given" else None
    seen = []
    real = fused.attn.forward
    monkeypatch.setattr(fused.attn, "forward", lambda *a, **k: seen.append(k.get("residual") is not None)
                        or real(*a, **k))
    with torch.no_grad():
        got, want = fused(x, 6, 5, z)[0], ref(x, 6, 5, z)[0]
    assert seen == [True] and calls == [(2, 30, 24)]
    testing.assert_close(got, want, rtol=2e-5, atol=2e-5, name=cfg)


def test_block_under_bf16_autocast_normalises_into_bf16(spy):
    """Under autocast: norm1 by ops.fused.layer_norm into bf16, the stream and the output float32,
    within FlashAttention's rule of the reference block under the same autocast."""
    calls = spy(ln_op, "layer_norm")
    fused, ref = _pair()
    x = torch.randn(2, 6 * 5, 24)
    with torch.no_grad():
        exact = ref.double()(x.double(), 6, 5)[0]
        ref.float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got, want = fused(x, 6, 5)[0], ref(x, 6, 5)[0]
    assert calls == [(2, 30, 24)]
    assert got.dtype == torch.float32 and want.dtype == torch.float32
    testing.assert_low_precision_ok(got, want, exact, name="autocast block")


def test_modules_half_where_the_plan_says_no():
    x = torch.randn(1, 4 * 4, 24)
    with torch.no_grad():
        fused, ref = _pair()
        assert plan_attention_residual(fused, x)
        want = ref(x, 4, 4)[0]
        # A hook on the attention module (its output would include the residual), the norm, the
        # drop path: the modules, and the hook sees what it saw before.
        for mod in (fused.attn, fused.norm1_before, fused.drop_path1):
            seen = []
            h = mod.register_forward_hook(lambda m, i, o, seen=seen: seen.append(o))
            assert not plan_attention_residual(fused, x)
            testing.assert_close(fused(x, 4, 4)[0], want, rtol=2e-5, atol=2e-5)
            h.remove()
            assert len(seen) == 1
        # Hooks inside the attention: the residual path still, the maps still come.
        h = fused.attn.attn_viz.register_forward_hook(lambda *a: None)
        assert plan_attention_residual(fused, x)
        h.remove()
        assert not plan_attention_residual(_pair(layer_scale=1e-2)[0], x)
        assert not plan_attention_residual(_pair(post_norm=True)[0], x)
        with torch.autocast("cpu", dtype=torch.float16):
            assert not plan_attention_residual(fused, x)
        dp = _pair(drop_path=0.1)[0]
        assert plan_attention_residual(dp, x)
        dp.train()
        assert not plan_attention_residual(dp, x)
    # Gradients wanted: the modules.
    xg = x.clone().requires_grad_()
    assert not plan_attention_residual(fused, xg)
    fused(xg, 4, 4)[0].sum().backward()
    assert xg.grad is not None


def test_block_returns_attention_maps_on_the_residual_path():
    fused, ref = _pair()
    x = torch.randn(1, 4 * 4, 24)
    with torch.no_grad():
        out, _, attn = fused(x, 4, 4, return_attn=True)
        out_r, _, attn_r = ref(x, 4, 4, return_attn=True)
    testing.assert_close(out, out_r, rtol=2e-5, atol=2e-5)
    testing.assert_close(attn, attn_r, rtol=2e-5, atol=2e-5)


def test_model_in_every_dtype_matches_the_reference_backend():
    """PaCa-ViT-Tiny at 64²: float32 within 2e-5 of the reference backend, bf16 and autocast by
    FlashAttention's rule against float64."""
    torch.manual_seed(0)
    ref = create_model("pacavit_tiny_p2cconv_100_0", backend="reference").eval()
    cpu = create_model("pacavit_tiny_p2cconv_100_0", backend="cpu").eval()
    cpu.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        testing.assert_close(cpu(x), ref(x), rtol=2e-5, atol=2e-5, name="float32")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got, want = cpu(x), ref(x)
        exact = ref.double()(x.double())
        testing.assert_low_precision_ok(got, want, exact, name="autocast")


# -- the whole block planned once (plan_block) ---------------------------------------------------------


def _no_block_plan(monkeypatch):
    """The part plans only (what plan_block's fused path must match bit for bit)."""
    monkeypatch.setattr(block_mod, "plan_block", lambda *a: None)


@pytest.mark.parametrize("cfg", list(CFGS), ids=list(CFGS))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "autocast"])
def test_block_plan_gives_the_part_plans_bits(cfg, dtype, monkeypatch):
    """Under no_grad plan_block serves the block (forward and forward_logits), with the same bits as
    the part plans and the same outputs within tolerance of the reference modules."""
    fused, ref = _pair(paca_cfg=CFGS[cfg])
    x = torch.randn(2, 6 * 5, 24)
    z = torch.softmax(torch.randn(2, 100, 30), -1) if cfg == "given" else None
    logits = torch.randn(2, 100, 30) if cfg == "given" else None
    if dtype == "bfloat16":
        fused.to(torch.bfloat16)
        x, z, logits = (None if t is None else t.to(torch.bfloat16) for t in (x, z, logits))
    plans = []
    monkeypatch.setattr(block_mod, "plan_block", lambda *a: plans.append(_fusion.plan_block(*a)) or plans[-1])

    def run():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "autocast"), \
                testing.poisoned_outputs():
            return fused(x, 6, 5, z), fused.forward_logits(x, 6, 5, logits)

    (a, za), (b, lb) = run()
    assert len(plans) == 2 and None not in plans
    monkeypatch.setattr(block_mod, "plan_block", lambda *a: None)
    (a2, za2), (b2, lb2) = run()
    for got, want in ((a, a2), (za, za2), (b, b2), (lb, lb2)):
        assert (got is None) == (want is None)
        if got is not None:
            assert torch.equal(got, want)
    if dtype == "float32":
        with torch.no_grad():
            testing.assert_close(a, ref(x, 6, 5, z)[0], rtol=2e-5, atol=2e-5, name=cfg)
            testing.assert_close(b, ref.forward_logits(x, 6, 5, logits)[0], rtol=2e-5, atol=2e-5, name=cfg)


def test_block_plan_conditions(monkeypatch):
    """Every condition of plan_block: each case falls back to the part plans, and the output stays
    the modules' (hooks fire)."""
    fused, ref = _pair()
    x = torch.randn(1, 4 * 4, 24)
    with torch.no_grad():
        want = ref(x, 4, 4)[0]
        assert plan_block(fused, x, False) is not None
        assert plan_block(fused, x, True) is None  # maps wanted
        # A hook anywhere in the block, deep ones included: the part plans, and the hook fires.
        # (A hook on attn_viz asks for the maps, so it fires too.)
        for pre, mod in [(False, m) for m in (
            fused, fused.attn.clustering.clustering[0], fused.attn.cluster_norm, fused.mlp.fc2,
            fused.mlp.dwconv.dwconv, fused.norm2_before, fused.attn.attn_viz,
        )] + [(True, fused.mlp.fc1), (True, fused.attn.q), (True, fused.attn.attn_viz)]:
            seen = []
            if pre:
                h = mod.register_forward_pre_hook(lambda m, i, seen=seen: seen.append(1))
            else:
                h = mod.register_forward_hook(lambda m, i, o, seen=seen: seen.append(1))
            assert plan_block(fused, x, False) is None
            testing.assert_close(fused(x, 4, 4)[0], want, rtol=2e-5, atol=2e-5)
            h.remove()
            assert seen, mod
        h = torch.nn.modules.module.register_module_forward_hook(lambda *a: None)
        try:
            assert plan_block(fused, x, False) is None
        finally:
            h.remove()
        # Structure: layer scale, post-norm, position embedding, a non-GELU MLP activation.
        assert plan_block(_pair(layer_scale=1e-2)[0], x, False) is None
        assert plan_block(_pair(post_norm=True)[0], x, False) is None
        assert plan_block(_pair(with_pos_embed=True, input_resolution=4)[0], x, False) is None
        relu = _pair(act_cfg={"type": "ReLU"})[0]
        assert plan_block(relu, x, False) is None
        # A forward set on the attention instance, or a subclass: their own code runs.
        fused.attn.forward_logits = fused.attn.forward_logits
        assert plan_block(fused, x, False) is None
        del fused.attn.forward_logits
        assert plan_block(fused, x, False) is not None

        class MyAttention(type(fused.attn)):
            pass

        other = _pair()[0]
        other.attn.__class__ = MyAttention
        assert plan_block(other, x, False) is None
        # Another backend, by setting or by environment; fp16 autocast.
        assert plan_block(_pair()[1], x, False) is None
        auto = PaCaBlock(24, 2).eval()  # backend=None: the environment, then automatic
        assert plan_block(auto, x, False) is not None
        monkeypatch.setenv("PACA_KERNELS_BACKEND", "reference")
        assert plan_block(auto, x, False) is None
        monkeypatch.delenv("PACA_KERNELS_BACKEND")
        with torch.autocast("cpu", dtype=torch.float16):
            assert plan_block(fused, x, False) is None
        dp = _pair(drop_path=0.1)[0]
        assert plan_block(dp, x, False) is not None
        dp.train()
        assert plan_block(dp, x, False) is None
    # Grad mode on: the part plans (which then see whether anything wants a gradient).
    assert plan_block(fused, x, False) is None


def test_block_errors_are_the_same_on_every_path():
    fused = _pair()[0]
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            with pytest.raises(ValueError, match="channels"):
                fused(torch.randn(1, 16, 23), 4, 4)
            with pytest.raises(ValueError, match="does not match N"):
                fused(torch.randn(1, 16, 24), 4, 5)
            with pytest.raises(TypeError, match="torch.Tensor"):
                fused([1.0], 4, 4)
    given = _pair(paca_cfg=CFGS["given"])[0]
    for grad in (False, True):
        with torch.set_grad_enabled(grad), pytest.raises(ValueError, match="shape"):
            given.forward_logits(torch.randn(1, 16, 24), 4, 4, torch.randn(1, 99, 16))


# -- the model's own layers: stage norms and head (plan_layer_norm, plan_linear) -----------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "autocast"])
def test_model_stage_norms_as_the_layer_norm_op(dtype, spy):
    """PaCaViT's stage norms run as ops.fused.layer_norm in CPU inference (besides the blocks'
    norm1), with the logits of the modules' path within tolerance; a hook on a stage norm, or
    gradients wanted, gives the module."""
    torch.manual_seed(0)
    model = create_model("pacavit_tiny_p2cconv_100_0", num_classes=10, img_size=64).eval()
    img = torch.randn(2, 3, 64, 64)
    if dtype == "bfloat16":
        model.to(torch.bfloat16)
        img = img.to(torch.bfloat16)
    blocks = sum(len(getattr(model, f"stage{i + 1}")) for i in range(model.num_stages))
    calls = spy(ln_op, "layer_norm")

    def run():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "autocast"):
            return model(img)

    got = run()
    assert len(calls) == blocks + model.num_stages
    seen = []
    hooks = [getattr(model, f"norm{i + 1}").register_forward_hook(lambda m, i, o: seen.append(o.dtype))
             for i in range(model.num_stages)]
    del calls[:]
    want = run()
    for h in hooks:
        h.remove()
    assert len(calls) == blocks and len(seen) == model.num_stages
    tol = 2e-5 if dtype == "float32" else 3e-2
    testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol, name=dtype)
    assert _fusion.plan_layer_norm(model.norm1, model.backend, torch.randn(1, 4, 96)) is None  # grad mode
