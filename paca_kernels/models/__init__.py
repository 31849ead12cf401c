"""PaCa-ViT models: the official variants, their teacher, create_model / list_models, and the
segmentor (backbone + PaCa segmentation head)."""

from .paca_vit import PaCaTeacher_ConvMixer, PaCaViT, Residual
from .pretrained import LoadReport, load_pretrained, read_checkpoint
from .segmentor import PaCaSegmentor
from .zoo import FACTORIES, create_model, list_models, model_config

__all__ = [
    "FACTORIES",
    "LoadReport",
    "PaCaSegmentor",
    "PaCaTeacher_ConvMixer",
    "PaCaViT",
    "Residual",
    "create_model",
    "list_models",
    "load_pretrained",
    "model_config",
    "read_checkpoint",
]
