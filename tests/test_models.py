"""PaCa-ViT and the model zoo: the official fixtures, parameter/MAC/key tables of every variant,
stage-wise and block-wise clustering, backbone mode, create_model options, training, torch.compile."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import paca_kernels
from paca_kernels import PaCaViT, create_model, list_models

OFFICIAL_NAMES = [
    "pacavit_tiny_p2cconv_100_0",
    "pacavit_small_p2cconv_100_0",
    "pacavit_base_p2cconv_100_0",
    "pacavit_small_p2cmlp_100_0",
    "pacavit_small_p2cconv_2_0",
    "pacavit_small_p2cconv_49_0",
    "pacavit_small_p2cconv_49_100",
    "pacavit_small_p2cconv_100_49",
    "pacavit_small_p2cconv_100",
    "pacavit_small_p2cconv_100_blockwise",
    "pacavit_convmixer_tiny_100",
    "pacavit_convmixer_small_100",
    "pacavit_convmixer_base_100",
]
TINY = "pacavit_tiny_p2cconv_100_0"

# A small model: 4 stages, stage 2 has three blocks, the last stage is plain self-attention.
SMALL_ARCH = {"embed_dims": [16, 32, 48, 64], "num_heads": [1, 2, 2, 4], "mlp_ratios": [2] * 4,
              "depths": [1, 3, 1, 1]}
SMALL_CLUSTERS = [4, 5, 6, 0]


def small_vit(onsite: list[int] | None = None, **kwargs) -> PaCaViT:
    paca_cfg: dict = {"clusters": SMALL_CLUSTERS}
    if onsite is not None:
        paca_cfg["onsite_clustering"] = onsite
    kwargs.setdefault("num_classes", 10)
    return PaCaViT(img_size=64, arch_cfg=SMALL_ARCH, paca_cfg=paca_cfg, **kwargs)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def assert_close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-5, rtol: float = 1e-5) -> None:
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


def shape_str(t: torch.Tensor) -> str:
    return "x".join(map(str, t.shape)) if t.dim() else "scalar"


def official_forward(model: PaCaViT, img: torch.Tensor) -> torch.Tensor:
    """The official forward loop: blocks called as ``x, z = block(x, H, W, z)``, z starting as None."""
    x = model.patch_embed(img)
    for i in range(model.num_stages):
        b, c, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)
        z = None
        for block in getattr(model, f"stage{i + 1}"):
            x, z = block(x, h, w, z)
        x = getattr(model, f"norm{i + 1}")(x)
        if i < model.num_stages - 1:
            x = getattr(model, f"transition{i + 1}")(x.transpose(1, 2).reshape(b, c, h, w))
    return model.head(x.mean(1))


# ---------------------------------------------------------------------------------------------------
# 1. Official model fixtures
# ---------------------------------------------------------------------------------------------------
def build_from_fixture_config(cfg: dict, clusters: list[int] | None = None) -> PaCaViT:
    arch = {k: cfg[k] for k in ("embed_dims", "num_heads", "mlp_ratios", "depths")}
    paca = {"clusters": clusters if clusters is not None else cfg["clusters"]}
    teacher = None
    if "teacher_depths" in cfg:
        teacher = {"type": "PaCaTeacher_ConvMixer", "stem_cfg": None, "embed_dims": cfg["embed_dims"],
                   "depths": cfg["teacher_depths"], "kernel_size": cfg["teacher_kernel_size"]}
    return PaCaViT(num_classes=cfg["num_classes"], img_size=cfg["img_size"], arch_cfg=arch, paca_cfg=paca,
                   paca_teacher_cfg=teacher)


MODEL_FIXTURES = [pytest.param("small_conv_model.pt", id="conv"),
                  pytest.param("small_teacher_model.pt", id="teacher")]


@pytest.mark.parametrize("fname", MODEL_FIXTURES)
def test_official_model_fixture(compat_dir, fname: str) -> None:
    data = torch.load(compat_dir / fname, weights_only=True)
    model = build_from_fixture_config(data["config"])
    model.load_state_dict(data["state_dict"], strict=True)
    model.eval()
    with torch.no_grad():
        out = model(data["input"])
    assert out.shape == data["output"].shape
    assert rel_err(out, data["output"]) <= 1e-5


@pytest.mark.parametrize("fname", MODEL_FIXTURES)
def test_official_model_fixture_other_clusters_fails(compat_dir, fname: str) -> None:
    data = torch.load(compat_dir / fname, weights_only=True)
    clusters = list(data["config"]["clusters"])
    clusters[1] += 1
    model = build_from_fixture_config(data["config"], clusters)
    with pytest.raises(RuntimeError, match="size mismatch"):
        model.load_state_dict(data["state_dict"], strict=True)


# ---------------------------------------------------------------------------------------------------
# 2. The zoo table
# ---------------------------------------------------------------------------------------------------
def read_table(compat_dir) -> dict[str, tuple[int, int]]:
    """name -> (params, MACs) from the compat README's table."""
    text = (compat_dir / "README.md").read_text()
    rows = re.findall(r"^\|\s*(pacavit_\w+)\s*\|\s*([\d,]+)\s*\|\s*([\d,]+)\s*\|\s*$", text, re.MULTILINE)
    return {name: (int(p.replace(",", "")), int(m.replace(",", ""))) for name, p, m in rows}


def test_list_models() -> None:
    names = list_models()
    assert sorted(names) == sorted(OFFICIAL_NAMES)
    assert len(names) == len(set(names)) == 13
    assert list_models("convmixer") == sorted(n for n in OFFICIAL_NAMES if "convmixer" in n)


def test_official_names_match_compat_data(compat_dir) -> None:
    assert sorted(read_table(compat_dir)) == sorted(OFFICIAL_NAMES)
    assert sorted(p.stem for p in (compat_dir / "official_keys").glob("*.tsv")) == sorted(OFFICIAL_NAMES)


def test_create_unknown_model() -> None:
    with pytest.raises(ValueError, match=r"unknown PaCa-ViT variant 'nope'; available: ") as info:
        create_model("nope")
    for name in OFFICIAL_NAMES:
        assert name in str(info.value)


@pytest.fixture(scope="module", params=OFFICIAL_NAMES, ids=OFFICIAL_NAMES)
def zoo_model(request) -> tuple[str, PaCaViT]:
    torch.manual_seed(0)
    return request.param, create_model(request.param).eval()


def test_zoo_param_count(zoo_model, compat_dir) -> None:
    name, model = zoo_model
    assert sum(p.numel() for p in model.parameters()) == read_table(compat_dir)[name][0]


def test_zoo_macs(zoo_model, compat_dir) -> None:
    name, model = zoo_model
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        out = model(x)
    assert out.shape == (1, 1000)
    assert torch.isfinite(out).all()
    assert counter.get_total_flops() // 2 == read_table(compat_dir)[name][1]


def test_zoo_state_dict_keys(zoo_model, compat_dir) -> None:
    name, model = zoo_model
    lines = (compat_dir / "official_keys" / f"{name}.tsv").read_text().splitlines()
    expected = [tuple(line.split("\t")) for line in lines if line.strip()]
    assert [(k, shape_str(v)) for k, v in model.state_dict().items()] == expected


# ---------------------------------------------------------------------------------------------------
# 5. Stage-wise / block-wise clustering, PaCaBlock in the model
# ---------------------------------------------------------------------------------------------------
def test_stagewise_sharing_structure() -> None:
    model = small_vit()
    for i, blocks in enumerate((model.stage1, model.stage2, model.stage3), start=1):
        assert hasattr(blocks[0].attn, "clustering"), f"stage{i}[0]"
        assert blocks[0].attn.num_clusters == SMALL_CLUSTERS[i - 1]
    for j in (1, 2):
        assert not hasattr(model.stage2[j].attn, "clustering")
        assert not model.stage2[j].attn.onsite_clustering
        assert model.stage2[j].attn.num_clusters == 5
        assert not any(".clustering." in k for k in model.stage2[j].state_dict())
    assert model.stage4[0].attn.num_clusters == 0
    assert not hasattr(model.stage4[0].attn, "clustering")


def test_stagewise_logits_shared_by_later_blocks() -> None:
    model = small_vit().eval()
    img = torch.randn(2, 3, 64, 64)
    logits: list[torch.Tensor] = []
    normed: dict[int, torch.Tensor] = {}
    attn_out: dict[int, torch.Tensor] = {}
    stage = model.stage2
    hooks = [stage[0].attn.clustering.register_forward_hook(lambda m, i, o: logits.append(o))]
    for j, block in enumerate(stage):
        hooks.append(block.norm1_before.register_forward_hook(lambda m, i, o, j=j: normed.__setitem__(j, o)))
        hooks.append(block.attn.proj.register_forward_hook(lambda m, i, o, j=j: attn_out.__setitem__(j, o)))
    try:
        with torch.no_grad():
            model(img)
    finally:
        for handle in hooks:
            handle.remove()
    assert len(logits) == 1 and logits[0].shape == (2, 5, 64)
    with torch.no_grad():
        for j in (1, 2):
            out, returned = stage[j].attn.forward_logits(normed[j], 8, 8, logits[0])
            assert returned is logits[0]
            assert_close(out, attn_out[j])
            out_z, _ = stage[j].attn(normed[j], 8, 8, torch.softmax(logits[0], -1))
            assert_close(out_z, attn_out[j])
            other, _ = stage[j].attn.forward_logits(normed[j], 8, 8, torch.randn_like(logits[0]))
            assert (other - attn_out[j]).abs().max() > 1e-4  # a different assignment is visible


@pytest.mark.parametrize(("onsite", "clustering_blocks"), [
    pytest.param(None, [0], id="stagewise"),
    pytest.param([1, 1, 1, 1], [0, 1, 2], id="blockwise"),
    pytest.param([2, 2, 2, 2], [0, 2], id="every-2nd"),
])
def test_onsite_clustering_patterns(onsite: list[int] | None, clustering_blocks: list[int]) -> None:
    model = small_vit(onsite).eval()
    assert [j for j, b in enumerate(model.stage2) if hasattr(b.attn, "clustering")] == clustering_blocks
    for blocks in (model.stage1, model.stage3):
        assert hasattr(blocks[0].attn, "clustering")
    assert not hasattr(model.stage4[0].attn, "clustering")
    img = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = model(img)
        assert_close(out, official_forward(model, img))


def test_blockwise_variant_has_a_clustering_head_per_block() -> None:
    model = create_model("pacavit_small_p2cconv_100_blockwise")
    for i in range(1, 5):
        for block in getattr(model, f"stage{i}"):
            assert hasattr(block.attn, "clustering")


# ---------------------------------------------------------------------------------------------------
# 6. Backbone mode and create_model options
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_backbone() -> PaCaViT:
    torch.manual_seed(0)
    return create_model(TINY, features_only=True).eval()


def test_features_only_non_square(tiny_backbone) -> None:
    img = torch.randn(1, 3, 96, 160)
    with torch.no_grad():
        feats = tiny_backbone(img)
    assert isinstance(feats, list)
    expected = [(1, c, 96 // 4 // 2**i, 160 // 4 // 2**i) for i, c in enumerate([96, 192, 320, 384])]
    assert [tuple(f.shape) for f in feats] == expected
    assert all(torch.isfinite(f).all() for f in feats)


def test_out_indices_and_pooled_features(tiny_backbone) -> None:
    img = torch.randn(1, 3, 96, 160)
    state = tiny_backbone.state_dict()
    picked = create_model(TINY, out_indices=(1, 3)).eval()
    picked.load_state_dict(state, strict=True)
    pooled = create_model(TINY, num_classes=0).eval()
    pooled.load_state_dict(state, strict=True)
    assert pooled.head is None and picked.head is None
    with torch.no_grad():
        feats = tiny_backbone(img)
        sub = picked(img)
        vec = pooled(img)
    assert len(sub) == 2
    assert_close(sub[0], feats[1])
    assert_close(sub[1], feats[3])
    assert vec.shape == (1, 384)
    assert_close(vec, feats[3].mean((2, 3)))


def test_downstream_cluster_num_and_partial_load() -> None:
    imagenet = create_model(TINY).state_dict()
    model = create_model(TINY, features_only=True, downstream_cluster_num=[8, 8, 8, 0])
    assert model.stage1[0].attn.clustering.clustering[4].out_channels == 8
    assert model.stage1[0].attn.num_clusters == 8 and model.stage1[1].attn.num_clusters == 8
    target = model.state_dict()
    mismatched = sorted(k for k, v in imagenet.items() if k in target and target[k].shape != v.shape)
    assert mismatched == [f"stage{i}.0.attn.clustering.clustering.4.weight" for i in (1, 2, 3)]
    kept = {k: v for k, v in imagenet.items() if k in target and target[k].shape == v.shape}
    result = model.load_state_dict(kept, strict=False)
    assert sorted(result.missing_keys) == mismatched
    assert result.unexpected_keys == []
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in kept.items())
    with torch.no_grad():
        feats = model.eval()(torch.randn(1, 3, 64, 64))
    assert [f.shape[1] for f in feats] == [96, 192, 320, 384]


def test_downstream_cluster_num_wrong_length() -> None:
    with pytest.raises(ValueError, match="downstream_cluster_num has 3 entries"):
        create_model(TINY, downstream_cluster_num=[8, 8, 8])


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_gradients_have_their_parameters_strides(backend: str) -> None:
    """DDP's layout check, without DDP: after a backward every gradient has exactly its parameter's
    strides. (The PaCa convs see channels-last views; their depthwise and 1×1 weights used to get
    channels-last gradients with other size-1 strides, and DDP warned on every run.)"""
    if backend == "cpu" and paca_kernels.ops.get_backend("cpu").unavailable_reason() is not None:
        pytest.skip("the fused cpu backend is unavailable")
    model = create_model(TINY, num_classes=3, backend=backend)
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    bad = [(n, p.stride(), p.grad.stride()) for n, p in model.named_parameters()
           if p.grad is not None and p.grad.stride() != p.stride()]
    assert bad == []
    assert all(p.grad is not None for p in model.parameters())


def test_create_model_kwargs() -> None:
    model = create_model(TINY, num_classes=7, drop_path_rate=0.3, img_size=(96, 160))
    assert model.head.out_features == 7
    assert model.patch_grid == (24, 40)
    blocks = [b for i in range(1, 5) for b in getattr(model, f"stage{i}")]
    assert isinstance(blocks[0].drop_path1, torch.nn.Identity)
    assert blocks[-1].drop_path1.drop_prob == pytest.approx(0.3)
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 64, 96)).shape == (1, 7)

    alias = create_model(TINY, image_size=96, with_pos_embed=True)
    assert alias.patch_grid == (24, 24)
    assert alias.stage1[0].pos_embed.shape == (1, 24 * 24, 96)
    assert alias.stage3[0].pos_embed.shape == (1, 6 * 6, 320)


def test_drop_path_train_differs_from_eval() -> None:
    model = small_vit(drop_path_rate=0.5)
    img = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        model.train()
        train_out = model(img)
        model.eval()
        eval_out = model(img)
        assert torch.equal(eval_out, model(img))
    assert (train_out - eval_out).abs().max() > 1e-4


@pytest.mark.parametrize("teacher", [pytest.param(False, id="onsite"), pytest.param(True, id="teacher")])
def test_training_step(teacher: bool) -> None:
    kwargs: dict = {"drop_path_rate": 0.1}
    if teacher:
        kwargs["paca_teacher_cfg"] = {"type": "PaCaTeacher_ConvMixer", "stem_cfg": None,
                                      "embed_dims": SMALL_ARCH["embed_dims"], "depths": [1, 1, 1, 1]}
        model = PaCaViT(num_classes=10, img_size=64, arch_cfg=SMALL_ARCH,
                        paca_cfg={"clusters": [4, 5, 6, 3]}, **kwargs)
    else:
        model = small_vit(**kwargs)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    img, target = torch.randn(2, 3, 64, 64), torch.tensor([1, 7])
    loss = F.cross_entropy(model(img), target)
    assert torch.isfinite(loss)
    opt.zero_grad()
    loss.backward()
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert params
    assert [n for n, p in params if p.grad is None] == []
    assert [n for n, p in params if not torch.isfinite(p.grad).all()] == []
    opt.step()
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert len(changed) > 0.9 * len(params)


# ---------------------------------------------------------------------------------------------------
# 4. Bad images
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("make_img", "exc", "match"), [
    pytest.param(lambda: torch.randn(1, 3, 48, 64), ValueError, r"divisible by 32", id="not-divisible"),
    pytest.param(lambda: torch.randn(1, 1, 64, 64), ValueError, r"1 channels.*expects 3", id="channels"),
    pytest.param(lambda: torch.randint(0, 255, (1, 3, 64, 64), dtype=torch.uint8), TypeError,
                 r"floating point, got uint8", id="uint8"),
    pytest.param(lambda: torch.randn(3, 64, 64), ValueError, r"\(B, C, H, W\)", id="3d"),
])
def test_bad_images(make_img, exc: type, match: str) -> None:
    model = small_vit().eval()
    with pytest.raises(exc, match=match), torch.no_grad():
        model(make_img())


# ---------------------------------------------------------------------------------------------------
# 7. torch.compile of a whole model
# ---------------------------------------------------------------------------------------------------
def test_compile_model_eval() -> None:
    torch._dynamo.reset()
    try:
        model = small_vit().eval()
        img = torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            eager = model(img)
            compiled = torch.compile(model, fullgraph=True)(img)
        assert_close(compiled, eager)
    finally:
        torch._dynamo.reset()


def test_compile_model_dynamic_batch() -> None:
    """A batch marked dynamic: one compiled graph serves other batch sizes (what the README tells
    users whose batch varies; dynamic=True fails in Inductor, see README)."""
    torch._dynamo.reset()
    try:
        model = small_vit()
        compiled = torch.compile(model, fullgraph=True)
        model.eval()
        before = torch._dynamo.utils.counters["stats"]["unique_graphs"]  # the process's count so far
        for b in (2, 3):
            img = torch.randn(b, 3, 64, 64)
            torch._dynamo.mark_dynamic(img, 0)
            with torch.no_grad():
                assert_close(compiled(img), model(img))
        frames = torch._dynamo.utils.counters["stats"]["unique_graphs"] - before
        assert frames == 1, f"{frames} graphs for two batch sizes"
    finally:
        torch._dynamo.reset()


def test_package_exports() -> None:
    assert paca_kernels.create_model is create_model
    assert set(paca_kernels.list_models()) == set(OFFICIAL_NAMES)
