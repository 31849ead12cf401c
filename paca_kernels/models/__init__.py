"""PaCa-ViT models: the official variants, their teacher, create_model / list_models."""

from .paca_vit import PaCaTeacher_ConvMixer, PaCaViT, Residual
from .zoo import FACTORIES, create_model, list_models, model_config

__all__ = [
    "FACTORIES",
    "PaCaTeacher_ConvMixer",
    "PaCaViT",
    "Residual",
    "create_model",
    "list_models",
    "model_config",
]
