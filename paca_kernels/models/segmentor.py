"""PaCaSegmentor: a PaCa-ViT backbone (``features_only``) and the PaCa segmentation head
(:class:`paca_kernels.nn.PaCaSegHead`), with the official ADE20K set-up and training objective.

It builds its backbone with :func:`~paca_kernels.models.create_model`, so it lives with the models
(``nn`` holds the head, which takes features from any backbone).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn.seg_head import PaCaSegHead
from .pretrained import load_pretrained, read_checkpoint
from .zoo import create_model

__all__ = ["PaCaSegmentor"]


class PaCaSegmentor(nn.Module):
    """A PaCa-ViT backbone (``features_only``) and a :class:`PaCaSegHead`.

    Forward: images (B, 3, H, W), H and W divisible by 32 -> seg logits (B, K, H, W) (bilinearly
    upsampled from 1/4 resolution, as mmseg's inference does), or at 1/4 resolution with
    ``upsample=False``; ``return_cluster_logits=True`` also returns the head's (B, K, H/4, W/4) cluster
    logits. :meth:`loss` is the official training objective.
    """

    def __init__(self, backbone: nn.Module, head: PaCaSegHead, align_corners: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.decode_head = head
        self.align_corners = align_corners

    @classmethod
    def from_name(
        cls,
        name: str = "pacavit_tiny_p2cconv_100_0",
        num_classes: int = 150,
        channels: int = 256,
        downstream_cluster_num: Sequence[int] | None = (200, 200, 200, 0),
        backbone_kwargs: dict[str, Any] | None = None,
        pretrained: str | os.PathLike[str] | None = None,
        **head_kwargs: Any,
    ) -> PaCaSegmentor:
        """The official ADE20K set-up: ``create_model(name, features_only=True,
        downstream_cluster_num=...)`` and a head with ``channels`` and ``num_classes``.

        ``pretrained``: a local checkpoint. An ImageNet classification checkpoint loads into the
        backbone (its classifier is ignored; the clustering convs resized by
        ``downstream_cluster_num`` keep their initialisation, and are logged); a segmentation
        checkpoint (``backbone.*`` and ``decode_head.*`` keys, as this class and mmseg save them)
        loads into the whole segmentor. Both through
        :func:`~paca_kernels.models.pretrained.load_pretrained`.
        """
        kwargs = dict(backbone_kwargs or {})
        if downstream_cluster_num is not None:
            kwargs["downstream_cluster_num"] = list(downstream_cluster_num)
        backbone = create_model(name, features_only=True, **kwargs)
        head = PaCaSegHead(list(backbone.embed_dims), num_classes, channels=channels, **head_kwargs)
        model = cls(backbone, head)
        if pretrained is not None:
            state = read_checkpoint(pretrained)
            whole = any(k.startswith("decode_head.") for k in state)
            load_pretrained(model if whole else backbone, state, source=repr(os.fspath(pretrained)))
        return model

    def forward(
        self, images: Tensor, *, upsample: bool = True, return_cluster_logits: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        feats = self.backbone(images)
        seg, clusters = self.decode_head(feats)
        if upsample:
            seg = F.interpolate(seg, size=images.shape[2:], mode="bilinear", align_corners=self.align_corners)
        return (seg, clusters) if return_cluster_logits else seg

    def loss(
        self, images: Tensor, labels: Tensor, *, aux_weight: float = 0.4, ignore_index: int = 255
    ) -> dict[str, Tensor]:
        """Official objective: cross-entropy of the seg logits plus ``aux_weight`` × cross-entropy of the
        cluster logits, both resized to the labels (B, H, W) and averaged over non-ignored pixels."""
        if labels.dim() != 3 or labels.dtype != torch.long:
            raise ValueError(f"labels must be (B, H, W) int64, got {tuple(labels.shape)} {labels.dtype}")
        seg, clusters = self(images, upsample=False, return_cluster_logits=True)
        size = labels.shape[1:]
        seg = F.interpolate(seg, size=size, mode="bilinear", align_corners=self.align_corners)
        clusters = F.interpolate(clusters, size=size, mode="bilinear", align_corners=self.align_corners)
        loss_seg = F.cross_entropy(seg, labels, ignore_index=ignore_index)
        loss_aux = F.cross_entropy(clusters, labels, ignore_index=ignore_index)
        return {"loss_seg": loss_seg, "loss_aux": aux_weight * loss_aux,
                "loss": loss_seg + aux_weight * loss_aux}
