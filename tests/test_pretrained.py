"""Pretrained loading (paca_kernels.models.pretrained.load_pretrained) through every entry point:
create_model (any num_classes, features_only / out_indices, downstream_cluster_num), PaCaViT(pretrained=),
PaCaSegmentor.from_name(pretrained=), timm's pretrained_cfg_overlay idiom, checkpoint layouts, and the
errors (missing file, another architecture, strict)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from paca_kernels import PaCaSegmentor, PaCaViT, create_model, load_pretrained
from paca_kernels.models import model_config
from paca_kernels.models._timm import _timm_entry

TINY = "pacavit_tiny_p2cconv_100_0"
SEG_CLUSTERS = [16, 16, 16, 0]


@pytest.fixture(scope="module")
def source() -> dict[str, torch.Tensor]:
    """An ImageNet-style Tiny state dict (1000 classes, 100 clusters), with the head's bias made
    non-zero so that a re-initialised head is told apart from a loaded one."""
    torch.manual_seed(0)
    state = create_model(TINY).state_dict()
    state["head.bias"] = torch.randn_like(state["head.bias"])
    return state


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, source) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    torch.save({"state_dict": source, "epoch": 300}, path)  # the official layout
    return path


def _check_loaded(model: torch.nn.Module, source: dict[str, torch.Tensor], *, except_prefixes=()) -> int:
    """Every tensor of ``model`` whose name is in ``source`` with the same shape equals it; returns
    how many were compared."""
    n = 0
    for name, value in model.state_dict().items():
        if name.startswith(tuple(except_prefixes)) or name not in source:
            continue
        if source[name].shape == value.shape:
            assert torch.equal(value, source[name]), name
            n += 1
    return n


def test_same_architecture_loads_everything(ckpt, source, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="paca_kernels"):
        model = create_model(TINY, pretrained=str(ckpt))
    assert _check_loaded(model, source) == len(source)
    assert "loaded 239 of the model's 239 tensors" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_other_num_classes_reinitialises_the_classifier(ckpt, source, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="paca_kernels"):
        model = create_model(TINY, pretrained=ckpt, num_classes=10)
    assert _check_loaded(model, source) == len(source) - 2
    assert model.head.weight.shape == (10, 384)
    assert torch.equal(model.head.bias, torch.zeros(10))  # the fresh initialisation, not the checkpoint's
    warnings = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "head.weight [1000, 384]->[10, 384]" in warnings and "head.bias" in warnings


@pytest.mark.parametrize("kwargs", [{"features_only": True}, {"out_indices": (1, 3)}], ids=["features_only", "out_indices"])
def test_backbone_ignores_the_classifier(ckpt, source, caplog, kwargs) -> None:
    with caplog.at_level(logging.INFO, logger="paca_kernels"):
        model = create_model(TINY, pretrained=ckpt, **kwargs)
    assert model.head is None
    assert _check_loaded(model, source) == len(source) - 2
    assert "checkpoint tensors with no place in the model: head.weight, head.bias" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_downstream_cluster_num_reinitialises_the_clustering_convs(ckpt, source, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="paca_kernels"):
        model = create_model(TINY, pretrained=ckpt, features_only=True, downstream_cluster_num=SEG_CLUSTERS)
    resized = [f"stage{i}.0.attn.clustering.clustering.4.weight" for i in (1, 2, 3)]
    assert _check_loaded(model, source) == len(source) - 2 - len(resized)
    for name in resized:
        assert model.state_dict()[name].shape[0] == 16
        assert name in caplog.text


def test_paca_vit_constructor_shares_the_loader(ckpt, source) -> None:
    cfg = model_config(TINY)
    model = PaCaViT(num_classes=7, pretrained=str(ckpt), **cfg)
    assert _check_loaded(model, source) == len(source) - 2
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        PaCaViT(pretrained=str(ckpt.parent / "missing.pth"), **cfg)


def test_segmentor_loads_imagenet_weights_into_its_backbone(ckpt, source, tmp_path) -> None:
    seg = PaCaSegmentor.from_name(TINY, num_classes=5, channels=32, downstream_cluster_num=SEG_CLUSTERS,
                                  pretrained=ckpt)
    assert _check_loaded(seg.backbone, source) == len(source) - 2 - 3
    # A segmentation checkpoint (backbone.* + decode_head.*) round-trips into the whole segmentor ...
    with torch.no_grad():
        for p in seg.decode_head.parameters():
            p.normal_()
    path = tmp_path / "seg.pth"
    torch.save({"state_dict": seg.state_dict()}, path)
    again = PaCaSegmentor.from_name(TINY, num_classes=5, channels=32, downstream_cluster_num=SEG_CLUSTERS,
                                    pretrained=path)
    full = seg.state_dict()
    assert all(torch.equal(v, full[k]) for k, v in again.state_dict().items())
    # ... and its backbone part into a plain features_only backbone (the "backbone." prefix dropped).
    backbone = create_model(TINY, features_only=True, downstream_cluster_num=SEG_CLUSTERS, pretrained=path)
    own = seg.backbone.state_dict()
    assert all(torch.equal(v, own[k]) for k, v in backbone.state_dict().items())


@pytest.mark.parametrize("layout", ["plain", "model", "module-prefix", "compiled-prefix"])
def test_checkpoint_layouts(source, tmp_path, layout) -> None:
    state = {"plain": source, "model": {"model": source},
             "module-prefix": {f"module.{k}": v for k, v in source.items()},
             "compiled-prefix": {f"_orig_mod.{k}": v for k, v in source.items()}}[layout]
    torch.save(state, tmp_path / "c.pth")
    model = create_model(TINY, pretrained=tmp_path / "c.pth")
    assert _check_loaded(model, source) == len(source)


def test_another_architecture_is_an_error_naming_the_counts(ckpt) -> None:
    with pytest.raises(ValueError, match=r"does not fit this PaCaViT: only \d+ of the model's \d+ tensors"):
        create_model("pacavit_base_p2cconv_100_0", pretrained=ckpt)
    with pytest.raises(ValueError, match="of the model's"):
        load_pretrained(torch.nn.Linear(3, 4), ckpt)


def test_missing_file_and_bad_values(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        create_model(TINY, pretrained=str(tmp_path / "missing.pt"))
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        PaCaSegmentor.from_name(TINY, pretrained=tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="no download URLs"):
        create_model(TINY, pretrained=True)
    with pytest.raises(TypeError, match="path of a local checkpoint"):
        create_model(TINY, pretrained=3)
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="expected a state dict"):
        create_model(TINY, pretrained=tmp_path / "list.pt")


def test_strict(ckpt) -> None:
    model = create_model(TINY)
    report = load_pretrained(model, ckpt, strict=True)
    assert len(report.loaded) == 239 and not report.reinitialized and not report.missing
    with pytest.raises(ValueError, match=r"strict load .* re-initialised 2 .*head\.weight"):
        load_pretrained(create_model(TINY, num_classes=3), ckpt, strict=True)


def test_timm_local_file_idiom(ckpt, source) -> None:
    """timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path))."""
    model = _timm_entry(TINY)(pretrained=True, pretrained_cfg=None, num_classes=4,
                              pretrained_cfg_overlay={"file": str(ckpt)})
    assert _check_loaded(model, source) == len(source) - 2
    with pytest.raises(ValueError, match="no download URLs"):
        _timm_entry(TINY)(pretrained=True, pretrained_cfg=None, pretrained_cfg_overlay=None)
