"""Benchmark shapes, from the PaCa-ViT stages (patch size 4, stage strides 4/8/16/32).

Each is one PaCa layer's problem: B images, N = H·W patches of C channels, M clusters, h heads.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    name: str
    B: int
    H: int
    W: int
    C: int
    M: int
    h: int

    @property
    def N(self) -> int:
        return self.H * self.W

    @property
    def d(self) -> int:
        return self.C // self.h

    @property
    def id(self) -> str:
        return f"{self.name}-B{self.B}-N{self.N}-C{self.C}-M{self.M}-h{self.h}"


def stage_shapes(device_type: str, smoke: bool) -> list[Shape]:
    """The shapes of one benchmark run: 224² stages of Tiny/Small (stages 1-3; Base differs only in
    stage 3's width), segmentation 512² stage 1, detection-like 800×1216 stage 1."""
    if smoke:
        return [Shape("smoke", 2, 7, 7, 32, 7, 2)]
    b = 64 if device_type == "cuda" else 8
    return [
        Shape("tiny-s1", b, 56, 56, 96, 100, 2),
        Shape("tiny-s2", b, 28, 28, 192, 100, 4),
        Shape("tiny-s3", b, 14, 14, 320, 100, 8),
        Shape("base-s3", b, 14, 14, 384, 100, 8),
        Shape("seg512-s1", 8, 128, 128, 96, 100, 2),
        Shape("det800x1216-s1", 2, 200, 304, 96, 100, 2),
    ]
