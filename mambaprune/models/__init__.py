"""Vision SSM models in plain PyTorch (ViM, ViM with Mamba-2 mixers, PlainMamba) with a timm-style registry.

No pretrained weights exist offline; ``load_checkpoint`` loads a local safetensors file.
"""

from ._registry import list_models, register_model
from .checkpoints import load_checkpoint
from .factory import create_model
from . import plainmamba, segmentation, vim, vim2  # noqa: F401  (registers the models)
from .plainmamba import PlainMamba, zigzag_orders
from .segmentation import LightDecoder, PlainMambaSegmenter, ViMSegmenter
from .vim import VisionMamba
from .vim2 import VisionMamba2

__all__ = ["create_model", "list_models", "load_checkpoint", "register_model", "VisionMamba", "VisionMamba2", "PlainMamba", "zigzag_orders",
           "LightDecoder", "PlainMambaSegmenter", "ViMSegmenter"]
