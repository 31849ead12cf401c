"""paca_kernels.nn: PaCaAttention / PaCaLayer / PaCaBlock against the official fixtures and step-by-step
PyTorch computations, their input validation (and the ops'), and torch.compile of the layer."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from paca_kernels import PaCaAttention, PaCaBlock, PaCaLayer, _ext, ops
from paca_kernels.nn import P2CConv2d, P2CLinear, P2CMlp

HAS_EXT = _ext.load()
# The module-level backends: automatic, the pure-PyTorch oracle, and the C++ cluster_pool (with the
# reference's p2c_attention) when the extension is built.
BACKENDS = [
    pytest.param(None, id="auto"),
    pytest.param("reference", id="reference"),
    pytest.param(
        "cpu,reference", id="cpp",
        marks=pytest.mark.skipif(not HAS_EXT, reason=f"C++ extension: {_ext.unavailable_reason()}"),
    ),
]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a - b| / max|b|."""
    return ((a - b).abs().max() / b.abs().max()).item()


def assert_close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-5, rtol: float = 1e-5) -> None:
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


def manual_paca(
    layer: PaCaAttention,
    x: torch.Tensor,
    H: int,
    W: int,
    z: torch.Tensor | None = None,
    *,
    norm: bool = True,
    pos: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PaCa step by step: z = softmax(clustering(x)) (unless given), c = LN(z·x [+ pos]),
    q from x, k and v from c, per-head softmax(q·kᵀ/√d)·v, proj. Returns (out, z, attn (B, h, N, M))."""
    b, n, c = x.shape
    h = layer.num_heads
    d = c // h
    if z is None:
        z = torch.softmax(layer.clustering(x, H, W), dim=-1)
    tokens = torch.bmm(z, x)
    if pos is not None:
        tokens = tokens + pos
    if norm:
        ln = layer.cluster_norm
        if isinstance(ln, nn.LayerNorm):
            tokens = F.layer_norm(tokens, (c,), ln.weight, ln.bias, ln.eps)
        else:  # a plain LayerNorm, for tests that must tell "no norm" apart
            tokens = F.layer_norm(tokens, (c,), eps=1e-6)
    m = tokens.shape[1]
    q = F.linear(x, layer.q.weight, layer.q.bias).reshape(b, n, h, d).transpose(1, 2)
    k = F.linear(tokens, layer.k.weight, layer.k.bias).reshape(b, m, h, d).transpose(1, 2)
    v = F.linear(tokens, layer.v.weight, layer.v.bias).reshape(b, m, h, d).transpose(1, 2)
    attn = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d), dim=-1)
    out = (attn @ v).transpose(1, 2).reshape(b, n, c)
    return F.linear(out, layer.proj.weight, layer.proj.bias), z, attn


def manual_mhsa(layer: PaCaAttention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-head self-attention over the patches, step by step. Returns (out, attn (B, h, N, N))."""
    b, n, c = x.shape
    h = layer.num_heads
    d = c // h
    q, k, v = (F.linear(x, lin.weight, lin.bias).reshape(b, n, h, d).transpose(1, 2)
               for lin in (layer.q, layer.k, layer.v))
    attn = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d), dim=-1)
    out = (attn @ v).transpose(1, 2).reshape(b, n, c)
    return F.linear(out, layer.proj.weight, layer.proj.bias), attn


def official_mha(layer: PaCaAttention, x: torch.Tensor, need_weights: bool = False):
    """The official M = 0 path: F.multi_head_attention_forward with the layer's weights."""
    xt = x.transpose(0, 1)  # (N, B, C)
    return F.multi_head_attention_forward(
        query=xt, key=xt, value=xt, embed_dim_to_check=layer.dim, num_heads=layer.num_heads,
        in_proj_weight=None, in_proj_bias=torch.cat([layer.q.bias, layer.k.bias, layer.v.bias]),
        bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0,
        out_proj_weight=layer.proj.weight, out_proj_bias=layer.proj.bias, training=False,
        need_weights=need_weights, use_separate_proj_weight=True, q_proj_weight=layer.q.weight,
        k_proj_weight=layer.k.weight, v_proj_weight=layer.v.weight, average_attn_weights=False,
    )


def randomize_(module: nn.Module) -> nn.Module:
    """Non-trivial values for every parameter (after init, norm weights are 1 and biases 0)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            base = 1.0 if p.dim() == 1 and name.endswith("weight") else 0.0
            p.copy_(base + 0.3 * torch.randn_like(p))
    return module


# ---------------------------------------------------------------------------------------------------
# 1. The official fixture
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def layer_fixture(compat_dir):
    return torch.load(compat_dir / "paca_layer_conv.pt", weights_only=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", ["PaCaAttention", "PaCaLayer"])
def test_official_layer_fixture(layer_fixture, cls: str, backend: str | None) -> None:
    cfg = layer_fixture["config"]
    if cls == "PaCaAttention":
        layer = PaCaAttention(
            cfg["dim"], cfg["num_heads"], cfg["clusters"], clustering=cfg["clustering"],
            clustering_kernel_size=cfg["clustering_kernel_size"],
            cluster_norm_eps=cfg["cluster_norm_eps"], backend=backend,
        )
    else:
        paca_cfg = {
            "type": "P2CConv2d", "clusters": cfg["clusters"], "onsite_clustering": True,
            "clustering_kernel_size": cfg["clustering_kernel_size"],
            "cluster_norm_cfg": {"type": "LN", "eps": cfg["cluster_norm_eps"]}, "cluster_pos_embed": False,
        }
        layer = PaCaLayer(paca_cfg=paca_cfg, dim=cfg["dim"], num_heads=cfg["num_heads"], backend=backend)
    layer.load_state_dict(layer_fixture["state_dict"], strict=True)
    layer.eval()
    with torch.no_grad():
        out, z = layer(layer_fixture["input"], cfg["H"], cfg["W"])
    assert out.shape == layer_fixture["output"].shape
    assert z.shape == layer_fixture["assignment"].shape
    assert rel_err(out, layer_fixture["output"]) <= 1e-5
    assert rel_err(z, layer_fixture["assignment"]) <= 1e-5


def test_official_layer_fixture_wrong_clusters_fails(layer_fixture) -> None:
    cfg = layer_fixture["config"]
    layer = PaCaAttention(cfg["dim"], cfg["num_heads"], cfg["clusters"] - 1)
    with pytest.raises(RuntimeError, match="size mismatch"):
        layer.load_state_dict(layer_fixture["state_dict"], strict=True)


# ---------------------------------------------------------------------------------------------------
# 3. Behaviour
# ---------------------------------------------------------------------------------------------------
SHAPES = [  # (B, C, h, M, H, W)
    pytest.param((2, 32, 4, 6, 4, 5), id="B2-C32-h4-M6-4x5"),
    pytest.param((3, 48, 2, 7, 5, 3), id="B3-C48-h2-M7-5x3"),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("head", "cls"), [
    pytest.param("conv", P2CConv2d, id="conv"),
    pytest.param("mlp", P2CMlp, id="mlp"),
    pytest.param("linear", P2CLinear, id="linear"),
])
def test_onsite_clustering_heads(head: str, cls: type, shape: tuple[int, ...]) -> None:
    b, c, h, m, hh, ww = shape
    layer = randomize_(PaCaAttention(c, h, m, clustering=head, clustering_kernel_size=3)).eval()
    assert isinstance(layer.clustering, cls)
    x = torch.randn(b, hh * ww, c)
    with torch.no_grad():
        out, z = layer(x, hh, ww)
        ref_out, ref_z, _ = manual_paca(layer, x, hh, ww)
    assert out.shape == (b, hh * ww, c)
    assert z.shape == (b, m, hh * ww)
    assert (z >= 0).all()
    assert_close(z.sum(-1), torch.ones(b, m))
    assert_close(z, ref_z)
    assert_close(out, ref_out)


def test_clustering_head_by_class_and_unknown_name() -> None:
    assert isinstance(PaCaAttention(16, 2, 3, clustering=P2CLinear).clustering, P2CLinear)
    assert isinstance(PaCaAttention(16, 2, 3, clustering="P2CMlp").clustering, P2CMlp)
    with pytest.raises(ValueError, match="unknown clustering head 'nope'"):
        PaCaAttention(16, 2, 3, clustering="nope")


def test_external_assignment_matches_manual_with_gradients() -> None:
    b, c, h, m, hh, ww = 2, 24, 3, 5, 3, 4
    n = hh * ww
    layer = randomize_(PaCaAttention(c, h, m, onsite_clustering=False))
    assert not hasattr(layer, "clustering")
    assert not any("clustering" in k for k in layer.state_dict())
    x = torch.randn(b, n, c, requires_grad=True)
    z = torch.softmax(torch.randn(b, m, n), -1).requires_grad_()
    out, z_out = layer(x, hh, ww, z)
    assert z_out is z
    ref, _, _ = manual_paca(layer, x, hh, ww, z)
    assert_close(out, ref)
    g = torch.randn_like(out)
    gx, gz = torch.autograd.grad(out, (x, z), g)
    rgx, rgz = torch.autograd.grad(ref, (x, z), g)
    assert gx.abs().sum() > 0 and gz.abs().sum() > 0
    assert_close(gx, rgx)
    assert_close(gz, rgz)


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_logits_equals_forward_softmax(backend: str | None) -> None:
    b, c, h, m, hh, ww = 2, 32, 2, 6, 4, 4
    layer = randomize_(PaCaAttention(c, h, m, onsite_clustering=False, backend=backend))
    x = torch.randn(b, hh * ww, c, requires_grad=True)
    logits = (2 * torch.randn(b, m, hh * ww)).requires_grad_()
    out_l, logits_out = layer.forward_logits(x, hh, ww, logits)
    assert logits_out is logits
    out_z, _ = layer(x, hh, ww, torch.softmax(logits, -1))
    assert_close(out_l, out_z)
    g = torch.randn_like(out_l)
    # The two paths round differently (fused pooling vs softmax then matmul); gradients reach ~10 in
    # magnitude, so the float32 tolerance is relative to each gradient's largest entry.
    for got, want in zip(
        torch.autograd.grad(out_l, (x, logits), g), torch.autograd.grad(out_z, (x, logits), g), strict=True
    ):
        assert rel_err(got, want) < 1e-5


def test_self_attention_without_clusters() -> None:
    b, c, h, hh, ww = 2, 32, 4, 3, 5
    layer = randomize_(PaCaAttention(c, h, 0)).eval()
    assert not hasattr(layer, "clustering") and not hasattr(layer, "cluster_norm")
    x = torch.randn(b, hh * ww, c)
    with torch.no_grad():
        out, z = layer(x, hh, ww)
        out2, z2, attn = layer(x, hh, ww, return_attn=True)
        ref, ref_attn = manual_mhsa(layer, x)
        official, _ = official_mha(layer, x)
        _, official_maps = official_mha(layer, x, need_weights=True)
    assert z is None and z2 is None
    assert_close(out, ref)
    assert_close(out, official.transpose(0, 1))
    assert_close(out2, out)
    assert attn.shape == (b, h, hh * ww, hh * ww)
    assert_close(attn, ref_attn)
    assert_close(attn, official_maps)


def test_no_cluster_norm() -> None:
    b, c, h, m, hh, ww = 2, 16, 2, 4, 3, 3
    layer = randomize_(PaCaAttention(c, h, m, cluster_norm=False)).eval()
    assert isinstance(layer.cluster_norm, nn.Identity)
    assert not any(k.startswith("cluster_norm") for k in layer.state_dict())
    official = PaCaLayer({"clusters": m, "cluster_norm_cfg": None}, dim=c, num_heads=h)
    assert list(official.state_dict()) == list(layer.state_dict())
    x = torch.randn(b, hh * ww, c)
    with torch.no_grad():
        out, _ = layer(x, hh, ww)
        ref, _, _ = manual_paca(layer, x, hh, ww, norm=False)
        with_norm, _, _ = manual_paca(layer, x, hh, ww, norm=True)
    assert_close(out, ref)
    assert (out - with_norm).abs().max() > 1e-3  # the comparison can tell the two apart


def test_cluster_pos_embed() -> None:
    b, c, h, m, hh, ww = 2, 16, 2, 4, 3, 3
    layer = randomize_(PaCaAttention(c, h, m, cluster_pos_embed=True)).eval()
    assert layer.cluster_pos_enc.shape == (1, m, c)
    assert "cluster_pos_enc" in layer.state_dict()
    with torch.no_grad():
        layer.cluster_pos_enc.copy_(torch.randn(1, m, c))
    x = torch.randn(b, hh * ww, c)
    with torch.no_grad():
        out, _ = layer(x, hh, ww)
        ref, _, _ = manual_paca(layer, x, hh, ww, pos=layer.cluster_pos_enc)
        without, _, _ = manual_paca(layer, x, hh, ww)
    assert_close(out, ref)
    assert (out - without).abs().max() > 1e-3


def test_return_attn_and_attn_viz_hook() -> None:
    b, c, h, m, hh, ww = 2, 24, 3, 5, 4, 3
    layer = randomize_(PaCaAttention(c, h, m)).eval()
    x = torch.randn(b, hh * ww, c)
    with torch.no_grad():
        plain, _ = layer(x, hh, ww)
        out, z, attn = layer(x, hh, ww, return_attn=True)
        _, _, ref_attn = manual_paca(layer, x, hh, ww)
    assert_close(out, plain)
    assert z.shape == (b, m, hh * ww)
    assert attn.shape == (b, h, hh * ww, m)
    assert_close(attn.sum(-1), torch.ones(b, h, hh * ww))
    assert_close(attn, ref_attn)

    # A forward hook on attn_viz receives the maps, and so does a pre-hook (the official layer calls
    # attn_viz on every forward).
    viz = layer.attn_viz
    for register in (
        lambda seen: viz.register_forward_hook(lambda mod, inp, o: seen.append(o.detach().clone())),
        lambda seen: viz.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone())),
    ):
        seen: list[torch.Tensor] = []
        handle = register(seen)
        try:
            with torch.no_grad():
                hooked, _ = layer(x, hh, ww)
        finally:
            handle.remove()
        assert len(seen) == 1
        assert_close(seen[0], ref_attn)
        assert_close(hooked, plain)


def test_attention_dropout_train_vs_eval() -> None:
    b, c, h, m, hh, ww = 2, 16, 2, 6, 4, 4
    layer = randomize_(PaCaAttention(c, h, m, attn_drop=0.5))
    x = torch.randn(b, hh * ww, c)
    with torch.no_grad():
        layer.train()
        t1, _ = layer(x, hh, ww)
        t2, _ = layer(x, hh, ww)
        layer.eval()
        e1, _ = layer(x, hh, ww)
        e2, _ = layer(x, hh, ww)
        ref, _, _ = manual_paca(layer, x, hh, ww)
    assert (t1 - t2).abs().max() > 1e-4
    assert torch.equal(e1, e2)
    assert_close(e1, ref)


def test_backend_argument() -> None:
    b, c, h, m, hh, ww = 2, 16, 2, 4, 3, 3
    layer = randomize_(PaCaAttention(c, h, m, backend="reference")).eval()
    x = torch.randn(b, hh * ww, c)
    with torch.no_grad():
        out, _ = layer(x, hh, ww)
        ref, _, _ = manual_paca(layer, x, hh, ww)
    assert_close(out, ref)
    with pytest.raises(ValueError, match="nope"):
        PaCaAttention(c, h, m, backend="nope")  # at construction, not at the first forward


# ---------------------------------------------------------------------------------------------------
# 4. Bad input
# ---------------------------------------------------------------------------------------------------
def _layer_and_x(onsite: bool = True) -> tuple[PaCaAttention, torch.Tensor]:
    return PaCaAttention(16, 2, 4, onsite_clustering=onsite), torch.randn(2, 12, 16)


@pytest.mark.parametrize(("make_args", "exc", "match"), [
    pytest.param(lambda x: (x[0], 3, 4), ValueError, r"\(B, N, C\).*2-d", id="x-2d"),
    pytest.param(lambda x: (x[..., :8], 3, 4), ValueError, r"C = 8 .*dim = 16", id="C-mismatch"),
    pytest.param(lambda x: (x, 3, 5), ValueError, r"does not match N = 12", id="HW-not-N"),
    pytest.param(lambda x: (x, -3, -4), ValueError, r"H and W must be >= 0, got H = -3", id="HW-negative"),
    pytest.param(lambda x: (x.long(), 3, 4), TypeError, r"floating.*int64", id="int-x"),
    pytest.param(lambda x: (x.tolist(), 3, 4), TypeError, r"torch.Tensor", id="list-x"),
])
def test_bad_tokens(make_args, exc: type, match: str) -> None:
    layer, x = _layer_and_x()
    with pytest.raises(exc, match=match):
        layer(*make_args(x))


@pytest.mark.parametrize(("make_z", "exc", "match"), [
    pytest.param(lambda b, m, n: torch.rand(b, m + 1, n), ValueError, r"z must have shape.*\(2, 4, 12\)",
                 id="z-wrong-M"),
    pytest.param(lambda b, m, n: torch.rand(b, m, n + 1), ValueError, r"z must have shape", id="z-wrong-N"),
    pytest.param(lambda b, m, n: torch.rand(b, m, n, device="meta"), ValueError, r"meta.*cpu",
                 id="z-other-device"),
    pytest.param(lambda b, m, n: torch.randint(0, 2, (b, m, n)), TypeError, r"z must be a floating",
                 id="z-int"),
])
def test_bad_assignment(make_z, exc: type, match: str) -> None:
    layer, x = _layer_and_x(onsite=False)
    with pytest.raises(exc, match=match):
        layer(x, 3, 4, make_z(2, 4, 12))


def test_bad_logits_shape() -> None:
    layer, x = _layer_and_x(onsite=False)
    with pytest.raises(ValueError, match=r"logits must have shape"):
        layer.forward_logits(x, 3, 4, torch.randn(2, 5, 12))


def test_non_onsite_layer_needs_z() -> None:
    layer, x = _layer_and_x(onsite=False)
    with pytest.raises(ValueError, match=r"onsite_clustering=False.*z"):
        layer(x, 3, 4)
    with pytest.raises(ValueError, match=r"onsite_clustering=False"):
        layer.forward_logits(x, 3, 4)


@pytest.mark.parametrize(("kwargs", "exc", "match"), [
    pytest.param({"dim": 30, "num_heads": 4}, ValueError, "not divisible by num_heads", id="dim-not-divisible"),
    pytest.param({"num_clusters": -1}, ValueError, "num_clusters must be an int >= 0", id="clusters-negative"),
    pytest.param({"num_heads": 0}, ValueError, "num_heads must be an int >= 1, got 0", id="heads-0"),
    pytest.param({"num_heads": -2}, ValueError, "num_heads must be an int >= 1, got -2", id="heads-negative"),
    pytest.param({"num_heads": 2.0}, ValueError, "num_heads must be an int", id="heads-float"),
    pytest.param({"dim": 0}, ValueError, "dim must be an int >= 1, got 0", id="dim-0"),
    pytest.param({"clustering_kernel_size": 4}, ValueError, "clustering_kernel_size must be odd", id="kernel-even"),
    pytest.param({"clustering_kernel_size": 0}, ValueError, "clustering_kernel_size must be an int >= 1",
                 id="kernel-0"),
    pytest.param({"backend": "cuda_fast"}, ValueError, "unknown paca_kernels backend 'cuda_fast'.*known backends",
                 id="backend-unknown"),
    pytest.param({"backend": "cpu,,reference"}, ValueError, "empty name", id="backend-empty-name"),
    pytest.param({"backend": 1}, TypeError, "backend must be a backend name", id="backend-int"),
])
def test_bad_constructor_arguments(kwargs: dict, exc: type, match: str) -> None:
    args = {"dim": 32, "num_heads": 4, "num_clusters": 5} | kwargs
    with pytest.raises(exc, match=match):
        PaCaAttention(**args)


def test_backend_names_checked_at_construction_everywhere() -> None:
    """Every constructor that takes a backend rejects an unknown name at once (not at the first
    forward), and a valid preference list is kept as given."""
    from paca_kernels import PaCaSegHead, convert_paca_layers, create_model
    from paca_kernels.nn.block import Mlp

    makers = [
        lambda b: create_model("pacavit_tiny_p2cconv_100_0", backend=b),
        lambda b: Mlp(8, 16, backend=b),
        lambda b: PaCaSegHead([8, 8], 3, channels=8, backend=b),
        lambda b: convert_paca_layers(torch.nn.Identity(), backend=b),
    ]
    for make in makers:
        with pytest.raises(ValueError, match="unknown paca_kernels backend 'fast'"):
            make("fast")
    assert PaCaAttention(8, 2, 4, backend="cpu,reference").backend == "cpu,reference"


def _pool_inputs() -> dict[str, torch.Tensor]:
    return {"logits": torch.randn(2, 4, 12), "x": torch.randn(2, 12, 8),
            "weight": torch.randn(8), "bias": torch.randn(8)}


def test_cluster_pool_good_input_runs() -> None:
    a = _pool_inputs()
    out = ops.cluster_pool(a["logits"], a["x"], a["weight"], a["bias"], 1e-6)
    ref = F.layer_norm(torch.softmax(a["logits"], -1) @ a["x"], (8,), a["weight"], a["bias"], 1e-6)
    assert_close(out, ref)


# ---------------------------------------------------------------------------------------------------
# PaCaBlock, official call
# ---------------------------------------------------------------------------------------------------
def manual_block(block: PaCaBlock, x: torch.Tensor, H: int, W: int, z):
    """x + attn(norm1(x)), then x + fc2(gelu(dwconv(t) + t)) with t = fc1(norm2(x)), step by step."""
    a, z_out = block.attn(block.norm1_before(x), H, W, z)
    x = x + a
    t = block.mlp.fc1(block.norm2_before(x))
    b, _, c = t.shape
    conv = block.mlp.dwconv.dwconv
    u = F.conv2d(t.transpose(1, 2).reshape(b, c, H, W), conv.weight, conv.bias, padding=1, groups=c)
    t = u.flatten(2).transpose(1, 2) + t
    return x + block.mlp.fc2(F.gelu(t)), z_out


@pytest.mark.parametrize(("onsite", "m"), [
    pytest.param(True, 5, id="onsite"),
    pytest.param(False, 5, id="shared-z"),
    pytest.param(False, 0, id="self-attention"),
])
def test_block_official_call(onsite: bool, m: int) -> None:
    b, c, h, hh, ww = 2, 16, 2, 4, 3
    block = randomize_(PaCaBlock(c, h, paca_cfg={"clusters": m, "onsite_clustering": onsite},
                                 mlp_ratio=2)).eval()
    x = torch.randn(b, hh * ww, c)
    z = torch.softmax(torch.randn(b, m, hh * ww), -1) if not onsite and m else None
    with torch.no_grad():
        result = block(x, hh, ww, z)
        ref, ref_z = manual_block(block, x, hh, ww, z)
    assert isinstance(result, tuple) and len(result) == 2
    out, z_out = result
    assert_close(out, ref)
    if m == 0:
        assert z_out is None
    elif onsite:
        assert_close(z_out, ref_z)
        assert_close(z_out.sum(-1), torch.ones(b, m))
    else:
        assert z_out is z


# ---------------------------------------------------------------------------------------------------
# 7. torch.compile
# ---------------------------------------------------------------------------------------------------
@pytest.fixture
def dynamo_reset():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compile_forward_backward(dynamo_reset) -> None:
    b, c, h, m, hh, ww = 2, 16, 2, 5, 4, 3
    layer = randomize_(PaCaAttention(c, h, m, clustering="conv", clustering_kernel_size=3))
    x = torch.randn(b, hh * ww, c)
    gout, gz = torch.randn(b, hh * ww, c), torch.randn(b, m, hh * ww)

    def step(fn):
        xi = x.clone().requires_grad_()
        out, z = fn(xi)
        loss = (out * gout).sum() + (z * gz).sum()
        grads = torch.autograd.grad(loss, [xi, *layer.parameters()])
        return out.detach(), z.detach(), grads

    eager = step(lambda t: layer(t, hh, ww))
    compiled = step(torch.compile(lambda t: layer(t, hh, ww), fullgraph=True))
    assert_close(compiled[0], eager[0])
    assert_close(compiled[1], eager[1])
    for g_c, g_e in zip(compiled[2], eager[2], strict=True):
        assert_close(g_c, g_e)


def test_compile_inference_heads_equal_clusters(dynamo_reset) -> None:
    # Regression: Inductor's fused-attention pattern once mis-read k.permute(0, 2, 3, 1) (M == h).
    b, c, h, m, hh, ww = 2, 16, 4, 4, 4, 3
    layer = randomize_(PaCaAttention(c, h, m, clustering="conv", clustering_kernel_size=3)).eval()
    x = torch.randn(b, hh * ww, c)
    with torch.no_grad():
        eager, _ = layer(x, hh, ww)
        compiled, _ = torch.compile(lambda t: layer(t, hh, ww), fullgraph=True)(x)
    assert_close(compiled, eager)
