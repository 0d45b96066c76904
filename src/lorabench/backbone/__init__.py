"""Backbones: the self-pretrained tiny Llama, any HF causal LM, and their quantized formats."""

from lorabench.backbone.quantize import quantize_backbone, register_quantizer
from lorabench.backbone import bnb4bit  # noqa: E402,F401  (registers the shared 4-bit format)
from lorabench.backbone import intn  # noqa: E402,F401  (registers the "intn" quantizer)

__all__ = ["quantize_backbone", "register_quantizer"]
