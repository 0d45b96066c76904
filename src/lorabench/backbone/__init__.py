"""Backbones: the self-pretrained tiny Llama, any HF causal LM, and their quantized formats."""

from lorabench.backbone.quantize import quantize_backbone, register_quantizer

__all__ = ["quantize_backbone", "register_quantizer"]
